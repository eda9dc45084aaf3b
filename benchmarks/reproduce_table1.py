"""Reproduce CPG's Table 1: Scratch, PackNet, PAE and CPG on CIFAR-100's 20 tasks with VGG16-BN, against the paper.

Runs the `conf/experiment/table1_*` presets through the `clrun` command, in order: `scratch` first
(its per-task accuracies are the accuracy goals of PAE and CPG), then `packnet`, then `pae` and `cpg`
as one Hydra multirun with `method.goals=<the scratch run's folder>`. Then prints the paper's table
(benchmarks/paper/) beside the measured one, with the differences, and writes it to
benchmarks/results/table1-<scale>-<date>.csv. Finished runs are not retrained, so running it again
only prints the table again; an interrupted run resumes.

    python benchmarks/reproduce_table1.py [--scale full|smoke] [--data-root DIR] [--seed N] [--seeds N] [KEY=VALUE ...]

`--seeds N` runs seeds seed..seed+N-1 (each method's seeds one multirun) and prints mean +- std per cell, flagging
with ! each difference whose paper value lies outside mean +- 2 std (one seed: a stated tolerance).
`--scale smoke` runs the `table1_smoke_*` presets: 4 tasks, a quarter-width VGG16-BN and a few epochs,
minutes on a CPU (its accuracies are not comparable with the paper). KEY=VALUE are extra Hydra overrides
given to every job.
"""

import argparse
import datetime
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PAPER = Path(__file__).resolve().parent / "paper"
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("packnet", "pae", "cpg", "scratch")  # table order; scratch runs first
LABELS = {"packnet": "PackNet", "pae": "PAE", "cpg": "CPG", "scratch": "Scratch"}
GOAL_METHODS = ("pae", "cpg")  # take accuracy goals: the scratch run's accuracies, or the paper's
# --goals paper: the goals the paper used, from its Table 2 (CPG: fine-Avg; PAE: fine-Max, ivclab/CPG's PAE script)
PAPER_GOALS = {"cpg": "cpg_goals_fine_avg.json", "pae": "cpg_goals_fine_max.json"}
PAPER_TASKS = 20
# with one seed, a measured cell counts as off the paper beyond these (accuracies in points); with several, beyond
# 2 std of the seeds
ONE_SEED_TOLERANCE = {"accuracy": 2.0, "exp": 0.05, "red": 0.05, "size_mb": 5.0}
# the columns beside the tasks a table may have, and their headers
EXTRAS = {"avg": "Avg.", "exp": "Exp. (x)", "red": "Red. (x)", "size_mb": "Size (MB)"}
CIFAR100_FILES = ("train", "test", "meta")
CIFAR100_TRAIN_BYTES = 155_249_918  # the official cifar-100-python/train


class ReproduceError(Exception):
    """A problem the pipeline reports in one line before exiting."""


# ---- the paper's numbers ---------------------------------------------------------------------------------------


def task_columns(n: int) -> list[str]:
    return [f"task{i}" for i in range(1, n + 1)]


def load_paper(folder: Path = PAPER) -> pd.DataFrame:
    """The paper's rows by method key: PackNet, PAE and CPG from Table 1, Scratch from Table 2.

    Columns task1..task20 (accuracy %), avg, exp and red (as printed)."""
    table1 = pd.read_csv(folder / "cpg_table1.csv").set_index("method")
    table2 = pd.read_csv(folder / "cpg_table2.csv").set_index("method")
    rows = {"packnet": table1.loc["PackNet"], "pae": table1.loc["PAE"], "cpg": table1.loc["CPG"]}
    rows["scratch"] = table2.loc["Scratch"]
    return pd.DataFrame(rows).T.astype(float)


# ---- data and jobs ---------------------------------------------------------------------------------------------


def default_data_root() -> str:
    """clrun's own default for data.root: $CLRUN_DATA, else ~/.cache/clrun/data."""
    return os.environ.get("CLRUN_DATA") or "~/.cache/clrun/data"


def check_cifar100(root: str | Path) -> Path:
    """The data root if it holds CIFAR-100 (python version); else a one-line ReproduceError naming the path."""
    root = Path(root).expanduser().resolve()  # clrun runs in the checkout's root, maybe not the caller's folder
    for name in CIFAR100_FILES:
        path = root / "cifar-100-python" / name
        if not path.is_file():
            raise ReproduceError(
                f"CIFAR-100 not found: {path} is missing; point data.root at the folder that holds cifar-100-python/ "
                "(--data-root DIR, make reproduce-table1 DATA_ROOT=DIR, or the CLRUN_DATA environment variable)"
            )
    return root


def preset(method: str, scale: str) -> str:
    """The experiment preset of a method at a scale: conf/experiment/table1[_smoke]_<method>.yaml."""
    return f"table1_{method}" if scale == "full" else f"table1_smoke_{method}"


def run_folder(overrides: list[str], runs_dir: Path) -> Path:
    """The folder clrun gives the run of `overrides`: <runs_dir>/<method>-<stream>-<backbone>-seed<seed>-<hash>."""
    from clrun.cli import compose
    from clrun.run import run_name

    return runs_dir / run_name(compose(overrides))


def clrun_command() -> list[str]:
    """The `clrun` console script of this interpreter's environment (else the one on PATH)."""
    beside = Path(sys.executable).parent / "clrun"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("clrun")
    if found is None:
        raise ReproduceError("the clrun command is not installed; run `make test` or `pip install -e .` first")
    return [found]


def run_clrun(args: list[str], console: Console) -> float:
    """Run `clrun <args>` from the checkout's root; return its wall time. A failure ends the pipeline."""
    command = clrun_command() + args
    console.print(f"[bold]$ clrun {' '.join(args)}[/]")
    start = time.perf_counter()
    code = subprocess.call(command, cwd=ROOT)
    if code != 0:
        raise ReproduceError(f"`clrun {' '.join(args)}` failed (exit {code}); see its output above")
    return time.perf_counter() - start


def goals_override(method: str, goals: str, scratch_dir: Path | None) -> str:
    """`method.goals=...`: the scratch run's folder, or the paper's goals file (a path relative to the checkout)."""
    if goals == "scratch":
        return f"method.goals={scratch_dir}"
    return f"method.goals={(PAPER / PAPER_GOALS[method]).relative_to(ROOT)}"


def run_pipeline(
    scale: str,
    data_root: Path,
    seeds: list[int],
    runs_dir: Path,
    extra: list[str],
    methods: tuple[str, ...],
    goals: str,
    console: Console,
) -> tuple[dict[str, list[Path]], dict[str, float]]:
    """Run scratch, packnet, then pae and cpg, each method's seeds as one multirun (pae and cpg with scratch's
    goals: one multirun per seed, with that seed's scratch run as goals); return each method's run folders (one
    per seed) and the wall time of each clrun command."""
    common = [f"data.root='{data_root}'", *extra]  # quoted: a path may hold `,` or `=`
    sweep_dir = f"hydra.sweep.dir={runs_dir}"
    all_seeds = "seed=" + ",".join(map(str, seeds))
    folders, seconds = {}, {}
    wanted = set(methods)
    if wanted & set(GOAL_METHODS) and goals == "scratch":
        wanted.add("scratch")

    def folders_of(experiment: str, *overrides: str) -> list[Path]:
        return [run_folder([experiment, f"seed={seed}", *common, *overrides], runs_dir) for seed in seeds]

    for method in ("scratch", "packnet"):
        if method in wanted:
            experiment = f"experiment={preset(method, scale)}"
            folders[method] = folders_of(experiment)
            seconds[method] = run_clrun(["-m", experiment, all_seeds, *common, sweep_dir], console)
    goal_methods = [m for m in GOAL_METHODS if m in wanted]
    # goals go in as one-value sweeps: Hydra applies them per job, after the experiment chose a method that has
    # `goals` (a plain override would first be tried on the multirun's base config, whose method has none)
    if goal_methods and goals == "scratch":  # the same goals for both: one multirun per seed
        sweep = "experiment=" + ",".join(preset(m, scale) for m in goal_methods)
        for seed, scratch_dir in zip(seeds, folders["scratch"], strict=True):
            key, value = goals_override("cpg", goals, scratch_dir).split("=", 1)
            for method in goal_methods:
                experiment = f"experiment={preset(method, scale)}"
                folder = run_folder([experiment, f"seed={seed}", *common, f"{key}={value}"], runs_dir)
                folders.setdefault(method, []).append(folder)
            label = "+".join(goal_methods) + f" seed {seed}"
            seconds[label] = run_clrun(
                ["-m", sweep, f"seed={seed}", *common, f"{key}=choice('{value}')", sweep_dir], console
            )
    else:
        for method in goal_methods:
            experiment = f"experiment={preset(method, scale)}"
            key, value = goals_override(method, goals, None).split("=", 1)
            folders[method] = folders_of(experiment, f"{key}={value}")
            seconds[method] = run_clrun(
                ["-m", experiment, all_seeds, *common, f"{key}=choice('{value}')", sweep_dir], console
            )
    return folders, seconds


def mean_row(rows: list[dict]) -> dict:
    """One measured row from the rows of several seeds: each number's mean, its sample std as `std_<column>`
    (NaN for one seed), `seeds` their count; the text columns of the first, precisions joined."""
    frame = pd.DataFrame(rows)
    numbers = [c for c in frame.columns if pd.api.types.is_numeric_dtype(frame[c]) and c != "n_tasks"]
    row = {**rows[0], **frame[numbers].mean().to_dict()}
    row.update({f"std_{c}": frame[c].std() if len(rows) > 1 else math.nan for c in numbers})
    row["seeds"] = len(rows)
    row["run_id"] = "+".join(frame["run_id"])
    if "precision" in frame:
        row["precision"] = ",".join(sorted(set(frame["precision"])))
    return row


# ---- measured rows and the comparison --------------------------------------------------------------------------


def _last(frame: pd.DataFrame | None, column: str) -> float:
    if frame is None or column not in frame or frame.empty:
        return math.nan
    value = frame[column].iloc[-1]
    return math.nan if value is None or pd.isna(value) else float(value)


def measured_row(run_dir: Path) -> dict:
    """One finished run as a Table 1 row: final accuracy per task (%), Avg., Exp., Red.

    Per task: the accuracy after the last task (row T-1 of the accuracy matrix). Exp.: the shared network's
    final `width_multiplier` (parameter multiplier) for the weight-sharing methods, else clrun's `expansion`
    (stored parameters / one backbone and head: T for scratch). Red.: `redundancy` (share of free weights),
    0 for scratch (no weight is left unused)."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.parquet"
    if not summary_path.is_file():
        raise ReproduceError(f"no finished run in {run_dir} (summary.parquet missing)")
    summary = pd.read_parquet(summary_path)
    accuracy = pd.read_parquet(run_dir / "accuracy.parquet")
    n_tasks = int(summary["n_tasks"].iloc[0])
    final = accuracy[accuracy["train_task"] == n_tasks - 1].sort_values("eval_task")
    row = {f"task{j + 1}": 100 * acc for j, acc in zip(final["eval_task"], final["accuracy"], strict=True)}
    row["avg"] = 100 * final["accuracy"].mean()

    exp, source = _last(summary, "width_multiplier"), "width_multiplier"
    if math.isnan(exp):
        exp, source = _last(summary, "expansion"), "expansion"
    red = _last(summary, "redundancy")
    if math.isnan(red) and summary["method"].iloc[0] == "scratch":
        red = 0.0
    precision = str(summary["precision"].iloc[0]) if "precision" in summary else "unknown"
    row.update(exp=exp, red=red, exp_source=source, n_tasks=n_tasks, run_id=str(summary["run_id"].iloc[0]))
    row["size_mb"] = _last(summary, "model_mb")
    row["precision"] = precision
    return row


def compare(
    paper: pd.DataFrame,
    measured: dict[str, dict],
    order: tuple[str, ...] = METHODS,
    labels: dict = LABELS,
    extras: tuple[str, ...] = ("avg", "exp", "red"),
) -> pd.DataFrame:
    """Paper, measured and diff (measured - paper) rows per row key of `order` (shown as `labels[key]`), over the
    tasks measured and the `extras` columns (of `EXTRAS`).

    Avg. is the mean over tasks 1..T of each row (the paper's printed Avg. when all 20 were run), so the
    difference compares like with like at the smoke scale too."""
    n = max((int(m["n_tasks"]) for m in measured.values()), default=PAPER_TASKS)
    tasks = task_columns(n)
    rows = []
    for method in order:
        if method not in measured:
            continue
        ref = paper.loc[method]
        paper_row = {c: ref[c] for c in tasks}
        paper_row.update({c: ref[c] for c in extras})
        if "avg" in extras and n != PAPER_TASKS:
            paper_row["avg"] = ref[tasks].mean()
        got = measured[method]
        got_row = {c: got.get(c, math.nan) for c in [*tasks, *extras]}
        std_row = {c: got.get(f"std_{c}", math.nan) for c in got_row}
        diff_row = {c: got_row[c] - paper_row[c] for c in got_row}
        seeds = int(got.get("seeds", 1))
        flagged = [c for c in got_row if outside(diff_row[c], std_row[c], seeds, c)]
        meta = {"exp_source": got["exp_source"], "run_id": got["run_id"], "precision": got.get("precision", "unknown")}
        meta.update(seeds=seeds, outside=" ".join(flagged))
        paper_meta = {"exp_source": "paper", "run_id": "", "precision": "fp32", "seeds": 0, "outside": ""}
        rows.append({"method": labels[method], "row": "paper", **paper_row, **paper_meta})
        rows.append({"method": labels[method], "row": "measured", **got_row, **meta})
        if seeds > 1:
            rows.append({"method": labels[method], "row": "std", **std_row, **meta})
        rows.append({"method": labels[method], "row": "diff", **diff_row, **meta})
    return pd.DataFrame(rows)


def outside(diff: float, std: float, seeds: int, column: str) -> bool:
    """Whether the paper's value lies outside the measured mean +- 2 std (one seed: ONE_SEED_TOLERANCE)."""
    if math.isnan(diff):
        return False
    kind = column if column in ONE_SEED_TOLERANCE else "accuracy"
    return abs(diff) > (2 * std if seeds > 1 else ONE_SEED_TOLERANCE[kind])


def flag_note(table: pd.DataFrame) -> str:
    """What the ! beside a difference means, for the seeds `table` was measured over."""
    return seeds_note(sorted({int(s) for s in table.loc[table["row"] != "paper", "seeds"]}))


def seeds_note(seeds: list[int]) -> str:
    """What the ! beside a difference means for measurements over these numbers of seeds."""
    if seeds == [1]:
        bounds = ONE_SEED_TOLERANCE
        return (
            f"!: the paper's value lies beyond the tolerance of one seed ({bounds['accuracy']:g} points of "
            f"accuracy, {bounds['exp']:g} of Exp. and Red.); SEEDS=n runs n seeds and flags by mean +- 2 std."
        )
    return f"!: the paper's value lies outside the measured mean +- 2 std ({', '.join(map(str, seeds))} seeds)."


def _cell(value: float, kind: str, column: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    digits = 2 if column == "red" else 0 if column == "size_mb" else 1
    if column == "exp" and kind != "diff" and float(value).is_integer():
        return f"{value:.0f}"
    if kind == "diff":
        color = "green" if value > 0 else "red" if value < 0 else "white"
        return f"[{color}]{value:+.{digits}f}[/]"
    return f"{value:.{digits}f}"


def print_table(console: Console, table: pd.DataFrame, title: str) -> None:
    """`compare`'s rows as one rich table: a section per method with its paper, measured and difference rows."""
    tasks = [c for c in table.columns if c.startswith("task")]
    extras = [c for c in EXTRAS if c in table.columns]
    view = Table(title=title, show_lines=False, pad_edge=False)
    view.add_column("method")
    view.add_column("")
    for column in tasks:
        view.add_column(column.removeprefix("task"), justify="right")
    for column in extras:
        view.add_column(EXTRAS[column], justify="right")
    for _, rows in table.groupby("method", sort=False):
        for i, (_, row) in enumerate(rows.iterrows()):
            flagged = str(row["outside"]).split() if row["row"] == "diff" else []
            columns = [*tasks, *extras]
            cells = [_cell(row[c], row["row"], c) + ("!" if c in flagged else "") for c in columns]
            view.add_row(row["method"] if i == 0 else "", row["row"], *cells, end_section=i == len(rows) - 1)
    console.print(view)


def print_comparison(console: Console, table: pd.DataFrame, title: str, goals: str = "scratch") -> None:
    """The Table 1 comparison and its notes."""
    print_table(console, table, title)
    n = len([c for c in table.columns if c.startswith("task")])
    sources = sorted({s for s in table["exp_source"] if s != "paper"})
    measured_precision = table.loc[table["row"] != "paper", "precision"]
    notes = [
        f"diff = measured - paper. Accuracy (%) of each task after all {n} tasks; Avg. over tasks 1..{n}"
        + ("" if n == PAPER_TASKS else " (the paper's printed Avg. is over 20 tasks)")
        + ". Scratch's paper row is Table 2's.",
        "Exp.: measured as the final width_multiplier (the shared network's parameter multiplier) for the "
        "weight-sharing methods, as clrun's expansion (stored parameters / one model, = T) for Scratch"
        + (f"; used here: {', '.join(sources)}." if sources else "."),
        "Red.: the share of free (released, unused) weights in the final network (summary `redundancy`).",
        f"Precision: the paper's numbers are fp32; measured in {', '.join(sorted(set(measured_precision)))}.",
        "Goals of PAE and CPG: the Scratch run's per-task accuracies (the paper's CPG row used fine-Avg goals, "
        "Table 2 avg 78.6, close to Scratch's 78.8; its PAE used fine-Max)."
        if goals == "scratch"
        else "Goals of PAE and CPG: the paper's (Table 2 fine-Avg for CPG, fine-Max for PAE), as in the paper.",
    ]
    if not {"PAE", "CPG"} & set(table["method"]):
        notes.pop()  # no goals were used
    notes.append(flag_note(table))
    for note in notes:
        console.print(f"[dim]{note}[/]")


# ---- the command -----------------------------------------------------------------------------------------------


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments every reproduce-* script takes: --scale, --data-root, --runs-dir, and Hydra overrides."""
    parser.add_argument("--scale", choices=("full", "smoke"), default="full", help="full: the paper's recipes")
    parser.add_argument(
        "--data-root", help="the folder holding cifar-100-python/ (default: $CLRUN_DATA, else ~/.cache/clrun/data)"
    )
    parser.add_argument(
        "--runs-dir",
        type=Path,
        default=Path("outputs/runs"),
        help="where the run folders go (relative: to the checkout)",
    )
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="extra Hydra overrides for every job")


def write_table(table: pd.DataFrame, out: Path, console: Console, seconds: dict[str, float], start: float) -> None:
    """Write the comparison CSV to `out` and print the wall time of each clrun command."""
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, index=False, float_format="%.4f")
    times = ", ".join(f"{name} {s:.0f} s" for name, s in seconds.items())
    console.print(f"wall time {time.perf_counter() - start:.0f} s ({times}); wrote {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds (seed, seed+1, ...): mean +- std")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="a subset to run")
    parser.add_argument(
        "--goals",
        choices=("scratch", "paper"),
        default="scratch",
        help="accuracy goals of PAE and CPG: the scratch run's accuracies (default), or the paper's "
        "(Table 2 fine-Avg for CPG, fine-Max for PAE; benchmarks/paper/cpg_goals_*.json)",
    )
    parser.add_argument(
        "--out", type=Path, help="the CSV to write (default benchmarks/results/table1-<scale>-<date>.csv)"
    )
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)  # logs get the 20-task table unsqueezed
    try:
        data_root = check_cifar100(args.data_root or default_data_root())
        train_bytes = (data_root / "cifar-100-python" / "train").stat().st_size
        if args.scale == "full" and train_bytes < CIFAR100_TRAIN_BYTES:
            console.print(
                f"[yellow]warning: {data_root}/cifar-100-python/train is smaller than the official file; "
                "the accuracies will not be comparable with the paper[/]"
            )
        start = time.perf_counter()
        if args.seeds < 1:
            raise ReproduceError("--seeds must be at least 1")
        seeds = list(range(args.seed, args.seed + args.seeds))
        folders, seconds = run_pipeline(
            args.scale, data_root, seeds, args.runs_dir, args.overrides, tuple(args.methods), args.goals, console
        )
        # runs_dir is relative to ROOT
        measured = {m: mean_row([measured_row(ROOT / f) for f in folders[m]]) for m in METHODS if m in folders}
    except ReproduceError as error:
        print(f"reproduce_table1: error: {error}", file=sys.stderr)
        return 2
    table = compare(load_paper(), measured)
    title = (
        f"CPG Table 1, CIFAR-100 20 tasks, VGG16-BN: paper vs measured "
        f"(scale {args.scale}, seeds {args.seed}..{args.seed + args.seeds - 1}, "
        f"{next(iter(measured.values()))['n_tasks']} tasks)"
    )
    print_comparison(console, table, title, args.goals)
    out = args.out or RESULTS / f"table1-{args.scale}-{datetime.date.today().isoformat()}.csv"
    write_table(table, out, console, seconds, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
