"""Reproduce PAH's benchmark table: PAH and the baselines clrun can run (SI) on Split-CIFAR100 or TinyImageNet.

Runs the `pah_split_cifar100` or `pah_tiny_imagenet_10` preset (the released code's setup: torchvision's
ImageNet-pretrained ResNet-18, AdamW, batch 64, 15 epochs per task) for each method as one Hydra multirun, then
prints the paper's final accuracy and forgetting (benchmarks/paper/pah_table.csv) beside the measured ones and
writes benchmarks/results/pah-<dataset>-<scale>-<date>.csv. The replay methods (Dark Experience Replay, GCR,
CCLIS, A-GEM) run under `pah_buffer200_<dataset>` (the same protocol, `replay.budget: 200`, the table's buffer),
one multirun per preset; HN-2 and HN-3 (`partial_hn`, which keeps no memory: the table's "200-400" is not
explained by its code) and SI under the plain preset. PNN's columns cannot tap ResNet-18's skip connections.
Finished runs are reused.

    python benchmarks/reproduce_pah.py [--dataset cifar|tiny] [--scale full|smoke] [--data-root DIR] [--seeds N]
        [KEY=VALUE ...]

`--seeds N` runs seeds seed..seed+N-1 in the same multirun and prints mean +- std per cell, flagging with ! each
difference whose paper value lies outside mean +- 2 std (one seed: beyond 2 points).

`--ablation` instead sweeps PAH alone over prototype sizes x semantic / random prototype initialisation x L_sp on
and off x lambda_sm values (one multirun; `--sizes`, `--lambda-sm`) and prints each run beside the poster's
ablation values where there is one (benchmarks/paper/pah_ablation.csv: sizes 5/10/16/20, random init).

`--scale smoke` runs `pah_smoke_<dataset>` (2 tasks, a quarter-width ResNet-18 without pretrained weights, 1
epoch): the pipeline on a CPU, at chance.
"""

import argparse
import datetime
import itertools
import sys
import time
from pathlib import Path

import pandas as pd
import reproduce_table1 as t1
from rich.console import Console
from rich.table import Table
from scenarios_mnist import replays

# the table's rows clrun can run on ResNet-18 (pnn: a chain backbone), in the table's order
METHODS = ("gcr", "dark_er", "cclis", "si", "agem", "hn2", "hn3", "pah")
PRESETS = {"cifar": "split_cifar100", "tiny": "tiny_imagenet_10"}  # conf/experiment/pah[_smoke]_<this>.yaml
DATA = {"cifar": "cifar-100-python", "tiny": "tiny-imagenet-200"}


def measured(run_dir: Path) -> dict:
    """A finished run's final average accuracy and forgetting, in %."""
    summary = pd.read_parquet(run_dir / "summary.parquet").iloc[0]
    return {"acc": 100 * summary["acc"], "forg": 100 * summary["forgetting"], "run_id": summary["run_id"]}


def compare(paper: pd.DataFrame, rows: dict[str, dict], dataset: str) -> pd.DataFrame:
    """Per method: the paper's and the measured (mean over seeds) accuracy and forgetting, their std over seeds,
    the differences, and `outside`: the columns whose paper value lies outside mean +- 2 std (one seed: beyond
    reproduce_table1's tolerance)."""
    out = []
    for method, got in rows.items():
        ref = paper.loc[method]
        row = {"method": ref["label"]}
        for column in ("acc", "forg"):
            reference = ref[f"{dataset}_{column}"]
            row.update({f"paper_{column}": reference, column: got[column], f"std_{column}": got[f"std_{column}"]})
            row[f"diff_{column}"] = got[column] - reference
        seeds = int(got["seeds"])
        flagged = [c for c in ("acc", "forg") if t1.outside(row[f"diff_{c}"], row[f"std_{c}"], seeds, c)]
        out.append({**row, "seeds": seeds, "outside": " ".join(flagged), "run_id": got["run_id"]})
    return pd.DataFrame(out)


def _value(row, column: str) -> str:
    value, std = row[column], row.get(f"std_{column}")
    if pd.isna(value):
        return "n/a"
    return f"{value:.2f}" + (f" +- {std:.2f}" if std is not None and not pd.isna(std) else "")


def print_table(console: Console, table: pd.DataFrame, title: str) -> None:
    view = Table(title=title)
    for column in ("method", "paper ACC", "ACC", "diff", "paper Forg.", "Forg.", "diff"):
        view.add_column(column, justify="right")
    for _, row in table.iterrows():
        flagged = str(row["outside"]).split()
        cells = []
        for column in ("acc", "forg"):
            diff = row[f"diff_{column}"]
            cells += [_value(row, f"paper_{column}"), _value(row, column)]
            cells.append("n/a" if pd.isna(diff) else f"{diff:+.2f}" + ("!" if column in flagged else ""))
        view.add_row(row["method"], *cells)
    console.print(view)
    console.print(f"[dim]{t1.seeds_note(sorted(set(table['seeds'])))}[/]")


ABLATION_KEYS = ("prototype_size", "semantic_init", "lambda_sp", "lambda_sm")


def measured_seeds(overrides: list[str], seeds: list[int], runs_dir: Path) -> dict:
    """The mean (and std, `seeds`) over seeds of the runs of `overrides`."""
    return t1.mean_row([measured(t1.ROOT / t1.run_folder([*overrides, f"seed={s}"], runs_dir)) for s in seeds])


def ablation(args, common: list[str], seeds: list[int], console: Console) -> tuple[pd.DataFrame, float]:
    """One multirun of PAH over the ablation grid and the seeds; each setting's values, its measured ACC and
    forgetting (mean and std over seeds), and the poster's where it has them (the default lambdas)."""
    grid = {
        "prototype_size": args.sizes,
        "semantic_init": ["true", "false"],
        "lambda_sp": [1.0, 0.0],
        "lambda_sm": args.lambda_sm,
    }
    sweep = [f"method.{key}=" + ",".join(map(str, values)) for key, values in grid.items()]
    seed_sweep = "seed=" + ",".join(map(str, seeds))
    seconds = t1.run_clrun(
        ["-m", "method=pah", *sweep, seed_sweep, *common, f"hydra.sweep.dir={args.runs_dir}"], console
    )
    paper = pd.read_csv(t1.PAPER / "pah_ablation.csv")
    rows = []
    for values in itertools.product(*grid.values()):
        setting = dict(zip(ABLATION_KEYS, values, strict=True))
        overrides = ["method=pah", *(f"method.{k}={v}" for k, v in setting.items()), *common]
        row = {**setting, "semantic_init": setting["semantic_init"] == "true"}
        row.update(measured_seeds(overrides, seeds, args.runs_dir))
        same = (paper["prototype_size"] == row["prototype_size"]) & (paper["semantic_init"] == row["semantic_init"])
        ref = paper[same]
        defaults = row["lambda_sp"] == 1.0 and row["lambda_sm"] == 0.5
        row["paper_acc"], row["paper_forg"] = ref.iloc[0][["acc", "forg"]] if defaults and len(ref) else (None, None)
        rows.append(row)
    return pd.DataFrame(rows), seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    t1.add_common_arguments(parser)
    parser.add_argument("--dataset", choices=tuple(PRESETS), default="cifar", help="Split-CIFAR100 or TinyImageNet")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds (seed, seed+1, ...): mean +- std")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--out", type=Path, help="the CSV (default benchmarks/results/pah-<dataset>-<scale>-<date>)")
    parser.add_argument("--ablation", action="store_true", help="PAH's ablation grid instead of the method table")
    parser.add_argument("--sizes", nargs="+", type=int, default=[5, 10, 16, 20], help="ablation: prototype sizes")
    parser.add_argument("--lambda-sm", nargs="+", type=float, default=[0.5, 1.0], help="ablation: lambda_sm values")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 160)
    root = Path(args.data_root or t1.default_data_root()).expanduser().resolve()
    if not (root / DATA[args.dataset]).is_dir():
        print(f"reproduce_pah: error: {root / DATA[args.dataset]} not found; set --data-root", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("reproduce_pah: error: --seeds must be at least 1", file=sys.stderr)
        return 2
    paper = pd.read_csv(t1.PAPER / "pah_table.csv").set_index("method")
    smoke = "smoke_" if args.scale == "smoke" else ""
    preset = f"pah_{smoke}{PRESETS[args.dataset]}"
    common = [f"experiment={preset}", f"data.root='{root}'", *args.overrides]
    seeds = list(range(args.seed, args.seed + args.seeds))
    start = time.perf_counter()
    if args.ablation:
        try:
            table, seconds = ablation(args, common, seeds, console)
        except t1.ReproduceError as error:
            print(f"reproduce_pah: error: {error}", file=sys.stderr)
            return 2
        console.print(table.drop(columns="run_id").to_string(index=False, float_format=lambda v: f"{v:.2f}"))
        name = f"pah-ablation-{args.dataset}-{args.scale}-{datetime.date.today().isoformat()}.csv"
        t1.write_table(table, args.out or t1.RESULTS / name, console, {"ablation": seconds}, start)
        return 0
    buffered = f"pah_{smoke}buffer200_{PRESETS[args.dataset]}"
    presets = {m: buffered if replays(m) else preset for m in args.methods}
    seconds, rows = {}, {}
    try:
        for name in dict.fromkeys(presets.values()):  # one multirun per preset, in the order of the methods
            methods = [m for m in args.methods if presets[m] == name]
            runs = [f"experiment={name}", *common[1:]]
            sweep = ["-m", "method=" + ",".join(methods), "seed=" + ",".join(map(str, seeds)), *runs]
            seconds[name] = t1.run_clrun([*sweep, f"hydra.sweep.dir={args.runs_dir}"], console)
            rows.update({m: measured_seeds([f"method={m}", *runs], seeds, args.runs_dir) for m in methods})
    except t1.ReproduceError as error:
        print(f"reproduce_pah: error: {error}", file=sys.stderr)
        return 2
    rows = {m: rows[m] for m in args.methods}
    table = compare(paper, rows, args.dataset)
    print_table(console, table, f"PAH's table, {preset}: paper vs measured (%)")
    out = args.out or t1.RESULTS / f"pah-{args.dataset}-{args.scale}-{datetime.date.today().isoformat()}.csv"
    t1.write_table(table, out, console, seconds, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
