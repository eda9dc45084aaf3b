"""The `clrun` command: Hydra composes the config, `Run` executes it."""

import logging
import shutil
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.logging import RichHandler

from clrun.config import register_configs
from clrun.errors import ClrunError
from clrun.run import CHECKPOINT, Run, run_name

CONFIG_DIR = Path(__file__).resolve().parents[1] / "conf"  # the checkout's conf/ (clrun installs editable)

register_configs()
OmegaConf.register_new_resolver("clrun_run_name", lambda *, _root_: run_name(_root_), use_cache=False)


def _discard_unstarted(run_dir: Path) -> None:
    """Remove a run folder that never got a checkpoint (what Hydra and the lock left in it)."""
    if not (run_dir / CHECKPOINT).exists():
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        shutil.rmtree(run_dir / CHECKPOINT.parent, ignore_errors=True)
        if run_dir.exists() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (SLURM preemption, `timeout`) stops like Ctrl-C


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one continual-learning experiment; return its final average accuracy (for sweepers)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)], force=True)
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
        _discard_unstarted(run_dir)
