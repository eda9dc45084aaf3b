"""Every method in the task, domain and class scenarios on van de Ven's split and permuted MNIST protocols.

Runs the `conf/experiment/vdv_<protocol>_<scenario>` presets (per-method values from conf/tuning/) as one
Hydra multirun per protocol, then prints each method's final average accuracy beside the published one
(benchmarks/paper/vdv_mnist.csv: van de Ven & Tolias, "Generative replay with feedback connections",
1809.10635, Tables 3-4 of its ICLR 2019 submission text, the same protocol and code base; each row's `source`
column says where it was checked, and is printed under each table) and writes
benchmarks/results/scenarios-mnist-<label>-<date>.csv. Finished runs are not retrained.

    python benchmarks/scenarios_mnist.py [--protocols split_mnist permuted_mnist] [--methods ...]
        [--scenarios task domain class] [--iterations N] [--n-tasks N] [--test-per-task N] [--budgets N ...]
        [--data-root DIR] [--seed N] [KEY=VALUE ...]

`--iterations`, `--n-tasks` and `--test-per-task` shorten the protocol (for a CPU); `--budgets 200 500` runs
every replay method (one whose memory is not empty by default) at each of these `replay.budget`s, a row per
method and budget; the label of the results file says so.
"""

import argparse
import datetime
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from reproduce_table1 import ReproduceError, default_data_root, run_clrun
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
PAPER = Path(__file__).resolve().parent / "paper" / "vdv_mnist.csv"
RESULTS = Path(__file__).resolve().parent / "results"
SCENARIOS = ("task", "domain", "class")
# per-task methods run in the domain and class scenarios with task_id=entropy (conf/tuning/)
METHODS = (
    "finetune",
    "joint",
    "ewc",
    "online_ewc",
    "si",
    "mas",
    "lwf",
    "er",
    "gem",
    "agem",
    "dgr",
    "dgr_distill",
    "dark_er",
    "dark_er_pp",
    "gcr",
    "scratch",
    "hn",
    "partial_hn",
    "pah",
    "icarl",
    "cclis",
)
# methods van de Ven's tables (and clrun) run in some scenarios only; the others run in all three
ONLY_IN = {"icarl": ("class",), "cclis": ("class",)}
COLUMNS = ["acc", "bwt", "forgetting", "task_aware_acc", "task_id_acc", "expansion", "wall_s"]


def replays(method: str) -> bool:
    """Whether `method` (a conf/method name) keeps a replay memory that is not empty by default."""
    from clrun.cli import compose
    from clrun.config import import_target

    cfg = compose([f"method={method}"]).method
    key = import_target(cfg._target_, "method._target_").budget_key()
    return key is not None and bool(OmegaConf.select(cfg, key))


def run_protocol(
    protocol: str,
    methods: list[str],
    runs_dir: Path,
    overrides: list[str],
    budgets: list[int],
    scenarios: tuple[str, ...],
    console: Console,
) -> float:
    """One multirun per set of scenarios (`ONLY_IN`; all three for most methods) and, with `budgets`, per
    replay or not: every method in each of its scenarios of `protocol` (replay methods at each budget); return
    their wall time."""
    groups: dict[tuple[tuple[str, ...], bool], list[str]] = {}
    for method in methods:
        groups.setdefault((ONLY_IN.get(method, SCENARIOS), bool(budgets) and replays(method)), []).append(method)
    folders = [f"hydra.sweep.dir={runs_dir}", "hydra.run.dir=" + str(runs_dir / "${clrun_run_name:}")]
    seconds = 0.0
    for (allowed, replaying), group in groups.items():
        if not (chosen := [s for s in allowed if s in scenarios]):
            continue
        experiments = ",".join(f"vdv_{protocol}_{scenario}" for scenario in chosen)
        sizes = [f"replay.budget={','.join(map(str, budgets))}"] if replaying else []
        seconds += run_clrun(
            ["-m", f"experiment={experiments}", f"method={','.join(group)}", *sizes, *overrides, *folders], console
        )
    return seconds


def collect(runs_dir: Path) -> pd.DataFrame:
    """The summary rows of the finished runs below `runs_dir`, with the published accuracy beside each."""
    summaries = [pd.read_parquet(path) for path in sorted(runs_dir.rglob("summary.parquet"))]
    if not summaries:
        raise ReproduceError(f"no finished runs below {runs_dir}")
    table = pd.concat(summaries, ignore_index=True).rename(columns={"stream": "protocol"})
    paper = pd.read_csv(PAPER).rename(
        columns={"acc": "published_acc", "sem": "published_sem", "source": "published_source"}
    )
    table = table.merge(paper, on=["protocol", "scenario", "method"], how="left")
    published = ["published_acc", "published_sem", "published_source"]
    keep = ["protocol", "scenario", "method", "replay_budget", "seed", "n_tasks", *COLUMNS, *published]
    return table[[c for c in keep if c in table]]


def show(table: pd.DataFrame, console: Console) -> None:
    """A table per protocol: a row per method, per scenario the measured ACC (published ACC)."""
    for protocol, rows in table.groupby("protocol"):
        sources = sorted(rows["published_source"].dropna().unique()) if "published_source" in rows else []
        caption = "published: " + " | ".join(sources) if sources else None
        view = Table(title=f"{protocol}: final average accuracy %, measured (published)", caption=caption)
        view.add_column("method")
        for scenario in SCENARIOS:
            view.add_column(scenario, justify="right")
        budgets = rows["replay_budget"] if "replay_budget" in rows else pd.Series(None, index=rows.index)
        rows = rows.assign(budget=budgets.map(lambda b: "" if pd.isna(b) else f" (memory {int(b)})"))
        for method, budget in sorted(
            set(zip(rows["method"], rows["budget"], strict=True)),
            key=lambda mb: (METHODS.index(mb[0]), len(mb[1]), mb[1]),
        ):
            cells = []
            for scenario in SCENARIOS:
                match = rows[(rows["method"] == method) & (rows["budget"] == budget) & (rows["scenario"] == scenario)]
                if match.empty:
                    cells.append("")
                    continue
                row = match.iloc[0]
                published = "" if pd.isna(row["published_acc"]) else f" ({row['published_acc']:.2f})"
                cells.append(f"{row['acc'] * 100:.2f}{published}")
            view.add_row(method + budget, *cells)
        console.print(view)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--protocols", nargs="+", default=["split_mnist", "permuted_mnist"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--iterations", type=int, help="iterations per task (default: the protocol's)")
    parser.add_argument("--n-tasks", type=int, help="tasks of the stream (default: the protocol's)")
    parser.add_argument("--test-per-task", type=int, help="test images per task (default: all)")
    parser.add_argument("--data-root", default=default_data_root(), help="folder holding MNIST/raw")
    parser.add_argument("--budgets", nargs="+", type=int, default=[], help="replay.budget values of replay methods")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    console = Console()
    label = "protocol"
    overrides = [f"data.root={Path(args.data_root).expanduser().resolve()}", f"seed={args.seed}", *args.overrides]
    if args.iterations:
        overrides.append(f"method.train.iterations={args.iterations}")
        label = f"{args.iterations}it"
    if args.n_tasks:
        overrides.append(f"stream.n_tasks={args.n_tasks}")
        label += f"-{args.n_tasks}tasks"
    if args.test_per_task:
        overrides.append(f"stream.test_per_task={args.test_per_task}")
        label += f"-{args.test_per_task}test"
    if args.budgets:
        label += "-budgets" + "-".join(map(str, args.budgets))
    if set(args.scenarios) != set(SCENARIOS):
        label += "-" + "-".join(args.scenarios)
    runs_dir = ROOT / "outputs" / "bench" / f"scenarios-mnist-{label}"
    try:
        for protocol in args.protocols:
            seconds = run_protocol(protocol, args.methods, runs_dir, overrides, args.budgets, args.scenarios, console)
            console.print(f"{protocol}: {seconds:.0f} s")
        table = collect(runs_dir)
    except ReproduceError as error:
        sys.exit(f"scenarios_mnist: error: {error}")
    show(table, console)
    out = RESULTS / f"scenarios-mnist-{label}-{datetime.date.today()}.csv"
    table.to_csv(out, index=False, float_format="%.4f")
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
