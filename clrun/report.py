"""Reading and comparing many runs: `clrun-report [FOLDER ...]`.

Collects every finished run below the given folders (default `outputs/runs`),
adds each run's transfer against the `scratch` run of the same stream config, scenario, backbone
and seed, and prints the mean and standard deviation over seeds of each config
(runs that differ only in their seed share a `config_id`); names the unfinished runs and the failed jobs of
sweeps recorded below the folders first. `--where` selects runs, `--group-by` sets what is averaged together,
`--markdown`, `--latex` and `--csv` export the tables, `--plots` draws comparison plots (PNG and PDF).
"""

import argparse
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from rich.console import Console
from rich.table import Table

from clrun.naming import RUNS_DIR
from clrun.results import (
    ACCURACY_FILE,
    CHECKPOINT,
    PERCENT,
    SUMMARY_FILE,
    TASK_AWARE,
    accuracy_matrix,
    atomic_write,
    colors,
    matrix_rows,
    pyplot,
    write_parquet,
)
from clrun.sweeps import STATUS_FILE

GROUP = ["method", "stream", "scenario", "backbone", "config_id"]
PANEL = ["stream", "scenario", "backbone"]  # one printed table per value of these (those among the group columns)
COLUMNS = ["acc", "bwt", "forgetting", "task_aware_acc", "task_id_acc", "transfer_vs_scratch"]
COLUMNS += ["acc_all_steps", "bwt_all_steps", "fwt_all_steps"]  # the survey's A, BWT and FWT over all steps
COLUMNS += ["expansion", "model_mb", "memory_efficiency", "compute_efficiency", "wall_s"]
LOWER_IS_BETTER = {"forgetting", "expansion", "model_mb", "wall_s"}  # the other metrics: higher is better
RUNS = ("runs", "n")  # the aggregated table's count of runs per group


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


def stream_keys(summaries: pd.DataFrame) -> pd.Series:
    """Per run: its stream's whole config (its `cfg.stream.` columns, as JSON); the stream's name for runs
    recorded before those columns."""
    columns = [c for c in summaries if c.startswith("cfg.stream.")]

    def key(row) -> str:
        values = {c: row[c] for c in columns if not pd.isna(row[c])}
        return json.dumps(values, sort_keys=True, default=str) if values else row["stream"]

    return summaries.apply(key, axis=1) if len(summaries) else pd.Series(dtype=object)


def transfer_vs_scratch(summaries: pd.DataFrame, accuracy: pd.DataFrame) -> pd.Series:
    """Per run: mean_j (R[j, j] - scratch_j), scratch_j the `scratch` R[j, j] with the same stream config (all of
    it, not its name only), scenario, backbone and seed (the mean over such scratch runs if there are several);
    NaN where there is none."""
    accuracy = pd.concat([matrix_rows(rows) for _, rows in accuracy.groupby("run_id")], ignore_index=True)
    diagonal = accuracy[accuracy["train_task"] == accuracy["eval_task"]].copy()
    diagonal["stream_key"] = diagonal["run_id"].map(dict(zip(summaries["run_id"], stream_keys(summaries), strict=True)))
    keys = ["stream_key", "scenario", "backbone", "seed", "eval_task"]
    scratch = diagonal[diagonal["method"] == "scratch"].groupby(keys)["accuracy"].mean()
    transfer = {}
    for run_id, rows in diagonal.groupby("run_id"):
        reference = scratch.reindex(pd.MultiIndex.from_frame(rows[keys])).to_numpy()
        differences = rows["accuracy"].to_numpy() - reference
        transfer[run_id] = np.nanmean(differences) if not np.isnan(differences).all() else np.nan
    return summaries["run_id"].map(transfer)


def parse_pairs(text: str) -> dict[str, list[str]]:
    """`--where`'s `key=value,key=value` as {key: [values]} (a key given twice: either value)."""
    pairs: dict[str, list[str]] = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {text}: {item!r} is not key=value (e.g. --where method=cpg,stream=cifar100_20)")
        pairs.setdefault(key.strip(), []).append(value.strip())
    return pairs


def check_columns(summaries: pd.DataFrame, columns, option: str) -> None:
    """Raise a one-line ValueError naming the first of `columns` the summaries lack."""
    for column in columns:
        if column not in summaries:
            known = [c for c in summaries if not c.startswith("cfg.")]
            raise ValueError(
                f"{option}: no column {column!r} in the runs' summaries; there are {', '.join(known)} and the "
                "config's cfg.<key> columns (--out writes them all)"
            )


def select(summaries: pd.DataFrame, where: dict[str, list[str]]) -> pd.DataFrame:
    """The runs whose every `where` column reads as one of its values (compared as text)."""
    check_columns(summaries, where, "--where")
    chosen = pd.Series(True, index=summaries.index)
    for column, values in where.items():
        chosen &= summaries[column].astype(str).isin(values)
    return summaries[chosen]


def aggregate(summaries: pd.DataFrame, group: list[str] = GROUP) -> pd.DataFrame:
    """Mean and standard deviation over the runs of each group (default: a config's seeds) of each metric."""
    grouped = summaries.groupby(group, dropna=False)
    table = grouped[[c for c in COLUMNS if c in summaries]].agg(["mean", "std"])
    table[RUNS] = grouped.size()
    if "replay_budget" in summaries and "method" in group:  # runs before the key have none
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


def config_label(row: pd.Series, columns: list[str]) -> str:
    """A group's name from its values of `columns` (config_id shortened, the replay memory after the method)."""
    parts = []
    for column in columns:
        value = row[(column, "")]
        parts.append(str(value)[:4] if column == "config_id" else str(value))
        budget = row.get(("replay_budget", ""))
        if column == "method" and budget is not None and not pd.isna(budget):
            parts.append(f"memory {int(budget)}")
    return " ".join(parts) or "all runs"


def panels(table: pd.DataFrame, group: list[str]) -> list[tuple[str, pd.DataFrame, pd.DataFrame]]:
    """The aggregated table as one (title, means, stds) per stream, scenario and backbone (those in `group`): a row
    per metric, a column per group, percentages scaled to %."""
    panel = [c for c in PANEL if c in group]
    rest = [c for c in group if c not in panel]
    sort = [(c, "") for c in ["method", "replay_budget", *rest] if (c, "") in table]
    pieces = table.groupby([(c, "") for c in panel], dropna=False) if panel else [((), table)]
    result = []
    for values, rows in pieces:
        values = dict(zip(panel, values if isinstance(values, tuple) else (values,), strict=True))
        if panel == PANEL:
            title = f"{values['stream']} ({values['scenario']} scenario) / {values['backbone']}"
        else:
            title = ", ".join(f"{k}={v}" for k, v in values.items()) or "all runs"
        rows = rows.sort_values(sort) if sort else rows
        names = [
            f"{config_label(row, rest)} ({row[RUNS]} run{'' if row[RUNS] == 1 else 's'})" for _, row in rows.iterrows()
        ]
        metrics = [c for c in COLUMNS if (c, "mean") in rows]
        scale = np.array([[100.0 if c in PERCENT else 1.0] for c in metrics])
        means = pd.DataFrame([rows[(c, "mean")].to_numpy() for c in metrics], metrics, names) * scale
        stds = pd.DataFrame([rows[(c, "std")].to_numpy() for c in metrics], metrics, names) * scale
        result.append((f"{title}: mean±std over runs", means, stds))
    return result


def best(means: pd.DataFrame) -> pd.DataFrame:
    """Per metric row, whether each cell holds the best mean as shown (2 decimals; ties all best)."""
    shown = means.round(2)
    top = [shown.loc[m].min() if m in LOWER_IS_BETTER else shown.loc[m].max() for m in shown.index]
    return shown.eq(pd.Series(top, index=shown.index), axis=0)


def cells(means: pd.DataFrame, stds: pd.DataFrame, plus_minus: str = "±") -> pd.DataFrame:
    """`mean±std` text per cell (`n/a` where not measured), the metric labels as the index."""
    text = [[_cell(m, sd, plus_minus) for m, sd in zip(means.loc[i], stds.loc[i], strict=True)] for i in means.index]
    return pd.DataFrame(text, index=[LABELS[i] for i in means.index], columns=means.columns)


def _cell(mean: float, std: float, plus_minus: str) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.2f}" + ("" if np.isnan(std) else f"{plus_minus}{std:.2f}")


def print_table(console: Console, table: pd.DataFrame, group: list[str] = GROUP) -> None:
    """Print one table per stream and backbone: a column per config, a row per metric (mean±std over seeds)."""
    for title, means, stds in panels(table, group):
        view = Table(title=title)
        view.add_column("metric")
        for name in means.columns:
            view.add_column(name, justify="right")
        for label, row in cells(means, stds).iterrows():
            view.add_row(label, *row)
        console.print(view)


def to_markdown(table: pd.DataFrame, group: list[str]) -> str:
    """The printed tables as Markdown, a `##` heading each, the best value of each metric in bold."""
    parts = []
    for title, means, stds in panels(table, group):
        text = cells(means, stds)
        text = text.mask(best(means).rename(index=LABELS).to_numpy(), "**" + text + "**")
        parts.append(f"## {title}\n\n{text.rename_axis('metric').to_markdown()}\n")
    return "\n".join(parts)


def to_latex(table: pd.DataFrame, group: list[str]) -> str:
    """The printed tables as LaTeX (booktabs rules, one `table` each), the best value of each metric in bold."""
    parts = []
    for title, means, stds in panels(table, group):
        text = cells(means, stds, plus_minus=r" $\pm$ ")
        bold = best(means).to_numpy()
        styler = text.style
        styler = styler.apply(lambda _, bold=bold: np.where(bold, "textbf:--rwrap;", ""), axis=None)
        styler = styler.format_index(escape="latex", axis=0).format_index(escape="latex", axis=1)
        parts.append(
            styler.to_latex(
                hrules=True, caption=title.replace("±", r"$\pm$"), column_format="l" + "r" * len(text.columns)
            )
        )
    return "\n".join(parts)


def flat(table: pd.DataFrame) -> pd.DataFrame:
    """The aggregated table with one level of column names (`acc_mean`, `acc_std`, `runs_n`), values as in
    summary.parquet (fractions, not %)."""
    return table.set_axis(["_".join(filter(None, c)) for c in table.columns], axis=1)


def group_matrices(summaries: pd.DataFrame, accuracy: pd.DataFrame, group: list[str]) -> list[np.ndarray]:
    """Per row of `aggregate(summaries, group)`: the mean over its runs of their headline accuracy matrices
    (padded with NaN to the longest stream)."""
    size = int(summaries["n_tasks"].max()) if "n_tasks" in summaries else int(accuracy["eval_task"].max()) + 1
    by_run = {run_id: accuracy_matrix(rows, size) for run_id, rows in accuracy.groupby("run_id")}
    result = []
    for _, runs in summaries.groupby(group, dropna=False):
        stack = np.stack([by_run[r] for r in runs["run_id"] if r in by_run])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # the mean of cells no run measured: NaN
            result.append(np.nanmean(stack, axis=0))
    return result


def plot_labels(table: pd.DataFrame, group: list[str]) -> list[str]:
    """A name per group from the group columns whose values differ between groups (all of them if none do)."""
    varying = [c for c in group if table[(c, "")].nunique(dropna=False) > 1] or group
    return [config_label(row, varying) for _, row in table.iterrows()]


def save_figure(fig, folder: Path, name: str) -> None:
    """`fig` as `folder/name.png` and `folder/name.pdf`, then closed."""
    for fmt in ("png", "pdf"):
        atomic_write(
            folder / f"{name}.{fmt}", lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
        )
    pyplot().close(fig)


def save_plots(table: pd.DataFrame, matrices: list[np.ndarray], labels: list[str], tasks: list[int], folder: Path):
    """Comparison plots in `folder`: `task_accuracy` (each of `tasks`' accuracy after each later task, a line per
    group: CPG's Fig. 2), `accuracy_vs_size` (final ACC against the stored model's MB) and `accuracy_matrices`
    (a heat map per group); PNG and PDF each."""
    from matplotlib.ticker import MaxNLocator

    plt = pyplot()
    palette = colors(len(labels))
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks) + 2, 3.5), squeeze=False)
    for ax, j in zip(axes[0], tasks, strict=True):
        for R, label, color in zip(matrices, labels, palette, strict=True):
            if j < len(R) and not np.isnan(R[j:, j]).all():
                ax.plot(range(j, len(R)), R[j:, j] * 100, marker="o", markersize=3, color=color, label=label)
        ax.set_title(f"task {j}", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("after training task i")
        ax.set_ylabel("accuracy (%)")
    axes[0, -1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    save_figure(fig, folder, "task_accuracy")

    fig, ax = plt.subplots(figsize=(6, 4))
    for (_, row), label, color in zip(table.iterrows(), labels, palette, strict=True):
        x, y, err = row[("model_mb", "mean")], row[("acc", "mean")] * 100, row[("acc", "std")] * 100
        ax.errorbar(x, y, yerr=None if np.isnan(err) else err, fmt="o", color=color, capsize=3, label=label)
    ax.set_xlabel("stored model (MB)")
    ax.set_ylabel("final ACC (%)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1), borderaxespad=0)
    save_figure(fig, folder, "accuracy_vs_size")

    columns = min(4, len(matrices))
    rows = math.ceil(len(matrices) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 1, 3 * rows), squeeze=False, layout="constrained")
    for ax in axes.flat[len(matrices) :]:
        ax.axis("off")
    for ax, R, label in zip(axes.flat, matrices, labels, strict=False):
        image = ax.imshow(np.ma.masked_invalid(R * 100), vmin=0, vmax=100, cmap="viridis")
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("evaluated task j", fontsize=7)
        ax.set_ylabel("after task i", fontsize=7)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.colorbar(image, ax=axes.ravel().tolist(), label="accuracy (%)")
    save_figure(fig, folder, "accuracy_matrices")


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
    parser.add_argument("folders", nargs="*", type=Path, default=[Path(RUNS_DIR)])
    parser.add_argument("--where", default="", help="only the runs whose columns hold these values: method=cpg,seed=0")
    parser.add_argument("--group-by", default=",".join(GROUP), help=f"columns to average within (default {GROUP})")
    parser.add_argument("--out", type=Path, help="also write the per-run table (with transfer) to this parquet file")
    parser.add_argument("--markdown", type=Path, help="write the tables to this Markdown file (best values bold)")
    parser.add_argument("--latex", type=Path, help="write the tables to this LaTeX file (booktabs, best values bold)")
    parser.add_argument("--csv", type=Path, help="write the aggregated table (one row per group) to this CSV file")
    parser.add_argument("--plots", type=Path, help="draw comparison plots into this folder (PNG and PDF)")
    parser.add_argument("--tasks", default="0", help="the tasks --plots follows across the stream (default 0): 0,5")
    args = parser.parse_args(argv)
    summaries, accuracy = load_runs(args.folders)
    console = Console()
    print_unfinished(console, *unfinished_and_failed(args.folders))
    if summaries.empty:
        parser.exit(
            2, f"clrun-report: error: no finished runs ({SUMMARY_FILE}) below {', '.join(map(str, args.folders))}\n"
        )
    summaries["transfer_vs_scratch"] = transfer_vs_scratch(summaries, accuracy)  # before --where: scratch may go
    group = [c.strip() for c in args.group_by.split(",") if c.strip()]
    try:
        tasks = [int(t) for t in args.tasks.split(",")]
        summaries = select(summaries, parse_pairs(args.where))
        check_columns(summaries, group, "--group-by")
    except ValueError as error:
        message = str(error) if str(error).startswith("--") else f"--tasks {args.tasks}: not task numbers (e.g. 0,5)"
        parser.exit(2, f"clrun-report: error: {message}\n")
    if summaries.empty:
        parser.exit(2, f"clrun-report: error: no run matches --where {args.where}\n")
    table = aggregate(summaries, group)
    if args.plots:
        matrices = group_matrices(summaries, accuracy[accuracy["run_id"].isin(summaries["run_id"])], group)
        longest = max(len(R) for R in matrices)
        if any(not 0 <= t < longest for t in tasks):
            parser.exit(2, f"clrun-report: error: --tasks {args.tasks}: the runs have tasks 0..{longest - 1}\n")
    print_table(console, table, group)
    if args.out:
        write_parquet(summaries, args.out)
    for path, write in (
        (args.markdown, lambda tmp: Path(tmp).write_text(to_markdown(table, group))),
        (args.latex, lambda tmp: Path(tmp).write_text(to_latex(table, group))),
        (args.csv, lambda tmp: flat(table).to_csv(tmp, index=False)),
    ):
        if path:
            atomic_write(path, write)
    if args.plots:
        save_plots(table, matrices, plot_labels(table, group), tasks, args.plots)
        console.print(f"plots: {args.plots}")
