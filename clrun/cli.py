"""The `clrun` command: Hydra composes the config, `Run` executes it."""

import logging
import shutil
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
    """Remove what Hydra wrote into a run folder that never got a checkpoint."""
    if not (run_dir / CHECKPOINT).exists():
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        if run_dir.exists() and not any(run_dir.iterdir()):
            run_dir.rmdir()


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")
def main(cfg: DictConfig) -> float:
    """Run one continual-learning experiment; return its final average accuracy (for sweepers)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", handlers=[RichHandler(show_path=False)], force=True)
    console = Console()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        return Run(cfg, run_dir, console).execute()["acc"]
    except ClrunError as error:
        _discard_unstarted(run_dir)
        print(f"clrun: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        _discard_unstarted(run_dir)
        print(
            f"clrun: interrupted; finished tasks are saved in {run_dir}; run the same command again to resume",
            file=sys.stderr,
        )
        sys.exit(130)
