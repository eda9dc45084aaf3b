"""Sweeps that survive their failing jobs: each job's outcome recorded, one status table per sweep.

In a multirun (`clrun -m ...`) a job that fails (an unsupported scenario, a bad value, a NaN loss, out of memory)
does not stop the sweep: `clrun.cli` records it with its error line and returns None to the sweeper. Every job
writes `job-<num>.json` (its overrides, status `finished` | `reused` | `failed`, error, run folder) into the
sweep's record folder, `<hydra.sweep.dir>/sweeps/<start time>/`, which `SweepReport` (a Hydra callback, set in
conf/config.yaml) creates when the multirun starts and passes to the jobs in `CLRUN_SWEEP_RECORDS` (so jobs in
other processes, e.g. the `parallel` launcher's, find it). When the multirun ends it writes `status.csv` there,
prints how many jobs finished, failed and were reused, and exits with status 1 if any failed.

An Optuna search (conf/hparams_search/) adds `OptunaBest`, which prints the best trial's `clrun` command.
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:  # pandas is imported where it is used: a run reaches its first step without it
    import pandas as pd

RECORDS = "CLRUN_SWEEP_RECORDS"  # the environment variable naming the running sweep's record folder
STATUS_FILE = "status.csv"


def record_job(status: str, run_dir: Path, error: str = "") -> None:
    """Record the outcome of the current multirun job (nothing outside a multirun started by `SweepReport`)."""
    folder = os.environ.get(RECORDS)
    if not folder:
        return
    job = HydraConfig.get().job
    row = {
        "job": job.num,
        "overrides": " ".join(HydraConfig.get().overrides.task),
        "status": status,
        "error": error,
        "run_dir": str(run_dir),
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / f"job-{job.num}.json").write_text(json.dumps(row))


def status_table(folder: Path) -> pd.DataFrame:
    """The recorded jobs of one sweep, in job order."""
    import pandas as pd

    rows = [json.loads(path.read_text()) for path in folder.glob("job-*.json")]
    columns = ["job", "overrides", "status", "error", "run_dir"]
    return pd.DataFrame(rows, columns=columns).sort_values("job", ignore_index=True)


class SweepReport(Callback):
    """Hydra callback: opens the sweep's record folder, and at the end writes and prints its status table."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        folder = Path(config.hydra.sweep.dir) / "sweeps" / f"{stamp}-{os.getpid()}"
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[RECORDS] = str(folder.resolve())

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from clrun.results import atomic_write

        folder = Path(os.environ.pop(RECORDS))
        table = status_table(folder)
        atomic_write(folder / STATUS_FILE, lambda tmp: table.to_csv(tmp, index=False))
        counts = table["status"].value_counts()
        console = Console(stderr=True)
        failed = table[table["status"] == "failed"]
        if len(failed):
            view = Table("job", "overrides", "error", title="failed jobs")
            for row in failed.itertuples():
                view.add_row(str(row.job), row.overrides, row.error)
            console.print(view)
        summary = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("finished", "reused", "failed"))
        console.print(f"sweep: {len(table)} jobs: {summary}; status table: {folder / STATUS_FILE}")
        if len(failed):
            sys.exit(1)


SQLITE = "sqlite:///"


class OptunaBest(Callback):
    """Hydra callback of the Optuna searches: creates the folder of the SQLite study, and at the end prints the
    study's trial counts and the `clrun` command of its best trial (the search's overrides with the best values)."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        storage = str(config.hydra.sweeper.storage)
        if storage.startswith(SQLITE):
            Path(storage.removeprefix(SQLITE)).parent.mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        import optuna

        sweeper = config.hydra.sweeper
        study = optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage)
        states = [trial.state.name.lower() for trial in study.trials]
        counts = ", ".join(f"{states.count(s)} {s}" for s in ("complete", "fail", "running") if s in states)
        print(f"optuna: study {study.study_name} in {sweeper.storage}: {len(states)} trials ({counts})")
        try:
            best = study.best_trial
        except ValueError:
            print("optuna: no trial finished; nothing to suggest")
            return
        kept = [o for o in config.hydra.overrides.task if o.split("=", 1)[0] not in best.params]
        chosen = [f"{name}={value}" for name, value in best.params.items()]
        print(f"optuna: best trial {best.number}, val_acc {100 * best.value:.2f}%; its run:")
        print(" ".join(["clrun", *map(shlex.quote, kept + chosen)]))
