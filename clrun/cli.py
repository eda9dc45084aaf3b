"""The `clrun` command: Hydra composes the config from the package's `clrun.conf`, `Run` executes it."""

import logging
import os
import shutil
import signal
import sys
from pathlib import Path

import hydra
from hydra import initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.logging import RichHandler

from clrun import methods
from clrun.config import register_schemas
from clrun.errors import ClrunError
from clrun.naming import RUNS_DIR, run_name

# `clrun --help`, `--cfg` and shell completion import no torch: what runs or evaluates (clrun.run, clrun.evaluate,
# clrun.sweeps, and through them torch) is imported in the functions that do it

RUN_LOG = "run.log"  # in the run folder: what the run printed, warnings included, appended at each start
CONFIG_PATH = "pkg://clrun.conf"  # conf/ in the checkout, shipped in the package (pyproject.toml's package-dir)


def setup() -> None:
    """What Hydra needs before it composes: the schemas (run-level and every built-in method's) in the
    ConfigStore, and the resolvers the configs use (`clrun_run_name`, `clrun_methods` for --help)."""
    store = ConfigStore.instance()
    # Hydra deep-copies its config repository, and with it this process-wide store, each time it lists a group's
    # options (`--help`: ~100 times, seconds with clrun's schemas); the store is one shared object (its `load`
    # returns copies), so a copy of it can be itself
    ConfigStore.__deepcopy__ = lambda self, memo: self
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
    """Remove a run folder that never got a checkpoint, after a task or inside one (what Hydra, the lock and run.log
    left in it), unless another process is running in it."""
    from clrun.run import CHECKPOINT, MIDTASK, held_elsewhere

    saved = (run_dir / CHECKPOINT).exists() or (run_dir / MIDTASK).exists()
    if not saved and not held_elsewhere(run_dir):
        shutil.rmtree(run_dir / ".hydra", ignore_errors=True)
        shutil.rmtree(run_dir / CHECKPOINT.parent, ignore_errors=True)
        (run_dir / RUN_LOG).unlink(missing_ok=True)
        if run_dir.exists() and not any(run_dir.iterdir()):
            run_dir.rmdir()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM (`kill`, `timeout`) stops like Ctrl-C


def _stop_on_sigterm() -> None:
    """Let SIGTERM stop the run like Ctrl-C, unless what started the process handles it: a submitit job (the
    `slurm`, `submitit_local` launchers) logs SIGTERM and goes on, and on its preemption signal (SIGUSR2) requeues
    itself and exits, which clrun lets through (the requeued job resumes from the last finished task)."""
    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _interrupt):
        signal.signal(signal.SIGTERM, _interrupt)


def _console_for_logs(console: Console) -> None:
    """Send what clrun logs (conf/hydra/job_logging/clrun.yaml's rich handler) through `console`, so that
    `run.log` holds the warnings among the run's other messages."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, RichHandler):
            handler.console = console


def save_run_log(run_dir: Path, text: str) -> None:
    """Append `text` (what the run printed, warnings included) to `run_dir/run.log`, if the folder exists."""
    from clrun.run import held_elsewhere

    if run_dir.is_dir() and not held_elsewhere(run_dir):
        with open(run_dir / RUN_LOG, "a") as log:
            log.write(text)


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="config")
def _run(cfg: DictConfig) -> float | None:
    """Run one continual-learning experiment; return the objective a sweeper maximises: the final average accuracy
    on the validation splits (`val_acc`) when `stream.val_fraction` > 0, else on test (`acc`); None for a job of a
    multirun that failed, which `clrun.sweeps` records so that the sweep goes on (hydra-optuna-sweeper marks the
    trial failed; a NaN would stop it, as optuna 2 refuses the failed trial's value)."""
    from clrun import sweeps
    from clrun.run import CHECKPOINT, MIDTASK, Run

    _stop_on_sigterm()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    console = Console(record=True)  # the terminal, and run.log (the progress bars are not recorded)
    _console_for_logs(console)
    error_line = ""
    try:
        run = Run(cfg, run_dir, console, HydraConfig.get().overrides.task)
        summary = run.execute()
        sweeps.record_job("reused" if run.reused else "finished", run_dir)
        return summary["val_acc" if cfg.stream.val_fraction else "acc"]
    except ClrunError as error:
        error_line = f"clrun: error: {' '.join(str(error).split())}"  # always one line
        print(error_line, file=sys.stderr)
        if not in_sweep:
            sys.exit(2)
        sweeps.record_job("failed", run_dir, error_line.removeprefix("clrun: error: "))
        return None
    except KeyboardInterrupt:
        kept = (run_dir / CHECKPOINT).exists() or (run_dir / MIDTASK).exists()
        where = f"what was learned is saved in {run_dir}; run the same command again to resume"
        error_line = f"clrun: interrupted; {where if kept else 'nothing had been saved yet, nothing was kept'}"
        print(error_line, file=sys.stderr)
        sys.exit(130)
    except SystemExit:  # submitit's preemption handler requeued this job and exits it
        resumes = "after the last finished task" if (run_dir / CHECKPOINT).exists() else "from the start"
        error_line = f"clrun: preempted and requeued; it resumes {resumes}"
        print(error_line, file=sys.stderr)
        raise
    except Exception as error:  # a bug, or a resource running out (memory): the traceback, then the sweep goes on
        if not in_sweep:
            raise
        error_line = f"{type(error).__name__}: {' '.join(str(error).split())}"
        console.print_exception()
        sweeps.record_job("failed", run_dir, error_line)
        return None
    finally:
        save_run_log(run_dir, console.export_text() + (error_line + "\n" if error_line else ""))
        discard_unstarted(run_dir)


def check_folder_overrides(args: list[str]) -> None:
    """Fail in one line when the folder runs are written to (`hydra.run.dir=`, `hydra.sweep.dir=`, else
    outputs/runs/) names a file or a path below one, or cannot be created or written by this user (Hydra would stop
    with a traceback creating it)."""
    given = dict(arg.partition("=")[::2] for arg in args if arg.startswith(("hydra.run.dir=", "hydra.sweep.dir=")))
    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        value = given.get(key, RUNS_DIR)
        known = value.partition("${")[0]  # the part before the first interpolation
        if not known:
            continue
        named = f"{key}={value}" if key in given else f"the runs folder {value}/"
        for path in (Path(known), *Path(known).parents):
            if path.exists() and not path.is_dir():
                raise ClrunError(f"{named}: {path} is a file, not a folder; choose another {key}")
            if path.exists():
                if not os.access(path, os.W_OK | os.X_OK):
                    raise ClrunError(
                        f"{named}: this user cannot write in {path.resolve()}; run clrun from a folder you can "
                        f"write to, or set {key}=<a writable folder>"
                    )
                break


def main() -> None:
    """The `clrun` console script; `clrun eval RUN_FOLDER ...` evaluates a finished run again (`clrun.evaluate`)."""
    if sys.argv[1:2] == ["eval"]:
        from clrun import evaluate

        return evaluate.main(sys.argv[2:], compose)
    try:
        check_folder_overrides(sys.argv[1:])
    except ClrunError as error:
        print(f"clrun: error: {error}", file=sys.stderr)
        sys.exit(2)
    setup()
    _run()
