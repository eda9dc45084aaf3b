"""The growing and gating architectures side by side on real MNIST: accuracy, BWT, expansion, wall time.

Runs `clrun -m method=<methods> stream=<stream> backbone=<backbone, mlp> method.train.iterations=N` (each
method with its own recipe otherwise) as one Hydra multirun, prints a table and writes
benchmarks/results/architectures-<stream>-<N>it-<date>.csv. Finished runs are not retrained.

    python benchmarks/architectures_mnist.py [--stream split_mnist] [--scenario task] [--iterations 500]
        [--methods ...] [--data-root DIR] [--seed N] [--backbone mlp] [KEY=VALUE ...]

`--scenario class|domain` runs the stream in that scenario (methods that do not support it stop the multirun:
name the ones that do) and adds it to the CSV's name.
"""

import argparse
import datetime
import sys
from pathlib import Path

import pandas as pd
from reproduce_table1 import ReproduceError, default_data_root, run_clrun
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
METHODS = (
    "finetune",
    "pnn",
    "side_tuning",
    "hat",
    "xdg",
    "den",
    "ccgn",
    "expert_gate",
    "der",
    "pathnet",
    "dan",
    "clnp",
    "learn_to_grow",
    "gim",
    "rcl",
    "cleas",
    "rps_net",
    "mntdp",
)
COLUMNS = ["acc", "bwt", "forgetting", "expansion", "model_mb", "memory_efficiency", "compute_efficiency", "wall_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stream", default="split_mnist")
    parser.add_argument("--scenario", default="task", choices=["task", "class", "domain"])
    parser.add_argument("--iterations", type=int, default=500, help="iterations per task (each training phase)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--data-root", default=default_data_root(), help="folder holding MNIST/raw")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="mlp", help="e.g. lstm (images read row by row: gim's modules)")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
    args = parser.parse_args()
    console = Console()
    backbone = "" if args.backbone == "mlp" else f"{args.backbone}-"
    label = f"{args.stream}-{backbone}{args.iterations}it" + ("" if args.scenario == "task" else f"-{args.scenario}")
    runs_dir = ROOT / "outputs" / "bench" / f"architectures-{label}"
    command = [
        "-m",
        f"method={','.join(args.methods)}",
        f"stream={args.stream}",
        f"backbone={args.backbone}",
        f"stream.scenario={args.scenario}",
        f"method.train.iterations={args.iterations}",
        f"data.root={Path(args.data_root).expanduser().resolve()}",
        f"seed={args.seed}",
        *args.overrides,
        f"hydra.sweep.dir={runs_dir}",
    ]
    try:
        run_clrun(command, console)
    except ReproduceError as error:
        sys.exit(f"architectures_mnist: error: {error}")
    table = pd.concat([pd.read_parquet(p) for p in sorted(runs_dir.rglob("summary.parquet"))], ignore_index=True)
    table = table[table["method"].isin(args.methods)].reindex(
        columns=["method", "stream", "scenario", "seed", *COLUMNS]
    )
    view = Table(
        title=f"{args.stream} ({args.scenario} scenario), {args.backbone}, {args.iterations} iterations per task"
    )
    for column in ["method", "ACC %", "BWT %", "forgetting %", "expansion", "model MB", "MS", "CE", "wall s"]:
        view.add_column(column, justify="left" if column == "method" else "right")
    for _, row in table.iterrows():
        percent = [f"{row[c] * 100:.2f}" for c in ("acc", "bwt", "forgetting")]
        plain = [f"{row[c]:.2f}" for c in ("expansion", "model_mb", "memory_efficiency", "compute_efficiency")]
        view.add_row(row["method"], *percent, *plain, f"{row['wall_s']:.0f}")
    console.print(view)
    out = RESULTS / f"architectures-{label}-{datetime.date.today()}.csv"
    table.to_csv(out, index=False, float_format="%.4f")
    console.print(f"results: {out}")


if __name__ == "__main__":
    main()
