"""Experiment trackers (conf/logger/): CSV files, TensorBoard, Weights & Biases, MLflow, one or several at once.

A run reports to `Trackers`: the composed config (flattened) when it starts, each task's row of the accuracy matrix
as it is measured (step: the task just learned), each training epoch's loss and images/s (step: the run's epochs so
far), the summary metrics and the plots at the end. `trackers.json` in the run folder keeps, per tracker, its run id
and how many task rows and epochs it has logged, so that a resumed run continues the same tracker run (W&B, MLflow)
and logs no task twice. The trackers' packages are the `trackers` extra (`pip install -e '.[trackers]'`).
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import time
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from omegaconf import OmegaConf

from clrun.errors import ClrunError
from clrun.results import atomic_write, frame
from clrun.train import EpochEnd

if TYPE_CHECKING:
    import pandas as pd

STATE_FILE = "trackers.json"
PACKAGES = {"csv": "pandas", "tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _numbers(values: dict) -> dict[str, float]:
    """The finite numbers of `values` (trackers take no strings, None or NaN as metrics)."""
    return {
        key: value.item() if hasattr(value, "item") else value
        for key, value in values.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    }


def flat_config(cfg) -> dict:
    """The composed config as one level of dotted keys (`method.train.lr`), interpolations resolved."""
    flat = {}

    def walk(value, prefix: str) -> None:
        if isinstance(value, dict) and value:
            for key, child in value.items():
                walk(child, f"{prefix}{key}.")
        else:
            flat[prefix.removesuffix(".")] = value

    walk(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "")
    return flat


def _task_number(column: str) -> int:
    return int(column.removeprefix("task_"))


class Tracker:
    """One tool. `state` is its entry of trackers.json (kept by `Trackers`); it may store its run id there."""

    def __init__(self, cfg, run_dir: Path, run_id: str, state: dict):
        self.cfg, self.run_dir, self.run_id, self.state = cfg, run_dir, run_id, state
        self.directory = run_dir / cfg.dir if "dir" in cfg else None
        if self.directory is not None and not state["tasks"] and not state["epochs"]:
            self.clear()

    def clear(self) -> None:
        """A fresh start (no task or epoch logged): remove what an earlier run left in its folder."""

    def hparams(self, flat: dict) -> None:
        """The composed config, flattened (`method.train.lr`: 0.1)."""

    def task(self, train_task: int, row: dict[str, float]) -> None:
        """The accuracy on each task seen (`accuracy/task_<j>`, and their mean) after learning `train_task`."""

    def epoch(self, step: int, end: EpochEnd) -> None:
        """One training epoch's loss and images/s; `step` counts the run's epochs."""

    def summary(self, metrics: dict[str, float], plots: list[Path], step: int) -> None:
        """The run's summary metrics and its plots (PNG files)."""

    def close(self) -> None:
        """Flush and finish."""


class CsvTracker(Tracker):
    """CSV files in <run folder>/<dir>/: hparams.csv, accuracy.csv, epochs.csv, summary.csv."""

    FILES = ("hparams.csv", "accuracy.csv", "epochs.csv", "summary.csv")

    def clear(self):
        for name in self.FILES:
            (self.directory / name).unlink(missing_ok=True)

    def _append(self, name: str, row: dict) -> None:
        path = self.directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        frame([row]).to_csv(path, mode="a", header=not path.exists(), index=False)

    def _write(self, name: str, table: pd.DataFrame) -> None:
        atomic_write(self.directory / name, lambda tmp: table.to_csv(tmp, index=False))

    def hparams(self, flat):
        self._write("hparams.csv", frame({"key": list(flat), "value": list(flat.values())}))

    def task(self, train_task, row):
        import pandas as pd

        path = self.directory / "accuracy.csv"  # rewritten whole: each row has one task more (columns task_<j>)
        new = frame([{"train_task": train_task, **{k.removeprefix("accuracy/"): v for k, v in row.items()}}])
        table = pd.concat([pd.read_csv(path), new]) if path.exists() else new
        tasks = sorted(set(table) - {"train_task", "mean"}, key=_task_number)
        self._write("accuracy.csv", table[["train_task", *tasks, "mean"]])

    def epoch(self, step, end):
        self._append("epochs.csv", {"step": step, **vars(end)})

    def summary(self, metrics, plots, step):
        self._write("summary.csv", frame([metrics]))


class TensorboardTracker(Tracker):
    """Event files in <run folder>/<dir>/ (`tensorboard --logdir outputs/runs`); the plots as images."""

    def __init__(self, *args):
        super().__init__(*args)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(self.directory))

    def clear(self):
        for path in self.directory.glob("events.out.tfevents.*"):
            path.unlink()

    def hparams(self, flat):
        from torch.utils.tensorboard.summary import hparams

        # the HPARAMS dashboard: the config beside the final accuracy (written by `summary`)
        values = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}
        for event in hparams(values, {"summary/acc": math.nan}):
            self.writer.file_writer.add_summary(event)
        self.writer.add_text("config", "```\n" + yaml.safe_dump(flat, sort_keys=False) + "```")

    def task(self, train_task, row):
        for key, value in row.items():
            self.writer.add_scalar(key, value, train_task)

    def epoch(self, step, end):
        self.writer.add_scalar("train/loss", end.loss, step)
        self.writer.add_scalar("train/images_per_s", end.images_per_s, step)

    def summary(self, metrics, plots, step):
        from torchvision.io import ImageReadMode, read_image

        for key, value in metrics.items():
            self.writer.add_scalar(f"summary/{key}", value, step)
        for path in plots:
            self.writer.add_image(f"plots/{path.stem}", read_image(str(path), ImageReadMode.RGB), step)

    def close(self):
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run (offline by default: files in <run folder>/<dir>/wandb/); its id is kept to resume it."""

    def __init__(self, *args):
        super().__init__(*args)
        import wandb

        self.wandb = wandb
        self.directory.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            mode=self.cfg.mode,
            dir=str(self.directory),
            id=self.state.get("id"),
            name=self.run_id,
            resume="allow",
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
        )
        self.state["id"] = self.run.id
        self.run.define_metric("train_task")
        self.run.define_metric("accuracy/*", step_metric="train_task")
        self.run.define_metric("epoch")
        self.run.define_metric("train/*", step_metric="epoch")

    def hparams(self, flat):
        self.run.config.update(flat, allow_val_change=True)

    def task(self, train_task, row):
        self.run.log({"train_task": train_task, **row})

    def epoch(self, step, end):
        self.run.log({"epoch": step, "train/loss": end.loss, "train/images_per_s": end.images_per_s})

    def summary(self, metrics, plots, step):
        self.run.summary.update({f"summary/{key}": value for key, value in metrics.items()})
        self.run.log({f"plots/{path.stem}": self.wandb.Image(str(path)) for path in plots})

    def close(self):
        self.run.finish()


class MlflowTracker(Tracker):
    """An MLflow run in `tracking_uri` (default: a local store in mlruns/ beside outputs/); its id is kept to
    resume it."""

    def __init__(self, *args):
        super().__init__(*args)
        from mlflow import MlflowClient

        uri = self.cfg.tracking_uri
        if uri.startswith("sqlite:///"):  # SQLite does not make the database's folder
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(uri)
        if "run_id" not in self.state:
            experiment = self.client.get_experiment_by_name(self.cfg.experiment)
            experiment_id = experiment.experiment_id if experiment else self._create_experiment(uri)
            run = self.client.create_run(experiment_id, run_name=self.run_id, tags={"run_folder": str(self.run_dir)})
            self.state["run_id"] = run.info.run_id
            self.new = True
        else:
            self.client.update_run(self.state["run_id"], status="RUNNING")
            self.new = False
        self.id = self.state["run_id"]

    def _create_experiment(self, uri: str) -> str:
        """The experiment, its artifacts beside a SQLite store's database (MLflow's default: ./mlruns)."""
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent.resolve() / self.cfg.experiment).as_uri()
        return self.client.create_experiment(self.cfg.experiment, artifact_location=location)

    def _metrics(self, values: dict, step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.id, metrics=[Metric(key, value, now, step) for key, value in values.items()])

    def hparams(self, flat):
        if self.new:  # MLflow refuses to change a logged param; a resumed run's config is the same
            from mlflow.entities import Param

            self.client.log_batch(self.id, params=[Param(key, str(value)) for key, value in flat.items()])

    def task(self, train_task, row):
        self._metrics(row, train_task)

    def epoch(self, step, end):
        self._metrics({"train/loss": end.loss, "train/images_per_s": end.images_per_s}, step)

    def summary(self, metrics, plots, step):
        self._metrics({f"summary/{key}": value for key, value in metrics.items()}, step)
        for path in plots:
            self.client.log_artifact(self.id, str(path), artifact_path="plots")

    def close(self):
        self.client.set_terminated(self.id)


TRACKERS = {"csv": CsvTracker, "tensorboard": TensorboardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


class Trackers:
    """The trackers `logger` names, for one run folder; use as a context manager (closes them)."""

    def __init__(self, logger_cfg, run_dir: Path, run_id: str):
        self.run_dir = Path(run_dir)
        self.state_path = self.run_dir / STATE_FILE
        self.state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        chosen = [name for name in TRACKERS if logger_cfg.get(name) is not None]
        for name in chosen:
            try:
                importlib.import_module(PACKAGES[name])
            except ImportError:
                raise ClrunError(
                    f"logger={name} needs the {PACKAGES[name]} package: pip install -e '.[trackers]'"
                ) from None
        self.trackers: dict[str, Tracker] = {}
        try:
            for name in chosen:
                entry = self.state.setdefault(name, {"tasks": 0, "epochs": 0})
                self.trackers[name] = TRACKERS[name](logger_cfg[name], self.run_dir, run_id, entry)
        except BaseException:
            self.__exit__()
            raise
        self._save()

    def _save(self) -> None:
        if self.trackers:
            atomic_write(self.state_path, lambda tmp: Path(tmp).write_text(json.dumps(self.state, indent=1)))

    def start(self, flat_config: dict, rows: list[dict[str, float]]) -> None:
        """Report the config, and the accuracy rows of the tasks learned before (a resumed run) that a tracker
        has not logged yet."""
        for tracker in self.trackers.values():
            tracker.hparams(flat_config)
        for train_task, row in enumerate(rows):
            self.task(train_task, row)

    def task(self, train_task: int, row: dict[str, float]) -> None:
        """Task `train_task`'s accuracy row (`accuracy/task_<j>` and `accuracy/mean`), to each tracker that has
        not logged it."""
        row = _numbers(row)
        for name, tracker in self.trackers.items():
            if self.state[name]["tasks"] == train_task:
                tracker.task(train_task, row)
                self.state[name]["tasks"] = train_task + 1
        self._save()

    def epoch(self, end: EpochEnd) -> None:
        """A training epoch's end (a `Trainer` epoch callback)."""
        for name, tracker in self.trackers.items():
            tracker.epoch(self.state[name]["epochs"], end)
            self.state[name]["epochs"] += 1

    def summary(self, metrics: dict, plots: list[Path], step: int) -> None:
        """The finished run's summary metrics and plots, to each tracker that has not logged them."""
        for name, tracker in self.trackers.items():
            if not self.state[name].get("summary"):
                tracker.summary(_numbers(metrics), plots, step)
                self.state[name]["summary"] = True
        self._save()

    def __enter__(self) -> "Trackers":
        return self

    def __exit__(self, *exc) -> None:
        self._save()
        for tracker in self.trackers.values():
            tracker.close()
