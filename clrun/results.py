"""Writing one run's results: model-size accounting, parquet tables, plots and the console report.

Every file is written to a temporary name in the same folder and renamed, so a
crash never leaves a half-written result.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
from rich.console import Console
from rich.table import Table

from clrun import metrics
from clrun.errors import ClrunError

if TYPE_CHECKING:  # clrun-report reads results without torch; a run reaches its first step without pandas, matplotlib
    import pandas as pd
    import torch

CHECKPOINT = Path("checkpoints") / "last.pt"  # in the run folder: the resume state
ACCURACY_FILE = "accuracy.parquet"
SUMMARY_FILE = "summary.parquet"
TASKS_FILE = "tasks.parquet"
VAL_ACCURACY_FILE = "val_accuracy.parquet"  # accuracy.parquet's rows measured on the validation splits
MATRIX_PLOT = "accuracy_matrix.png"
CURVES_PLOT = "accuracy_curves.png"


@dataclass
class Footprint:
    """What a method must store to predict every task learned so far."""

    params: int  # parameters stored
    bytes: int  # bytes stored: parameters, buffers, masks
    base_params: int  # parameters of one backbone with one head (the expansion ratio's denominator)

    def plus(self, stored_bytes: int) -> "Footprint":
        """This footprint with `stored_bytes` more (masks, memories, importance: bytes, not parameters)."""
        return Footprint(self.params, self.bytes + stored_bytes, self.base_params)


def tensor_bytes(tensors: Iterable["torch.Tensor"]) -> int:
    """Bytes of some tensors."""
    return sum(t.numel() * t.element_size() for t in tensors)


def module_bytes(module: "torch.nn.Module") -> int:
    """Bytes of a module's parameters and buffers."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


def count_params(module: "torch.nn.Module") -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename the temporary file onto `path`. A disk that is full or a folder that
    cannot be written is a one-line `ClrunError` (`path` keeps its earlier content; no temporary file is left)."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        # torch.save's zip writer reports a full disk as a RuntimeError ("... file write failed")
        if isinstance(error, OSError) or (isinstance(error, RuntimeError) and "write failed" in str(error)):
            raise ClrunError(
                f"cannot write {path} ({' '.join(str(error).split())[:160]}): free space on its disk or make its "
                "folder writable, then run the same command again (the tasks finished before are kept)"
            ) from None
        raise


def frame(rows: list[dict] | dict) -> pd.DataFrame:
    """A table of `rows` (pandas is imported here, at a run's first table: its start does not wait for it)."""
    import pandas as pd

    return pd.DataFrame(rows)


def write_parquet(table: pd.DataFrame, path: Path) -> None:
    atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))


# summary columns that are fractions, shown as percentages
PERCENT = {"acc", "bwt", "fwt", "forgetting", "acc_all_steps", "fwt_all_steps", "bwt_all_steps", "task_id_acc"}
PERCENT |= {"task_aware_acc", "task_aware_bwt", "task_aware_forgetting", "transfer_vs_scratch", "val_acc"}
TASK_AWARE = "task_aware"  # eval_mode of rows measured with the task id given
TASK_AGNOSTIC = "task_agnostic"  # eval_mode of rows measured without it (class and domain scenarios)
BEFORE_TRAINING = -1  # train_task of the rows measured before the first task (domain scenario: FWT's b_j)


def matrix_rows(accuracy: pd.DataFrame, mode: str | None = None) -> pd.DataFrame:
    """The rows of one accuracy matrix: measured after a task, in `mode` (default: the run's headline
    matrix, task-agnostic where it was measured, else task-aware)."""
    if "eval_mode" not in accuracy:  # a table written by hand, one matrix
        return accuracy[accuracy["train_task"] >= 0]
    if mode is None:
        mode = TASK_AGNOSTIC if (accuracy["eval_mode"] == TASK_AGNOSTIC).any() else TASK_AWARE
    return accuracy[(accuracy["train_task"] >= 0) & (accuracy["eval_mode"] == mode)]


def accuracy_matrix(accuracy: pd.DataFrame, n_tasks: int, mode: str | None = None) -> np.ndarray:
    """The T x T matrix R[train_task, eval_task] of `matrix_rows(accuracy, mode)`; NaN where not measured."""
    rows = matrix_rows(accuracy, mode)
    R = np.full((n_tasks, n_tasks), np.nan)
    R[rows["train_task"].to_numpy(), rows["eval_task"].to_numpy()] = rows["accuracy"].to_numpy()
    return R


def acc_of(accuracy: pd.DataFrame, n_tasks: int) -> float:
    """The final average accuracy of a table of accuracy rows (its headline matrix), e.g. val_accuracy.parquet's."""
    return metrics.acc(accuracy_matrix(accuracy, n_tasks))


def initial_accuracy(accuracy: pd.DataFrame, n_tasks: int) -> np.ndarray:
    """b_j, each task's accuracy before the first task was learned; NaN where not measured.

    Only the domain scenario measures it (a shared head exists before any task);
    multi-head runs never measure R[j-1, j] either, so their FWT is NaN whatever b_j.
    """
    b = np.full(n_tasks, np.nan)
    rows = accuracy[accuracy["train_task"] == BEFORE_TRAINING]
    b[rows["eval_task"].to_numpy()] = rows["accuracy"].to_numpy()
    return b


def summarize(
    R: np.ndarray, footprint: Footprint, tasks: pd.DataFrame, wall_s: float, initial: np.ndarray | None = None
) -> dict:
    """The summary metrics of a finished run (definitions in `clrun.metrics`); `initial` holds FWT's b_j; `tasks`
    (tasks.parquet's rows: `model_mb` after each task, `plain_macs`, `train_macs`) gives MS and CE."""
    import pandas as pd

    initial = np.full(len(R), np.nan) if initial is None else initial
    nan = pd.Series(np.nan, index=tasks.index)
    return {
        "acc": metrics.acc(R),
        "bwt": metrics.bwt(R),
        "fwt": metrics.fwt(R, initial),
        "forgetting": metrics.forgetting(R),
        "acc_all_steps": metrics.acc_all_steps(R),
        "fwt_all_steps": metrics.fwt_all_steps(R),
        "bwt_all_steps": metrics.bwt_all_steps(R),
        "expansion": metrics.expansion(footprint.params, footprint.base_params),
        "params": footprint.params,
        "model_mb": metrics.model_mb(footprint.bytes),
        "memory_efficiency": metrics.memory_efficiency(tasks.get("model_mb", nan)),
        "compute_efficiency": metrics.compute_efficiency(tasks.get("plain_macs", nan), tasks.get("train_macs", nan)),
        "train_macs": float(tasks.get("train_macs", nan).sum(min_count=1)),
        "wall_s": wall_s,
    }


def second_matrix_metrics(accuracy: pd.DataFrame, n_tasks: int) -> dict:
    """Where the task-agnostic matrix is the headline (class, domain): in the class scenario the task-aware
    matrix's acc, BWT and forgetting; where the task was inferred, `task_id_acc`, the final model's mean
    share of right tasks."""
    extra = {}
    if "eval_mode" in accuracy and (accuracy["eval_mode"] == TASK_AGNOSTIC).any():
        final = matrix_rows(accuracy)
        final = final[final["train_task"] == final["train_task"].max()]
        if final["task_id_accuracy"].notna().any():
            extra["task_id_acc"] = float(final["task_id_accuracy"].mean())
        if (accuracy["eval_mode"] == TASK_AWARE).any():
            R = accuracy_matrix(accuracy, n_tasks, TASK_AWARE)
            extra |= {
                f"task_aware_{name}": f(R)
                for name, f in [("acc", metrics.acc), ("bwt", metrics.bwt), ("forgetting", metrics.forgetting)]
            }
    return extra


def pyplot():
    """matplotlib.pyplot drawing into files (the Agg backend), imported at the first plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plots(R: np.ndarray, names: list[str], run_dir: Path, title: str) -> None:
    """The accuracy matrix as a heat map and each task's accuracy across the stream."""
    plt = pyplot()
    T = len(R)
    size = max(4.0, 0.45 * T + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(np.ma.masked_invalid(R * 100), vmin=0, vmax=100, cmap="viridis")
    if T <= 20:
        for i in range(T):
            for j in range(T):
                if not math.isnan(R[i, j]):
                    color = "black" if R[i, j] > 0.6 else "white"  # readable on viridis' bright and dark ends
                    ax.text(j, i, f"{R[i, j] * 100:.0f}", ha="center", va="center", fontsize=7, color=color)
    ax.set_xlabel("evaluated task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(T))
    ax.set_yticks(range(T))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="accuracy (%)")
    fig.tight_layout()
    atomic_write(run_dir / MATRIX_PLOT, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)

    fig = curves_figure(R, names, title)
    atomic_write(run_dir / CURVES_PLOT, lambda tmp: fig.savefig(tmp, dpi=120, format="png", bbox_inches="tight"))
    plt.close(fig)


def colors(n: int) -> list:
    """`n` colours that stay distinct: matplotlib's tab20 up to 20, a continuous map (turbo) sampled beyond."""
    plt = pyplot()
    if n <= 20:
        return [plt.get_cmap("tab20" if n > 10 else "tab10")(i) for i in range(n)]
    return [plt.get_cmap("turbo")(x) for x in np.linspace(0, 1, n)]


def curves_figure(R: np.ndarray, names: list[str], title: str):
    """Each task's accuracy across the stream, one colour per task, the legend beside the axes."""
    T = len(R)
    fig, ax = pyplot().subplots(figsize=(7, 4))
    for j, color in zip(range(T), colors(T), strict=True):
        ax.plot(range(j, T), R[j:, j] * 100, marker="o", markersize=3, color=color, label=f"{j}: {names[j]}")
    ax.set_xlabel("after training task i")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.set_xticks(range(T))
    ax.legend(fontsize=6, ncol=math.ceil(T / 25), loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.tight_layout()
    return fig


def print_report(console: Console, R: np.ndarray, names: list[str], summary: dict, run_dir: Path) -> None:
    """Print the accuracy matrix and the summary metrics as rich tables."""
    matrix = Table(title="accuracy (%): row = after training task i, column = task j")
    matrix.add_column("i \\ j", justify="right")
    for j in range(len(R)):
        matrix.add_column(str(j), justify="right")
    for i, row in enumerate(R):
        matrix.add_row(f"{i} {names[i]}", *("" if math.isnan(v) else f"{v * 100:.1f}" for v in row))
    console.print(matrix)

    table = Table(title="summary")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, _format(key, value))
    console.print(table)
    console.print(f"results: {run_dir}")


def _format(key: str, value) -> str:
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if key in PERCENT:
        return f"{value * 100:.2f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)
