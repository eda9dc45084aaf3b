"""Reproduce PAH's benchmark table: PAH and the baselines clrun can run (SI) on Split-CIFAR100 or TinyImageNet.

Runs the `pah_split_cifar100` or `pah_tiny_imagenet_10` preset (the released code's setup: torchvision's
ImageNet-pretrained ResNet-18, AdamW, batch 64, 15 epochs per task) for each method as one Hydra multirun, then
prints the paper's final accuracy and forgetting (benchmarks/paper/pah_table.csv) beside the measured ones and
writes benchmarks/results/pah-<dataset>-<scale>-<date>.csv. The table's other rows (GCR, Dark Experience Replay,
CCLIS, A-GEM, HN-2, HN-3) wait for those methods (issue 16); PNN's columns cannot tap ResNet-18's skip
connections. Finished runs are reused.

    python benchmarks/reproduce_pah.py [--dataset cifar|tiny] [--scale full|smoke] [--data-root DIR] [KEY=VALUE ...]

`--scale smoke` runs `pah_smoke_<dataset>` (2 tasks, a quarter-width ResNet-18 without pretrained weights, 1
epoch): the pipeline on a CPU, at chance.
"""

import argparse
import datetime
import sys
import time
from pathlib import Path

import pandas as pd
import reproduce_table1 as t1
from rich.console import Console
from rich.table import Table

METHODS = ("pah", "si")  # the table's rows clrun can run on ResNet-18 (pnn's columns need a chain backbone)
PRESETS = {"cifar": "split_cifar100", "tiny": "tiny_imagenet_10"}  # conf/experiment/pah[_smoke]_<this>.yaml
DATA = {"cifar": "cifar-100-python", "tiny": "tiny-imagenet-200"}


def measured(run_dir: Path) -> dict:
    """A finished run's final average accuracy and forgetting, in %."""
    summary = pd.read_parquet(run_dir / "summary.parquet").iloc[0]
    return {"acc": 100 * summary["acc"], "forg": 100 * summary["forgetting"], "run_id": summary["run_id"]}


def compare(paper: pd.DataFrame, rows: dict[str, dict], dataset: str) -> pd.DataFrame:
    """Per method: the paper's and the measured accuracy and forgetting, and their differences."""
    out = []
    for method, got in rows.items():
        ref = paper.loc[method]
        acc, forg = ref[f"{dataset}_acc"], ref[f"{dataset}_forg"]
        out.append(
            {
                "method": ref["label"],
                "paper_acc": acc,
                "acc": got["acc"],
                "diff_acc": got["acc"] - acc,
                "paper_forg": forg,
                "forg": got["forg"],
                "diff_forg": got["forg"] - forg,
                "run_id": got["run_id"],
            }
        )
    return pd.DataFrame(out)


def print_table(console: Console, table: pd.DataFrame, title: str) -> None:
    view = Table(title=title)
    for column in ("method", "paper ACC", "ACC", "diff", "paper Forg.", "Forg.", "diff"):
        view.add_column(column, justify="right")
    for _, row in table.iterrows():
        cells = [row[c] for c in ("paper_acc", "acc", "diff_acc", "paper_forg", "forg", "diff_forg")]
        view.add_row(row["method"], *("n/a" if pd.isna(v) else f"{v:.2f}" for v in cells))
    console.print(view)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    t1.add_common_arguments(parser)
    parser.add_argument("--dataset", choices=tuple(PRESETS), default="cifar", help="Split-CIFAR100 or TinyImageNet")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, help="the CSV (default benchmarks/results/pah-<dataset>-<scale>-<date>)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    root = Path(args.data_root or t1.default_data_root()).expanduser().resolve()
    if not (root / DATA[args.dataset]).is_dir():
        print(f"reproduce_pah: error: {root / DATA[args.dataset]} not found; set --data-root", file=sys.stderr)
        return 2
    preset = f"pah_{'smoke_' if args.scale == 'smoke' else ''}{PRESETS[args.dataset]}"
    common = [f"experiment={preset}", f"seed={args.seed}", f"data.root='{root}'", *args.overrides]
    start = time.perf_counter()
    try:
        sweep = ["-m", "method=" + ",".join(args.methods), *common, f"hydra.sweep.dir={args.runs_dir}"]
        seconds = t1.run_clrun(sweep, console)
        rows = {m: measured(t1.ROOT / t1.run_folder([f"method={m}", *common], args.runs_dir)) for m in args.methods}
    except t1.ReproduceError as error:
        print(f"reproduce_pah: error: {error}", file=sys.stderr)
        return 2
    table = compare(pd.read_csv(t1.PAPER / "pah_table.csv").set_index("method"), rows, args.dataset)
    print_table(console, table, f"PAH's table, {preset}: paper vs measured (%)")
    out = args.out or t1.RESULTS / f"pah-{args.dataset}-{args.scale}-{datetime.date.today().isoformat()}.csv"
    t1.write_table(table, out, console, {"methods": seconds}, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
