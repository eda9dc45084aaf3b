"""One run: build the stream, method and hardware, learn the tasks in order, evaluate, checkpoint."""

import fcntl
import json
import pickle
import platform
import subprocess
import time
from collections.abc import Callable
from functools import partial
from importlib.metadata import version
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.console import Console

from clrun import results
from clrun.config import check_config
from clrun.data import build_stream
from clrun.data.stream import Stream
from clrun.errors import ClrunError
from clrun.hardware import resolve_hardware
from clrun.midtask import PHASE_FILE, MidTaskCheckpoints, remove_phase_files, rng_state, set_rng_state
from clrun.naming import SPEED_KEYS, config_id, container, identity, run_name  # noqa: F401 (re-exported)
from clrun.results import CHECKPOINT  # re-exported: where a run folder's checkpoint lies
from clrun.trackers import STATE_FILE as TRACKERS_FILE
from clrun.trackers import Trackers, flat_config
from clrun.train import accuracy, agnostic_accuracy, eval_batches, make_progress, recipe_images, verification

LOCK = CHECKPOINT.parent / "lock"  # held (flock) by the process running in the folder
MIDTASK = CHECKPOINT.parent / "task.pt"  # the state inside the task being learned (`checkpoint.every_*`)
RECORDED_KEYS = ("method", "backbone", "stream", "hardware")  # summary.parquet's `cfg.` columns


def plain_macs(method_cfg, task_row: dict) -> float:
    """The survey's epsilon x one forward+backward pass over a task (CE's numerator): the MACs of training the task's
    final model once under the method's `train` recipe; NaN without a `train` recipe or a MAC count."""
    recipe = method_cfg.get("train")
    if recipe is None:
        return float("nan")
    return recipe_images(recipe, task_row["n_train"]) * task_row.get("macs_per_image", float("nan"))


def tracked_row(R, train_task: int) -> dict[str, float]:
    """Row `train_task` of the accuracy matrix as trackers get it: `accuracy/task_<j>` for each task measured, and
    `accuracy/mean` over the tasks seen so far."""
    row = {f"accuracy/task_{j}": float(value) for j, value in enumerate(R[train_task]) if value == value}
    return {**row, "accuracy/mean": float(R[train_task, : train_task + 1].mean())}


def config_columns(cfg) -> dict:
    """The method's, backbone's, stream's and hardware's config as flat `cfg.<key path>` columns (resolved; lists and
    dicts as JSON strings, so that the parquet columns stay plain)."""
    columns = {}

    def flatten(value, path: str) -> None:
        if isinstance(value, dict) and value:
            for key, item in value.items():
                flatten(item, f"{path}.{key}")
        else:
            columns[path] = json.dumps(value) if isinstance(value, (dict, list)) else value

    for key in RECORDED_KEYS:
        flatten(container(cfg[key]), f"cfg.{key}")
    return columns


def provenance(device: torch.device) -> dict:
    """The code and machine a run ran on: git commit and dirty flag of clrun's checkout (None outside one), torch's
    and CUDA's versions, the device's name, torch's CPU threads (`hardware.threads` resolved)."""
    here = Path(__file__).parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(here), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    return {
        "git_commit": commit,
        "git_dirty": None if status is None else bool(status),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "device": str(device),
        "device_name": name,
        "threads": torch.get_num_threads(),
    }


def held_elsewhere(run_dir: Path) -> bool:
    """Whether another process holds the run folder's lock (is running in it)."""
    try:
        with open(Path(run_dir) / LOCK) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def load_checkpoint(path: Path) -> dict:
    """A run's checkpoint, on the CPU; one-line errors for an unreadable or damaged file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise ClrunError(
            f"{path} cannot be read (permission denied); give this user access to the run folder"
        ) from None
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:  # a truncated or empty file
        raise ClrunError(
            f"{path} is damaged ({type(error).__name__}: {' '.join(str(error).split())[:120]}); "
            "delete it and run again to redo the run from its start, or use resume=false"
        ) from None


@torch.inference_mode()
def confusion_rows(method, stream: Stream, hw, method_cfg) -> list[dict]:
    """Per task (every task; verification tasks left out), the counts of (true, predicted) labels of the method's
    headline prediction after the last task: with the task id in the task scenario, without it otherwise."""
    rows = []
    for task in (t for t in stream.tasks if not t.verification):
        true, predicted = [], []
        known = task.index if stream.scenario == "task" else None  # the task of the images, where it is given
        for x, y in eval_batches((task.test.x, task.test.y), stream, hw, method_cfg.eval_batch_size, known):
            with hw.autocast():
                if stream.scenario == "task":
                    logits, y = method.predict(x, task=task.index), y
                else:
                    logits, y = method.predict_agnostic(x, seen=len(stream))[0], stream.targets(y, task.index)
            true.append(y.cpu())
            predicted.append(logits.argmax(1).cpu())
        pairs = results.frame({"true": torch.cat(true).numpy(), "predicted": torch.cat(predicted).numpy()})
        counts = pairs.value_counts().reset_index(name="count")
        rows += [{"eval_task": task.index, "eval_task_name": task.name, **row} for row in counts.to_dict("records")]
    return rows


class Run:
    """Executes one configured run in `run_dir`, resuming from its checkpoint when there is one."""

    def __init__(self, cfg, run_dir: Path, console: Console | None = None, overrides: list[str] | tuple = ()):
        self.cfg = cfg
        self.overrides = list(overrides)  # the command line's, saved with the config in .hydra/
        self.run_dir = Path(run_dir)
        self.console = console or Console()
        self.run_id = self.run_dir.name
        self.labels: dict = {}  # the columns that identify the run in every table, once the config is checked
        self.reused = False  # whether the folder held the finished run already (nothing was trained)
        self.val_rows: list[dict] = []  # accuracy rows of the validation splits (stream.val_fraction)

    def execute(self, adopt: Callable[[object, Stream], list[dict]] | None = None) -> dict:
        """Learn every remaining task, write the results, return the summary row.

        `adopt(method, stream)`, instead of resuming: load a state learned elsewhere into the fresh method and
        return one row of figures per task it covers (the first tasks of the stream); those tasks are evaluated
        as after the last of them and checkpointed like learned ones, then the run goes on (clrun-import-cpg).
        A folder that already holds a checkpoint is refused.
        """
        method_class = self._check()
        lock_path = self.run_dir / LOCK
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ClrunError(
                    f"another clrun process is running in {self.run_dir}; wait for it or stop it"
                ) from None
            return self._execute(method_class, adopt)

    def _check(self) -> type:
        """Check the config (one-line errors), set the labels of every table; return the method class."""
        cfg = self.cfg
        method_class = check_config(cfg)
        self.labels = {
            "run_id": self.run_id,
            "method": cfg.method.name,
            "stream": cfg.stream.name,
            "backbone": cfg.backbone.name,
            "scenario": cfg.stream.scenario.value,
            "seed": cfg.seed,
            "config_id": config_id(cfg),
        }
        return method_class

    def evaluate_saved(self, checkpoint: Path) -> tuple[list[dict], list[dict]]:
        """The final model a run folder's `checkpoint` holds, evaluated on this config's stream (the run's own, or
        another with as many tasks of as many classes and the same input shape): the accuracy rows after the
        last task, and the confusion counts of its headline predictions per task (`eval_task`, `true`,
        `predicted`, `count`; the task scenario's labels are the task's own, the others' the scenario's)."""
        method_class = self._check()
        hw = resolve_hardware(self.cfg.hardware)
        torch.manual_seed(self.cfg.seed)
        stream = build_stream(self.cfg.stream, self.cfg.data, self.cfg.seed, hw.device, self.console)
        method = method_class(self.cfg.method, self.cfg.backbone, stream, hw)
        state = load_checkpoint(checkpoint)
        if len(state["tasks"]) != len(stream):
            raise ClrunError(
                f"{checkpoint} holds a model after {len(state['tasks'])} tasks and the stream to evaluate has "
                f"{len(stream)}; evaluate finished runs on streams of as many tasks"
            )
        try:
            method.load_state_dict(state["method"])
        except (RuntimeError, KeyError, IndexError) as error:
            raise ClrunError(
                f"{checkpoint} does not fit this stream ({type(error).__name__}: {' '.join(str(error).split())[:120]});"
                " its tasks need the run's classes per task and input shape"
            ) from None
        last = len(stream) - 1
        return self._evaluate(method, stream, hw, last), confusion_rows(method, stream, hw, self.cfg.method)

    def _execute(self, method_class: type, adopt) -> dict:
        cfg = self.cfg
        hw = resolve_hardware(cfg.hardware)
        torch.manual_seed(cfg.seed)
        stream = build_stream(cfg.stream, cfg.data, cfg.seed, hw.device, self.console)
        self.data_fingerprint = stream.fingerprint()  # in the checkpoint: a resume checks the data is the same
        method = method_class(cfg.method, cfg.backbone, stream, hw)
        verifying = [task.name for task in stream.tasks if task.verification]
        if verifying and not method.scores_verification:
            raise ClrunError(
                f"method {cfg.method.name} cannot score the verification task {verifying[0]} (it has no `embed`); "
                "leave it out of the stream (stream.dataset.tasks) or score it by class"
            )
        every = cfg.get("checkpoint", {})
        if every.get("every_minutes") is not None or every.get("every_epochs") is not None:
            method.trainer.midtask = MidTaskCheckpoints(
                method,
                every.every_minutes,
                every.every_epochs,
                self.run_dir / MIDTASK.parent,
                self._write_midtask,
                load_checkpoint,
            )
        if adopt is None:
            accuracy_rows, task_rows, self.val_rows = self._resume(method)
        else:
            accuracy_rows, task_rows = self._adopt(method, stream, hw, adopt)
        if not task_rows and stream.scenario == "domain" and method.predicts_before_learning:
            accuracy_rows += self._evaluate(method, stream, hw, results.BEFORE_TRAINING)

        self._save_config()
        remaining = stream.tasks[len(task_rows) :]
        self.reused = not remaining and adopt is None
        if task_rows and adopt is None:
            state = f"resuming after task {len(task_rows) - 1}" if remaining else "finished earlier, nothing to train"
            self.console.print(f"[bold]{self.run_id}[/]: {state}")
        if remaining:
            self.console.print(
                f"[bold]{self.run_id}[/]: tasks {remaining[0].index}..{len(stream) - 1} of {len(stream)} on {hw.device}"
            )
        with Trackers(cfg.logger, self.run_dir, self.run_id) as trackers:
            matrix = results.accuracy_matrix(results.frame(accuracy_rows), len(stream)) if task_rows else None
            trackers.start(flat_config(cfg), [tracked_row(matrix, i) for i in range(len(task_rows))])
            method.trainer.epoch_callbacks.append(trackers.epoch)
            with make_progress() as progress:
                method.trainer.progress = progress
                done = len(task_rows)
                run_bar = progress.add_task(self.run_id, total=len(stream), completed=done, info=f"{done} tasks done")
                for task in remaining:
                    self._learn(method, stream, hw, task, accuracy_rows, task_rows, trackers)
                    progress.update(run_bar, advance=1, info=f"{task.index + 1}/{len(stream)} tasks done")
            return self._finish(method, method_class, stream, hw, accuracy_rows, task_rows, trackers)

    def _learn(self, method, stream, hw, task, accuracy_rows: list[dict], task_rows: list[dict], trackers) -> None:
        """Learn `task` (from where a checkpoint inside it stopped, if any), evaluate, checkpoint, report its accuracy
        row."""
        start = time.perf_counter()
        midtask = method.trainer.midtask
        if midtask is not None:
            midtask.begin(task.index, self._saved_midtask(task.index))
            start -= midtask.elapsed_before
        stats = method.learn(task)
        accuracy_rows += self._evaluate(method, stream, hw, task.index)
        self.val_rows += self._evaluate(method, stream, hw, task.index, "val")
        row = self._task_row(task, time.perf_counter() - start, stats, method.footprint())
        task_rows.append({**row, "plain_macs": plain_macs(method.task_cfg(task), row)})
        self._checkpoint(method, accuracy_rows, task_rows)
        if midtask is not None:
            (self.run_dir / MIDTASK).unlink(missing_ok=True)
            midtask.end()
        tracked = tracked_row(results.accuracy_matrix(results.frame(accuracy_rows), len(stream)), task.index)
        trackers.task(task.index, tracked)
        self.console.print(
            f"{self.run_id}: task {task.index + 1}/{len(stream)} ({task.name}) done in {row['wall_s']:.1f} s; "
            f"mean accuracy on the tasks so far {100 * tracked['accuracy/mean']:.2f}%"
        )

    def _finish(self, method, method_class, stream, hw, accuracy_rows, task_rows, trackers) -> dict:
        """The summary row, plots and report of the finished run."""
        cfg = self.cfg
        names = [task.name for task in stream.tasks]
        accuracy_table = results.frame(accuracy_rows)
        R = results.accuracy_matrix(accuracy_table, len(stream))
        initial = results.initial_accuracy(accuracy_table, len(stream))
        wall_s = sum(row["wall_s"] for row in task_rows)
        metrics = {
            "n_tasks": len(stream),
            **results.summarize(R, method.footprint(), results.frame(task_rows), wall_s, initial),
            **results.second_matrix_metrics(accuracy_table, len(stream)),
            **method.summary(),
        }
        if self.val_rows:  # stream.val_fraction: the final average accuracy on the validation splits
            metrics["val_acc"] = results.acc_of(results.frame(self.val_rows), len(stream))
        precision = "fp32" if hw.autocast_dtype is None else str(hw.autocast_dtype).removeprefix("torch.")
        key = method_class.budget_key()
        budget = {"replay_budget": None if key is None else OmegaConf.select(cfg.method, key)}  # images in memory
        summary = {**self.labels, "clrun_version": version("clrun"), "precision": precision, **budget, **metrics}
        summary |= provenance(hw.device) | config_columns(cfg)
        results.write_parquet(results.frame([summary]), self.run_dir / results.SUMMARY_FILE)
        results.save_plots(R, names, self.run_dir, self.run_id)
        results.print_report(self.console, R, names, metrics, self.run_dir)
        plots = [self.run_dir / results.MATRIX_PLOT, self.run_dir / results.CURVES_PLOT]
        trackers.summary(metrics, plots, len(stream) - 1)
        return summary

    def _task_row(self, task, wall_s: float, stats: dict, footprint) -> dict:
        """The row of tasks.parquet of a learned task."""
        return {
            **self.labels,
            "task": task.index,
            "name": task.name,
            "n_train": len(task.train),
            "skipped_files": task.skipped,
            "wall_s": wall_s,
            **stats,
            "params": footprint.params,
            "model_mb": footprint.bytes / 2**20,
        }

    def _adopt(self, method, stream, hw, adopt) -> tuple[list[dict], list[dict]]:
        """Load a state learned elsewhere (`execute`'s `adopt`), evaluate, checkpoint; return the result rows."""
        if (self.run_dir / CHECKPOINT).exists():
            raise ClrunError(f"{self.run_dir} already holds a run; delete that folder or write to another one")
        figures = adopt(method, stream)
        last = len(figures) - 1
        self.console.print(f"[bold]{self.run_id}[/]: tasks 0..{last} imported, evaluated as after task {last}")
        accuracy_rows = self._evaluate(method, stream, hw, last)
        self.val_rows = self._evaluate(method, stream, hw, last, "val")
        footprint = method.footprint()
        task_rows = [
            self._task_row(task, 0.0, row, footprint)
            for task, row in zip(stream.tasks[: len(figures)], figures, strict=True)
        ]
        self._checkpoint(method, accuracy_rows, task_rows)
        return accuracy_rows, task_rows

    def _evaluate(self, method, stream, hw, train_task: int, split: str = "test") -> list[dict]:
        """Accuracy rows of each task's `split` (`test`, or `val`: none without validation splits) after learning
        tasks 0..train_task (-1: before the first task).

        task scenario: each task seen, task id given. class: each task seen without the task id
        and again with it (`eval_mode`). domain: every task of the stream (future ones too, for FWT),
        without the task id. A verification task (face verification, task id given) scores its pairs with the
        method's `embed`: `accuracy` is the mean over its folds and `accuracy_std` their std (NaN elsewhere).
        """
        batch_size = self.cfg.method.eval_batch_size
        seen = train_task + 1
        evaluated = stream.tasks if stream.scenario == "domain" else stream.tasks[:seen]
        rows = []
        for task in evaluated:
            images = getattr(task, split)
            if images is None:
                continue
            row = {
                **self.labels,
                "train_task": train_task,
                "eval_task": task.index,
                "eval_task_name": task.name,
                "n_samples": len(images),
                "accuracy_std": float("nan"),
            }
            if task.verification:
                embed = partial(method.embed, task=task.index)
                acc, std = verification(embed, task.test, stream, hw, batch_size, task.index)
                aware = {"eval_mode": results.TASK_AWARE, "accuracy": acc, "task_id_accuracy": float("nan")}
                rows.append({**row, **aware, "accuracy_std": std})
                continue
            if stream.scenario != "task":
                predict = partial(method.predict_agnostic, seen=seen)
                acc, task_id_acc = agnostic_accuracy(predict, images, stream, hw, batch_size, task.index)
                rows.append(
                    {**row, "eval_mode": results.TASK_AGNOSTIC, "accuracy": acc, "task_id_accuracy": task_id_acc}
                )
            if stream.scenario != "domain":
                acc = accuracy(partial(method.predict, task=task.index), images, stream, hw, batch_size, task.index)
                rows.append({**row, "eval_mode": results.TASK_AWARE, "accuracy": acc, "task_id_accuracy": float("nan")})
        return rows

    def _resume(self, method) -> tuple[list[dict], list[dict], list[dict]]:
        """Load the checkpoint into `method` and the RNG; return the result rows so far (test, tasks, validation).
        Temporary files of writes that a kill interrupted are removed first."""
        tables = (results.ACCURACY_FILE, results.TASKS_FILE, results.SUMMARY_FILE, results.VAL_ACCURACY_FILE)
        tables += (TRACKERS_FILE,)
        for folder in (self.run_dir, self.run_dir / CHECKPOINT.parent):
            for name in (CHECKPOINT.name, MIDTASK.name, PHASE_FILE.format("*"), *tables):
                for tmp in folder.glob(f".{name}.*"):  # atomic_write's temporary names
                    tmp.unlink()
        path = self.run_dir / CHECKPOINT
        if not self.cfg.resume:  # start over: whatever an earlier start saved goes
            for name in (CHECKPOINT, MIDTASK, *tables):
                (self.run_dir / name).unlink(missing_ok=True)
            remove_phase_files(self.run_dir / CHECKPOINT.parent)
            return [], [], []
        if not path.exists():
            return [], [], []
        state = load_checkpoint(path)
        self._check_same_run(path, state)
        method.load_state_dict(state["method"])
        set_rng_state(state["rng"])
        return state["accuracy"], state["tasks"], state.get("val_accuracy", [])

    def _check_same_run(self, path: Path, state: dict) -> None:
        """Refuse a checkpoint of another config or made on other data, in one line."""
        if state["identity"] != json.dumps(identity(self.cfg), sort_keys=True):
            raise ClrunError(
                f"{path} belongs to a run with another config; use resume=false to start over "
                "or hydra.run.dir=<another folder>"
            )
        if state.get("data", self.data_fingerprint) != self.data_fingerprint:  # checkpoints before the key: none
            raise ClrunError(
                f"{path} was made on other data than data.root={self.cfg.data.root} holds now (images or labels "
                "differ); point data.root at the data the run started on, or use resume=false to start over"
            )

    def _saved_midtask(self, task: int) -> dict | None:
        """The state saved inside `task` before a stop (None: none, or one of another task, which is removed)."""
        path = self.run_dir / MIDTASK
        if not path.exists():
            return None
        state = load_checkpoint(path)
        self._check_same_run(path, state)
        if state["task"] != task:  # saved inside a task that then finished: stale
            path.unlink()
            return None
        self.console.print(f"[bold]{self.run_id}[/]: resuming inside task {task} from {MIDTASK}")
        return state

    def _write_midtask(self, state: dict) -> None:
        """Save a state inside the task being learned (`MidTaskCheckpoints`' `write`), atomically."""
        state = {"identity": json.dumps(identity(self.cfg), sort_keys=True), "data": self.data_fingerprint, **state}
        results.atomic_write(self.run_dir / MIDTASK, lambda tmp: torch.save(state, tmp))

    def _save_config(self) -> None:
        """Write the run's config and overrides to .hydra/ (Hydra's own copy is off: `hydra.output_subdir: null`),
        once this process holds the folder and its checkpoint matched: a refused process never overwrites them."""
        folder = self.run_dir / ".hydra"
        results.atomic_write(folder / "config.yaml", lambda tmp: OmegaConf.save(self.cfg, tmp))
        results.atomic_write(
            folder / "overrides.yaml", lambda tmp: OmegaConf.save(OmegaConf.create(self.overrides), tmp)
        )

    def _checkpoint(self, method, accuracy_rows: list[dict], task_rows: list[dict]) -> None:
        """Refresh the per-task tables, then save method state, results and RNG state.

        Tables first: a crash in between leaves them one task ahead of the checkpoint,
        and resuming redoes that task and rewrites them.
        """
        results.write_parquet(results.frame(accuracy_rows), self.run_dir / results.ACCURACY_FILE)
        results.write_parquet(results.frame(task_rows), self.run_dir / results.TASKS_FILE)
        if self.val_rows:
            results.write_parquet(results.frame(self.val_rows), self.run_dir / results.VAL_ACCURACY_FILE)
        state = {
            "identity": json.dumps(identity(self.cfg), sort_keys=True),
            "data": self.data_fingerprint,
            "method": method.state_dict(),
            "accuracy": accuracy_rows,
            "tasks": task_rows,
            "val_accuracy": self.val_rows,
            "rng": rng_state(),
        }
        results.atomic_write(self.run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))
