"""Reproduce CPG's Table 2: CPG against individual models on CIFAR-100's 20 tasks with VGG16-BN, against the paper.

Runs, through the `clrun` command: the Scratch run of Table 1 (`table1_scratch`, shared with
reproduce_table1.py); `--rounds` (5) rounds of the fine-tune baseline (`table2_finetune`, one multirun over
seeds 1000 r + seed: each task after the first fine-tuned from a random earlier task's model); from their
accuracies the fine-Avg (per task, the mean over rounds) and fine-Max (the maximum) rows and CPG's goal files,
plus "top" = max(fine-Avg, fine-Max) + `--margin` (0.5 points; the paper says only "slightly larger");
then CPG with each goal file (one multirun). Prints the paper's six rows (Scratch, fine-Avg, fine-Max,
CPG avg/max/top) beside the measured ones and writes benchmarks/results/table2-<scale>-<date>.csv.
Finished runs are reused. `--seeds N` repeats all of it for base seeds seed..seed+N-1 and prints mean +- std per
cell, flagging with ! each difference whose paper value lies outside mean +- 2 std (one seed: a stated tolerance).

    python benchmarks/reproduce_table2.py [--scale full|smoke] [--data-root DIR] [--seed N] [--rounds R] [KEY=VALUE ...]
"""

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import pandas as pd
import reproduce_table1 as t1
from rich.console import Console

ROWS = ("scratch", "fine_avg", "fine_max", "cpg_avg", "cpg_max", "cpg_top")  # the paper's order
LABELS = {
    "scratch": "Scratch",
    "fine_avg": "fine-Avg",
    "fine_max": "fine-Max",
    "cpg_avg": "CPG avg",
    "cpg_max": "CPG max",
    "cpg_top": "CPG top",
}
GOALS = ("avg", "max", "top")


def load_paper(folder: Path = t1.PAPER) -> pd.DataFrame:
    """The paper's Table 2 rows by row key."""
    table = pd.read_csv(folder / "cpg_table2.csv").set_index("method")
    return table.rename(index={label: key for key, label in LABELS.items()}).astype(float)


def finetune_preset(scale: str) -> str:
    return "table2_finetune" if scale == "full" else "table2_smoke_finetune"


def fine_rows(rounds: list[dict], margin: float) -> dict[str, dict]:
    """fine-Avg, fine-Max and top from the rounds' rows (`measured_row`: task accuracies in %): per task the mean,
    the maximum, and max(mean, maximum) + `margin` (points). Exp. and Red. are the rounds' (T individual models)."""
    frame = pd.DataFrame(rounds)
    tasks = [c for c in frame.columns if c.startswith("task")]
    average, maximum = frame[tasks].mean(), frame[tasks].max()
    top = pd.concat([average, maximum], axis=1).max(axis=1) + margin
    rows = {}
    for key, values in (("fine_avg", average), ("fine_max", maximum), ("top", top)):
        rows[key] = {**values.to_dict(), "avg": values.mean(), "exp": frame["exp"].mean(), "red": 0.0}
        rows[key].update(exp_source="expansion", n_tasks=len(tasks), run_id="+".join(frame["run_id"]))
        rows[key]["precision"] = ",".join(sorted(set(frame["precision"])))
    return rows


def write_goals(row: dict, path: Path) -> Path:
    """A goal file in CPG's format: {"<task number>": "<accuracy as a fraction>"}, from a row in %."""
    tasks = sorted((c for c in row if c.startswith("task")), key=lambda c: int(c.removeprefix("task")))
    path.write_text(json.dumps({c.removeprefix("task"): f"{row[c] / 100:.4f}" for c in tasks}, indent=1) + "\n")
    return path


def round_seeds(seed: int, rounds: int) -> list[int]:
    """The fine-tune rounds' seeds for base seed `seed`: 1000 r + seed, r = 1..rounds (distinct across seeds)."""
    return [1000 * r + seed for r in range(1, rounds + 1)]


def run_pipeline(args, seed: int, data_root: Path, console: Console) -> tuple[dict[str, dict], dict[str, float]]:
    """For base seed `seed`: Scratch, the fine-tune rounds, then CPG under the three goal files; the measured
    rows and wall times."""
    runs_dir = args.runs_dir
    common = [f"data.root='{data_root}'", *args.overrides]
    seconds = {}
    scratch = [f"experiment={t1.preset('scratch', args.scale)}", f"seed={seed}", *common]
    hydra_dirs = ["hydra.run.dir=" + str(runs_dir / "${clrun_run_name:}"), f"hydra.sweep.dir={runs_dir}"]
    seconds["scratch"] = t1.run_clrun([*scratch, *hydra_dirs], console)
    measured = {"scratch": t1.measured_row(t1.ROOT / t1.run_folder(scratch, runs_dir))}

    finetune = f"experiment={finetune_preset(args.scale)}"
    seeds = round_seeds(seed, args.rounds)
    sweep = ["-m", finetune, "seed=" + ",".join(map(str, seeds)), *common, f"hydra.sweep.dir={runs_dir}"]
    seconds["fine-tune rounds"] = t1.run_clrun(sweep, console)
    rounds = [t1.measured_row(t1.ROOT / t1.run_folder([finetune, f"seed={s}", *common], runs_dir)) for s in seeds]
    fine = fine_rows(rounds, args.margin)
    measured.update(fine_avg=fine["fine_avg"], fine_max=fine["fine_max"])

    goal_dir = t1.ROOT / runs_dir / f"table2-goals-{args.scale}-seed{seed}-rounds{args.rounds}"
    goal_dir.mkdir(parents=True, exist_ok=True)
    sources = {"avg": fine["fine_avg"], "max": fine["fine_max"], "top": fine["top"]}
    files = {goal: write_goals(sources[goal], goal_dir / f"{goal}.json") for goal in GOALS}
    cpg = f"experiment={t1.preset('cpg', args.scale)}"
    values = ",".join(f"'{files[goal]}'" for goal in GOALS)
    sweep = ["-m", cpg, f"seed={seed}", *common, f"method.goals=choice({values})", f"hydra.sweep.dir={runs_dir}"]
    seconds["cpg x3"] = t1.run_clrun(sweep, console)
    for goal in GOALS:
        folder = t1.run_folder([cpg, f"seed={seed}", *common, f"method.goals={files[goal]}"], runs_dir)
        measured[f"cpg_{goal}"] = t1.measured_row(t1.ROOT / folder)
    return measured, seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Table 2's arguments (Fig. 2 takes them too): the common ones, --rounds and --margin."""
    t1.add_common_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5, help="fine-tune rounds (the paper: 5)")
    parser.add_argument("--margin", type=float, default=0.5, help="top = max(fine-Avg, fine-Max) + this (points)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="the first base seed (Scratch's and CPG's)")
    parser.add_argument("--seeds", type=int, default=1, help="how many base seeds: mean +- std per cell")
    parser.add_argument("--out", type=Path, help="the CSV (default benchmarks/results/table2-<scale>-<date>.csv)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    if args.rounds < 1 or args.seeds < 1:
        print("reproduce_table2: error: --rounds and --seeds must be at least 1", file=sys.stderr)
        return 2
    try:
        data_root = t1.check_cifar100(args.data_root or t1.default_data_root())
        start = time.perf_counter()
        per_seed, seconds = [], {}
        for seed in range(args.seed, args.seed + args.seeds):
            rows, times = run_pipeline(args, seed, data_root, console)
            per_seed.append(rows)
            seconds |= {f"{name} (seed {seed})": s for name, s in times.items()}
    except t1.ReproduceError as error:
        print(f"reproduce_table2: error: {error}", file=sys.stderr)
        return 2
    measured = {key: t1.mean_row([rows[key] for rows in per_seed]) for key in ROWS}
    table = t1.compare(load_paper(), measured, ROWS, LABELS)
    n = measured["scratch"]["n_tasks"]
    title = f"CPG Table 2, CIFAR-100 20 tasks, VGG16-BN: paper vs measured (scale {args.scale}, {n} tasks)"
    t1.print_table(console, table, title)
    console.print(
        f"[dim]fine-Avg / fine-Max: per task the mean / maximum over {args.rounds} fine-tune rounds (seeds "
        f"1000 r + base seed); CPG avg / max / top: CPG with those as goals, top = "
        f"max(fine-Avg, fine-Max) + {args.margin:g} points. Precision: the paper's numbers are fp32; measured in "
        f"{', '.join(sorted(set(table.loc[table['row'] != 'paper', 'precision'])))}. {t1.flag_note(table)}[/]"
    )
    out = args.out or t1.RESULTS / f"table2-{args.scale}-{datetime.date.today().isoformat()}.csv"
    t1.write_table(table, out, console, seconds, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
