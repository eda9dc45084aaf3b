"""Reading and comparing many runs: `clrun-report [FOLDER ...]`.

Collects every finished run below the given folders (default `outputs/runs`),
adds each run's transfer against the `scratch` run of the same stream, backbone
and seed, and prints the mean and standard deviation over seeds of each config
(runs that differ only in their seed share a `config_id`); names the unfinished runs and the failed jobs of
sweeps recorded below the folders first.
"""

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from clrun.results import ACCURACY_FILE, PERCENT, SUMMARY_FILE, TASK_AWARE, matrix_rows, write_parquet
from clrun.run import CHECKPOINT
from clrun.sweeps import STATUS_FILE

GROUP = ["method", "stream", "scenario", "backbone", "config_id"]
COLUMNS = ["acc", "bwt", "forgetting", "task_aware_acc", "task_id_acc", "transfer_vs_scratch"]
COLUMNS += ["acc_all_steps", "bwt_all_steps", "fwt_all_steps"]  # the survey's A, BWT and FWT over all steps
COLUMNS += ["expansion", "model_mb", "memory_efficiency", "compute_efficiency", "wall_s"]


def load_runs(folders: list[Path]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Summary rows and accuracy rows of every finished run below `folders`."""
    run_dirs = sorted({p.parent for folder in folders for p in Path(folder).rglob(SUMMARY_FILE)})
    if not run_dirs:
        return pd.DataFrame(), pd.DataFrame()
    summaries = pd.concat([pd.read_parquet(d / SUMMARY_FILE) for d in run_dirs], ignore_index=True)
    accuracy = pd.concat([pd.read_parquet(d / ACCURACY_FILE) for d in run_dirs], ignore_index=True)
    for table, column, old in (
        (summaries, "scenario", "task"),
        (accuracy, "scenario", "task"),
        (accuracy, "eval_mode", TASK_AWARE),
    ):
        table[column] = table[column].fillna(old) if column in table else old  # runs from before scenarios
    return summaries, accuracy


def transfer_vs_scratch(summaries: pd.DataFrame, accuracy: pd.DataFrame) -> pd.Series:
    """Per run: mean_j (R[j, j] - scratch_j), scratch_j the `scratch` R[j, j] with the same stream, scenario,
    backbone and seed (the mean over such scratch runs if there are several); NaN where there is none."""
    accuracy = pd.concat([matrix_rows(rows) for _, rows in accuracy.groupby("run_id")], ignore_index=True)
    diagonal = accuracy[accuracy["train_task"] == accuracy["eval_task"]]
    keys = ["stream", "scenario", "backbone", "seed", "eval_task"]
    scratch = diagonal[diagonal["method"] == "scratch"].groupby(keys)[["accuracy"]].mean()
    transfer = {}
    for run_id, rows in diagonal.groupby("run_id"):
        keys = list(
            zip(rows["stream"], rows["scenario"], rows["backbone"], rows["seed"], rows["eval_task"], strict=True)
        )
        reference = scratch["accuracy"].reindex(keys).to_numpy()
        differences = rows["accuracy"].to_numpy() - reference
        transfer[run_id] = np.nanmean(differences) if not np.isnan(differences).all() else np.nan
    return summaries["run_id"].map(transfer)


def aggregate(summaries: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over seeds of each metric, per config (method, stream, backbone, config_id)."""
    grouped = summaries.groupby(GROUP)
    table = grouped[[c for c in COLUMNS if c in summaries]].agg(["mean", "std"])
    table[("seeds", "n")] = grouped.size()
    if "replay_budget" in summaries:  # runs before the key have none
        table[("replay_budget", "")] = grouped["replay_budget"].first()
    return table.reset_index()


LABELS = {
    "acc": "ACC %",
    "bwt": "BWT %",
    "forgetting": "forgetting %",
    "task_aware_acc": "task-aware ACC %",
    "task_id_acc": "task id right %",
    "transfer_vs_scratch": "vs scratch %",
    "acc_all_steps": "A (all steps) %",
    "bwt_all_steps": "BWT all steps %",
    "fwt_all_steps": "FWT all steps %",
    "expansion": "expansion",
    "model_mb": "model MB",
    "memory_efficiency": "MS",
    "compute_efficiency": "CE",
    "wall_s": "wall s",
}


def print_table(console: Console, table: pd.DataFrame) -> None:
    """Print one table per stream and backbone: a column per method, a row per metric (mean±std over seeds)."""
    for (stream, scenario, backbone), rows in table.groupby([("stream", ""), ("scenario", ""), ("backbone", "")]):
        view = Table(title=f"{stream} ({scenario} scenario) / {backbone}: mean±std over seeds")
        view.add_column("metric")
        rows = rows.sort_values([c for c in [("method", ""), ("replay_budget", "")] if c in rows])
        for _, row in rows.iterrows():
            budget = row.get(("replay_budget", ""))
            memory = "" if budget is None or pd.isna(budget) else f" memory {int(budget)}"
            name = f"{row[('method', '')]}{memory} {row[('config_id', '')][:4]}"
            view.add_column(f"{name} ({row[('seeds', 'n')]} seeds)", justify="right")
        for column in [c for c in COLUMNS if (c, "mean") in rows]:
            scale = 100 if column in PERCENT else 1
            cells = []
            for _, row in rows.iterrows():
                mean, std = row[(column, "mean")] * scale, row[(column, "std")] * scale
                cells.append("n/a" if np.isnan(mean) else f"{mean:.2f}" + ("" if np.isnan(std) else f"±{std:.2f}"))
            view.add_row(LABELS[column], *cells)
        console.print(view)


def unfinished_and_failed(folders: list[Path]) -> tuple[list[Path], pd.DataFrame]:
    """Run folders below `folders` with a checkpoint but no summary (stopped or still running), and the failed
    jobs of the sweeps recorded there (`clrun.sweeps`' status tables; a job that succeeded later left out)."""
    unfinished = sorted(
        {p.parent.parent for f in folders for p in Path(f).rglob(CHECKPOINT.name) if p.parent.name == "checkpoints"}
    )
    unfinished = [d for d in unfinished if not (d / SUMMARY_FILE).exists()]
    statuses = [pd.read_csv(p, keep_default_na=False) for f in folders for p in sorted(Path(f).rglob(STATUS_FILE))]
    if not statuses:
        return unfinished, pd.DataFrame(columns=["overrides", "error"])
    jobs = pd.concat(statuses, ignore_index=True).drop_duplicates("overrides", keep="last")  # each job's last try
    return unfinished, jobs[jobs["status"] == "failed"][["overrides", "error"]]


def print_unfinished(console: Console, unfinished: list[Path], failed: pd.DataFrame) -> None:
    """Name the runs without results: unfinished folders, failed sweep jobs with their error."""
    for run_dir in unfinished:
        console.print(f"unfinished (no {SUMMARY_FILE}; the same command resumes it): {run_dir}", soft_wrap=True)
    for job in failed.itertuples():
        console.print(f"failed in a sweep: {job.overrides}: {job.error}", soft_wrap=True)


def main(argv: list[str] | None = None) -> None:
    """The `clrun-report` command."""
    parser = argparse.ArgumentParser(prog="clrun-report", description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, default=[Path("outputs/runs")])
    parser.add_argument("--out", type=Path, help="also write the per-run table (with transfer) to this parquet file")
    args = parser.parse_args(argv)
    summaries, accuracy = load_runs(args.folders)
    console = Console()
    print_unfinished(console, *unfinished_and_failed(args.folders))
    if summaries.empty:
        parser.exit(
            2, f"clrun-report: error: no finished runs ({SUMMARY_FILE}) below {', '.join(map(str, args.folders))}\n"
        )
    summaries["transfer_vs_scratch"] = transfer_vs_scratch(summaries, accuracy)
    print_table(console, aggregate(summaries))
    if args.out:
        write_parquet(summaries, args.out)
