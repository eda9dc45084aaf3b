"""Reproduce CPG's Fig. 2: accuracy of tasks 1, 5, 10 and 15 after each later task, for DEN, CPG and fine-tuning.

Runs Table 2's pipeline (benchmarks/reproduce_table2.py; finished runs are reused) for its CPG-avg run and its
fine-Avg row, and DEN (`fig2_den`); then, for each of tasks 1, 5, 10 and 15 that the stream has, the accuracy
after every task from its own on: DEN and CPG from their runs' accuracy matrices, "Finetune Avg" flat at fine-Avg
(individual models forget nothing), as the paper draws them. Writes benchmarks/results/fig2-<scale>-<date>.png
and .csv (line, task, after_task, accuracy), and prints each line's first and last value beside the paper's
(benchmarks/paper/cpg_fig2.csv; DEN's read off the plot) and DEN's expansion beside the paper's 1.09x.

    python benchmarks/reproduce_fig2.py [--scale full|smoke] [--data-root DIR] [--seed N] [--seeds N] [--rounds R]
        [KEY=VALUE ...]

`--seeds N` repeats it for base seeds seed..seed+N-1 (Table 2's pipeline per seed, DEN's seeds one multirun): the
lines are the means over seeds, drawn with a band of +- 1 std, and each first and last value is printed as
mean +- std with ! where the paper's lies outside mean +- 2 std (one seed: beyond 2 points).
"""

import argparse
import datetime
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import reproduce_table1 as t1  # noqa: E402
import reproduce_table2 as t2  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from clrun import results  # noqa: E402

TASKS = (1, 5, 10, 15)  # the paper's panels (1-based)
PAPER_EXPANSION = 1.09  # "both expand 1.09x on model parameters" (the authors' slides)


def den_preset(scale: str) -> str:
    return "fig2_den" if scale == "full" else "fig2_smoke_den"


def matrix(run_dir: Path) -> list[list[float]]:
    """A finished run's accuracy matrix R[i][j] in %, i the tasks learned - 1."""
    accuracy = pd.read_parquet(run_dir / results.ACCURACY_FILE)
    n = int(pd.read_parquet(run_dir / results.SUMMARY_FILE)["n_tasks"].iloc[0])
    return (100 * results.accuracy_matrix(accuracy, n)).tolist()


def lines(den: list[list[float]], cpg: list[list[float]], fine_avg: dict) -> pd.DataFrame:
    """Long-form rows (line, task, after_task, accuracy) of every panel's three lines; tasks are 1-based."""
    rows = []
    n = len(cpg)
    for task in (t for t in TASKS if t <= n):
        for after in range(task, n + 1):
            rows.append({"line": "DEN", "task": task, "after_task": after, "accuracy": den[after - 1][task - 1]})
            rows.append({"line": "CPG", "task": task, "after_task": after, "accuracy": cpg[after - 1][task - 1]})
            flat = fine_avg[f"task{task}"]
            rows.append({"line": "Finetune Avg", "task": task, "after_task": after, "accuracy": flat})
    return pd.DataFrame(rows)


def mean_over_seeds(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """`lines` of several seeds as one: per point the mean accuracy and its sample std (NaN for one seed)."""
    keys = ["line", "task", "after_task"]
    grouped = pd.concat(frames).groupby(keys, sort=False)["accuracy"]
    return grouped.agg(accuracy="mean", std="std").reset_index()


def plot(frame: pd.DataFrame, path: Path, title: str) -> None:
    """One panel per task: accuracy against the number of tasks learned, one line per method (a band of +- 1 std
    over seeds where there are several)."""
    tasks = sorted(frame["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(6, 4 * len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for line, style in (("DEN", "o-"), ("CPG", "s-"), ("Finetune Avg", "--")):
            points = frame[(frame["task"] == task) & (frame["line"] == line)]
            drawn = ax.plot(points["after_task"], points["accuracy"], style, label=line, markersize=3)
            if points["std"].notna().any():
                low, high = points["accuracy"] - points["std"], points["accuracy"] + points["std"]
                ax.fill_between(points["after_task"], low, high, color=drawn[0].get_color(), alpha=0.2)
        ax.set(title=f"Task {task}", xlabel="tasks learned", ylabel="accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0][0].legend(loc="lower left", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    results.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def print_ends(console: Console, frame: pd.DataFrame, paper: pd.DataFrame, expansion: float, seeds: int) -> None:
    """Each line's first and last value (mean +- std over seeds) beside the paper's, ! where it lies outside."""
    view = Table(title="CPG Fig. 2: first and last accuracy of each line, paper vs measured")
    for column in ("line", "task", "paper first", "measured first", "paper last", "measured last"):
        view.add_column(column, justify="right")
    for (line, task), points in frame.groupby(["line", "task"], sort=False):
        ref = paper[(paper["line"] == line) & (paper["task"] == task)].iloc[0]
        cells = []
        for end, point in (("first", points.iloc[0]), ("last", points.iloc[-1])):
            flag = "!" if t1.outside(point["accuracy"] - ref[end], point["std"], seeds, "accuracy") else ""
            spread = f" +- {point['std']:.1f}" if seeds > 1 else ""
            cells += [f"{ref[end]:g}", f"{point['accuracy']:.1f}{spread}{flag}"]
        view.add_row(line, str(task), *cells)
    console.print(view)
    console.print(f"[dim]{t1.seeds_note([seeds])}[/]")
    console.print(
        f"[dim]DEN's expansion (stored parameters / one model): measured {expansion:.2f}x, paper about "
        f"{PAPER_EXPANSION}x. The paper's DEN values are read off its plot; the last value is after task 20 "
        "(at the smoke scale, after the stream's last task).[/]"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    t2.add_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="DEN's, CPG's and Scratch's (first) seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many base seeds: mean +- std")
    parser.add_argument("--out", type=Path, help="the PNG (default benchmarks/results/fig2-<scale>-<date>.png)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        if args.seeds < 1:
            raise t1.ReproduceError("--seeds must be at least 1")
        data_root = t1.check_cifar100(args.data_root or t1.default_data_root())
        start = time.perf_counter()
        seeds = list(range(args.seed, args.seed + args.seeds))
        den = [f"experiment={den_preset(args.scale)}", f"data.root='{data_root}'", *args.overrides]
        seconds = {}
        frames, expansions = [], []
        for seed in seeds:
            measured, times = t2.run_pipeline(args, seed, data_root, console)
            seconds |= {f"{name} (seed {seed})": s for name, s in times.items()}
            cpg_dir = t1.ROOT / args.runs_dir / measured["cpg_avg"]["run_id"]
            frames.append((cpg_dir, measured["fine_avg"]))
        sweep = ["-m", *den, "seed=" + ",".join(map(str, seeds)), f"hydra.sweep.dir={args.runs_dir}"]
        seconds["den"] = t1.run_clrun(sweep, console)
        per_seed = []
        for seed, (cpg_dir, fine_avg) in zip(seeds, frames, strict=True):
            den_dir = t1.ROOT / t1.run_folder([*den, f"seed={seed}"], args.runs_dir)
            per_seed.append(lines(matrix(den_dir), matrix(cpg_dir), fine_avg))
            expansions.append(float(pd.read_parquet(den_dir / results.SUMMARY_FILE)["expansion"].iloc[0]))
    except t1.ReproduceError as error:
        print(f"reproduce_fig2: error: {error}", file=sys.stderr)
        return 2
    frame = mean_over_seeds(per_seed)
    out = args.out or t1.RESULTS / f"fig2-{args.scale}-{datetime.date.today().isoformat()}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(frame, out, f"CPG Fig. 2 (scale {args.scale}): DEN, CPG with fine-Avg goals, Finetune Avg")
    results.atomic_write(out.with_suffix(".csv"), lambda tmp: frame.to_csv(tmp, index=False, float_format="%.2f"))
    expansion = sum(expansions) / len(expansions)
    print_ends(console, frame, pd.read_csv(t1.PAPER / "cpg_fig2.csv"), expansion, len(seeds))
    times = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    console.print(f"wall time {time.perf_counter() - start:.0f} s ({times}); wrote {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
