"""The `clrun` command: Hydra composes the config from the package's `clrun.conf`, `Run` executes it."""

import shutil
import signal
import sys
from pathlib import Path

import hydra
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from clrun import methods
from clrun.config import register_schemas
from clrun.errors import ClrunError
from clrun.run import CHECKPOINT, Run, run_name

CONFIG_PATH = "pkg://clrun.conf"  # conf/ in the checkout, shipped in the package (pyproject.toml's package-dir)


def setup() -> None:
    """What Hydra needs before it composes: the schemas (run-level and every built-in method's) in the
    ConfigStore, and the resolvers the configs use (`clrun_run_name`, `clrun_methods` for --help)."""
    store = ConfigStore.instance()
    register_schemas(store)
    methods.register(store)
    OmegaConf.register_new_resolver("clrun_run_name", lambda *, _root_: run_name(_root_), use_cache=False, replace=True)
    OmegaConf.register_new_resolver("clrun_methods", methods.describe, replace=True)


def compose(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `clrun <overrides>` runs (Hydra's own `hydra.*` keys aside), for scripts, notebooks and tests."""
    setup()
    with initialize_config_module("clrun.conf", version_base="1.3"):
        return hydra.compose("config", overrides=[o for o in overrides if not o.startswith("hydra.")])


def discard_unstarted(run_dir: Path) -> None:
    """Remove a run folder that never got a checkpoint (what Hydra and the lock left in it)."""
    if not (run_dir / CHECKPOINT).exists():
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        shutil.rmtree(run_dir / CHECKPOINT.parent, ignore_errors=True)
        if run_dir.exists() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (SLURM preemption, `timeout`) stops like Ctrl-C


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _run(cfg: DictConfig) -> float:
    """Run one continual-learning experiment; return its final average accuracy (for sweepers). Logging is
    set up by Hydra from conf/hydra/job_logging/clrun.yaml."""
    signal.signal(signal.SIGTERM, _interrupt)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return Run(cfg, run_dir, Console()).execute()["acc"]
    except ClrunError as error:
        print(f"clrun: error: {' '.join(str(error).split())}", file=sys.stderr)  # always one line
        sys.exit(2)
    except KeyboardInterrupt:
        kept = (run_dir / CHECKPOINT).exists()
        where = f"finished tasks are saved in {run_dir}; run the same command again to resume"
        print(f"clrun: interrupted; {where if kept else 'no task had finished, nothing was kept'}", file=sys.stderr)
        sys.exit(130)
    finally:
        discard_unstarted(run_dir)


def main() -> None:
    """The `clrun` console script."""
    setup()
    _run()
