"""Reproduce CPG's Table 4: the facial-informatic tasks on SphereFace-20 (CNN20), Scratch / Finetune / CPG.

Per age fold k (Adience's five folds, CPG's age0..age4: five separate runs, averaged) and method, runs through the
`clrun` command: `table4_cpg` (fold 0) or `table4_cpg_age<k>`, and `table4_scratch` / `table4_finetune` with the
fold's age task; face_verification -> gender -> emotion -> age<k>. Each run's final accuracies give Face (LFW 10-fold
verification accuracy, its mean and std over the folds of LFW), Gender, Expression and Age; each column is the
mean over the age folds' runs, Exp. the final width multiplier (CPG) or T individual models, Red. the share of
free weights. Prints the paper's table (benchmarks/paper/cpg_table4.csv) beside the measured one and writes
benchmarks/results/table4-<scale>-<date>.csv. Finished runs are reused. `--seeds N` repeats every run for seeds
seed..seed+N-1 and prints mean +- std per cell, flagging with ! each difference whose paper value lies outside mean
+- 2 std (one seed: a stated tolerance).

    python benchmarks/reproduce_table4.py [--scale full|smoke] [--data-root DIR] [--folds K] [--seeds N] [KEY=VALUE ...]

Data (full scale): CPG's face folders `<data-root>/face_data/{face_verification,gender,emotion,age0..age4}/{train,val}`
and LFW (`face_data/lfw_pairs.txt`, its aligned images in `face_data/face_verification/val`). `--scale smoke` writes
synthetic stand-ins in that layout (`clrun.data.synthetic.write_face_folders`) unless `--data-root` is given, and runs
the presets at an eighth of the width for one epoch, CPG with goal 0 and one sparsity step: the pipeline on a CPU,
at chance.
"""

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import pandas as pd
import reproduce_table1 as t1
from rich.console import Console
from rich.table import Table

METHODS = ("scratch", "finetune", "cpg")  # the paper's column order
LABELS = {"scratch": "Scratch", "finetune": "Finetune", "cpg": "CPG"}
COLUMNS = ("face", "face_std", "gender", "expression", "age", "exp", "red")
TASKS = {"face_verification": "face", "gender": "gender", "emotion": "expression"}  # age<k>: "age"
FOLDS = 5
SMOKE_DATA = "table4-smoke-data"  # under --runs-dir: the synthetic face folders of the smoke scale

SMOKE = ["backbone.width=0.125", "method.train.epochs=1", "method.eval_batch_size=64"]
SMOKE_CPG = [
    "method.goals=0.0",
    "method.prune_train.epochs=1",
    "method.sparsities=[0.5]",
    "method.pruning_interval=1",
    "method.pruning_frequency=1",
    "method.task_overrides.face_verification.prune_train.epochs=1",
    "method.task_overrides.face_verification.pruning_frequency=1",
]


def load_paper(folder: Path = t1.PAPER) -> pd.DataFrame:
    """The paper's Table 4 by method key (columns COLUMNS; Finetune's Face is not given: NaN)."""
    table = pd.read_csv(folder / "cpg_table4.csv").set_index("method")
    return table.rename(index={label: key for key, label in LABELS.items()}).astype(float)


def fold_overrides(method: str, fold: int, scale: str) -> list[str]:
    """The overrides of one run: the method's preset for age fold `fold`, and the smoke scale's changes."""
    if method == "cpg":
        overrides = [f"experiment={'table4_cpg' if fold == 0 else f'table4_cpg_age{fold}'}"]
    else:
        overrides = [f"experiment=table4_{method}"]
        overrides.append(f"stream.dataset.tasks=[face_verification,gender,emotion,age{fold}]")
    if scale == "smoke":
        overrides += SMOKE + (SMOKE_CPG if method == "cpg" else [])
    return overrides


def check_faces(root: str | Path, folds: int) -> Path:
    """The data root if it holds CPG's face folders and LFW's pairs; else a one-line ReproduceError."""
    root = Path(root).expanduser().resolve()
    needed = [f"face_data/{task}/train" for task in (*TASKS, *(f"age{k}" for k in range(folds)))]
    needed += ["face_data/lfw_pairs.txt", "face_data/face_verification/val"]
    for part in needed:
        if not (root / part).exists():
            raise t1.ReproduceError(
                f"CPG's face data not found: {root / part} is missing; point --data-root (make reproduce-table4 "
                "DATA_ROOT=DIR) at the folder holding face_data/ (CPG's task folders and LFW; see README, Table 4)"
            )
    return root


def smoke_data(runs_dir: Path) -> Path:
    """The smoke scale's synthetic face folders (written once, under the runs folder)."""
    from clrun.data.synthetic import write_face_folders

    root = (t1.ROOT / runs_dir / SMOKE_DATA).resolve()
    if not (root / "face_data" / "lfw_pairs.txt").is_file():
        write_face_folders(root)
    return root


def measured_row(run_dir: Path) -> dict:
    """One finished run as a Table 4 row (accuracies in %): Face and its std over LFW's folds, Gender, Expression,
    Age (the final accuracy matrix row), Exp. and Red. as Table 1 measures them."""
    base = t1.measured_row(run_dir)  # checks the run finished; exp, red, precision, run_id
    summary = pd.read_parquet(Path(run_dir) / "summary.parquet")
    accuracy = pd.read_parquet(Path(run_dir) / "accuracy.parquet")
    final = accuracy[accuracy["train_task"] == int(summary["n_tasks"].iloc[0]) - 1]
    row = {column: math.nan for column in COLUMNS}
    for _, r in final.iterrows():
        column = TASKS.get(r["eval_task_name"], "age" if str(r["eval_task_name"]).startswith("age") else None)
        if column is not None:
            row[column] = 100 * r["accuracy"]
        if column == "face" and "accuracy_std" in r:
            row["face_std"] = 100 * r["accuracy_std"]
    exp, red = base["exp"], base["red"]
    if summary["method"].iloc[0] == "scratch":  # T individual models (clrun's expansion weighs the face head in)
        exp, red = float(summary["n_tasks"].iloc[0]), 0.0
    row.update(exp=exp, red=red, run_id=base["run_id"], precision=base["precision"])
    return row


def folds_row(rows: list[dict]) -> dict:
    """The age folds' runs as one row: each column's mean (CPG's Age is the mean over the five folds)."""
    frame = pd.DataFrame(rows)
    row = frame[list(COLUMNS)].mean().to_dict()
    row.update(run_id="+".join(frame["run_id"]), precision=",".join(sorted(set(frame["precision"]))))
    row["folds"] = len(rows)
    return row


def compare(paper: pd.DataFrame, measured: dict[str, dict]) -> pd.DataFrame:
    """Per method: the paper's, the measured (with its std over seeds) and the difference rows."""
    rows = []
    for method in METHODS:
        if method not in measured:
            continue
        got = measured[method]
        paper_row = {c: paper.loc[method, c] for c in COLUMNS}
        got_row = {c: got.get(c, math.nan) for c in COLUMNS}
        std_row = {c: got.get(f"std_{c}", math.nan) for c in COLUMNS}
        diff_row = {c: got_row[c] - paper_row[c] for c in COLUMNS}
        seeds = int(got.get("seeds", 1))
        outside = [c for c in COLUMNS if t1.outside(diff_row[c], std_row[c], seeds, c)]
        meta = {"run_id": got["run_id"], "precision": got["precision"], "seeds": seeds, "outside": " ".join(outside)}
        label = LABELS[method]
        rows.append({"method": label, "row": "paper", **paper_row, "run_id": "", "precision": "fp32", "seeds": 0})
        rows.append({"method": label, "row": "measured", **got_row, **meta})
        if seeds > 1:
            rows.append({"method": label, "row": "std", **std_row, **meta})
        rows.append({"method": label, "row": "diff", **diff_row, **meta})
    return pd.DataFrame(rows).fillna({"outside": ""})


def print_table(console: Console, table: pd.DataFrame, title: str) -> None:
    view = Table(title=title, pad_edge=False)
    for column in ("method", "", "Face", "+-", "Gender", "Expression", "Age", "Exp. (x)", "Red. (x)"):
        view.add_column(column, justify="left" if column in ("method", "") else "right")
    for _, rows in table.groupby("method", sort=False):
        for i, (_, row) in enumerate(rows.iterrows()):
            flagged = str(row["outside"]).split() if row["row"] == "diff" else []
            cells = []
            for column in COLUMNS:
                value = row[column]
                digits = 3 if column in ("face", "face_std", "red") else 2
                if pd.isna(value):
                    cells.append("-" if row["row"] == "paper" else "n/a")
                elif row["row"] == "diff":
                    color = "green" if value > 0 else "red" if value < 0 else "white"
                    cells.append(f"[{color}]{value:+.{digits}f}[/]" + ("!" if column in flagged else ""))
                else:
                    cells.append(f"{value:.{digits}f}")
            view.add_row(row["method"] if i == 0 else "", row["row"], *cells, end_section=i == len(rows) - 1)
    console.print(view)


def run_pipeline(args, data_root: Path, console: Console) -> tuple[dict[str, dict], dict[str, float]]:
    """Every method's runs over the folds (each a multirun over the seeds); per method the mean over seeds of the
    folds' mean rows, and the wall time of each clrun command."""
    seeds = list(range(args.seed, args.seed + args.seeds))
    common = [f"data.root='{data_root}'", *args.overrides]
    sweep_dir = f"hydra.sweep.dir={args.runs_dir}"
    measured, seconds = {}, {}
    for method in args.methods:
        folders = {seed: [] for seed in seeds}
        for fold in range(args.folds):
            overrides = [*fold_overrides(method, fold, args.scale), *common]
            sweep = ["-m", *overrides, "seed=" + ",".join(map(str, seeds)), sweep_dir]
            seconds[f"{method} age{fold}"] = t1.run_clrun(sweep, console)
            for seed in seeds:
                folders[seed].append(t1.ROOT / t1.run_folder([*overrides, f"seed={seed}"], args.runs_dir))
        per_seed = [folds_row([measured_row(folder) for folder in folders[seed]]) for seed in seeds]
        measured[method] = t1.mean_row(per_seed)
    return measured, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    t1.add_common_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds (seed, seed+1, ...): mean +- std")
    parser.add_argument("--folds", type=int, default=FOLDS, help="age folds to run (the paper: all 5, averaged)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="a subset to run")
    parser.add_argument("--out", type=Path, help="the CSV (default benchmarks/results/table4-<scale>-<date>.csv)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    try:
        if args.seeds < 1 or not 1 <= args.folds <= FOLDS:
            raise t1.ReproduceError(f"--seeds must be at least 1 and --folds in 1..{FOLDS}")
        if args.data_root is None and args.scale == "smoke":
            data_root = smoke_data(args.runs_dir)
        else:
            data_root = check_faces(args.data_root or t1.default_data_root(), args.folds)
        start = time.perf_counter()
        measured, seconds = run_pipeline(args, data_root, console)
    except t1.ReproduceError as error:
        print(f"reproduce_table4: error: {error}", file=sys.stderr)
        return 2
    table = compare(load_paper(), measured)
    title = (
        f"CPG Table 4, facial-informatic tasks, SphereFace-20: paper vs measured (scale {args.scale}, "
        f"seeds {args.seed}..{args.seed + args.seeds - 1}, age folds 0..{args.folds - 1})"
    )
    print_table(console, table, title)
    precision = ", ".join(sorted(set(table.loc[table["row"] != "paper", "precision"])))
    notes = [
        "diff = measured - paper, in %. Face: LFW 10-fold verification accuracy after all four tasks, +- its std "
        f"over LFW's folds; Age: the mean over age folds 0..{args.folds - 1} (the paper: all 5); Face, Gender and "
        "Expression: the mean over the folds' runs (CPG trains them once).",
        "Exp.: the final width multiplier (CPG) or the T individual models (Scratch, Finetune); Red.: the share of "
        f"free weights. Precision: the paper's numbers are fp32; measured in {precision}.",
        t1.flag_note(table),
    ]
    for note in notes:
        console.print(f"[dim]{note}[/]")
    out = args.out or t1.RESULTS / f"table4-{args.scale}-{datetime.date.today().isoformat()}.csv"
    t1.write_table(table, out, console, seconds, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
