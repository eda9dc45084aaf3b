"""Reproduce CPG's Table 3: ImageNet -> CUBS -> Stanford Cars -> Flowers -> WikiArt -> Sketch on ResNet-50.

Runs the `conf/experiment/table3_*` presets through the `clrun` command: Scratch and Finetune (one ResNet-50
per fine-grained task, from random or ImageNet weights), PackNet, Piggyback and CPG (ImageNet first: the
pretrained network, not trained). CPG's goals are the paper's Finetune column
(benchmarks/paper/cpg_goals_table3.json, as the official README gives them). Then prints the paper's table
beside the measured one (accuracy per task after all tasks, model size in MB) and writes
benchmarks/results/table3-<scale>-<date>.csv. ProgNet is not run: clrun's progressive columns tap layers one
by one, which ResNet-50's skip connections do not allow. Finished runs are reused.

    python benchmarks/reproduce_table3.py [--scale full|smoke] [--data-root DIR] [--seed N] [--seeds N] [KEY=VALUE ...]

Full scale: DIR holds Piggyback's prepared datasets (imagenet/{train,val}, cubs_cropped/{train,test}, ...);
ImageNet's train folder is needed only to prune the ImageNet task (without it, that task keeps every weight).
`--scale smoke` writes a small copy in that layout (random images) and a ResNet-50 state dict with random
weights in torchvision's format under the runs folder, and runs the `table3_smoke_*` presets on it: minutes on a
CPU, accuracies not comparable with the paper.
"""

import argparse
import datetime
import sys
import time
from pathlib import Path

import pandas as pd
import reproduce_table1 as t1
import torch
import torchvision
from PIL import Image
from rich.console import Console

METHODS = ("scratch", "finetune", "packnet", "piggyback", "cpg")  # the paper's order (ProgNet is not run)
LABELS = {"scratch": "Scratch", "finetune": "Finetune", "packnet": "PackNet", "piggyback": "Piggyback", "cpg": "CPG"}
DATASETS = ("imagenet", "cubs_cropped", "stanford_cars_cropped", "flowers", "wikiart", "sketches")
TITLES = ("ImageNet", "CUBS", "Stanford Cars", "Flowers", "WikiArt", "Sketch")
WITHOUT_IMAGENET = ("scratch", "finetune")  # one model per fine-grained task; ImageNet is not one of their tasks
GOALS = t1.PAPER / "cpg_goals_table3.json"
SMOKE_CLASSES = {"imagenet": 3, "cubs_cropped": 2, "stanford_cars_cropped": 2}


def load_paper(folder: Path = t1.PAPER) -> pd.DataFrame:
    """The paper's Table 3 by method key (task1..task6 = ImageNet..Sketch in %, size_mb)."""
    table = pd.read_csv(folder / "cpg_table3.csv").set_index("method")
    return table.rename(index={label: key for key, label in {**LABELS, "prognet": "ProgNet"}.items()}).astype(float)


def write_smoke_data(root: Path, seed: int = 0) -> Path:
    """A small copy of Piggyback's layout under `root` (random 48x40 PNGs, a class-dependent tint so a network can
    learn something) and `root/resnet50-smoke.pth`, torchvision's ResNet-50 with random weights and a classifier
    over the smoke ImageNet's classes; return that file. Written once."""
    weights = root / "resnet50-smoke.pth"
    if weights.is_file():
        return weights
    generator = torch.Generator().manual_seed(seed)
    for dataset, classes in SMOKE_CLASSES.items():
        for split, count in (("train", 6), ("val" if dataset == "imagenet" else "test", 4)):
            for c in range(classes):
                folder = root / dataset / split / f"class{c}"
                folder.mkdir(parents=True, exist_ok=True)
                for k in range(count):
                    image = torch.randint(0, 120, (40, 48, 3), generator=generator, dtype=torch.uint8)
                    image[..., c % 3] += 100
                    Image.fromarray(image.numpy()).save(folder / f"img{k}.png")
    torch.manual_seed(seed)
    model = torchvision.models.resnet50(weights=None, num_classes=SMOKE_CLASSES["imagenet"])
    temporary = weights.with_suffix(".tmp")
    torch.save(model.state_dict(), temporary)
    temporary.replace(weights)
    return weights


def check_data(root: Path) -> None:
    """Piggyback's dataset folders must be there (the readers name a missing class or file themselves)."""
    missing = [d for d in DATASETS if not (root / d).is_dir()]
    if missing:
        raise t1.ReproduceError(
            f"{root / missing[0]} not found: point --data-root (DATA_ROOT=) at the folder holding Piggyback's "
            f"prepared datasets ({', '.join(DATASETS)})"
        )


def preset(method: str, scale: str) -> str:
    return f"table3_{method}" if scale == "full" else f"table3_smoke_{method}"


def run_method(method: str, scale: str, seeds: list[int], common: list[str], runs_dir: Path, console) -> tuple:
    """Run a method's seeds as one multirun; return its run folders and the wall time."""
    job = [f"experiment={preset(method, scale)}", *common]
    if method == "cpg":
        job.append(f"method.goals={GOALS}")
    seconds = t1.run_clrun(["-m", *job, "seed=" + ",".join(map(str, seeds)), f"hydra.sweep.dir={runs_dir}"], console)
    return [t1.ROOT / t1.run_folder([*job, f"seed={s}"], runs_dir) for s in seeds], seconds


def pretrained_accuracy(folder: Path) -> float:
    """The pretrained network's ImageNet accuracy (%), as a CPG run measured it before pruning."""
    tasks = pd.read_parquet(folder / "tasks.parquet")
    return 100 * float(tasks.loc[tasks["task"] == 0, "acc_before_prune"].iloc[-1])


def as_table3_row(row: dict, method: str, imagenet: float) -> dict:
    """A baseline's row over the fine-grained tasks moved to Table 3's columns 2..: task1 (ImageNet) is the
    pretrained network's accuracy for Scratch (the paper's 76.16 is torchvision's model), none for Finetune."""
    n = int(row["n_tasks"])
    moved = {k: v for k, v in row.items() if not (k.startswith("task") or k.startswith("std_task"))}
    for i in range(n, 0, -1):
        moved[f"task{i + 1}"] = row[f"task{i}"]
        if f"std_task{i}" in row:
            moved[f"std_task{i + 1}"] = row[f"std_task{i}"]
    moved["task1"] = imagenet if method == "scratch" else float("nan")
    moved["n_tasks"] = n + 1
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    t1.add_common_arguments(parser)
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds (seed, seed+1, ...): mean +- std")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="a subset to run")
    parser.add_argument("--out", type=Path, help="the CSV (default benchmarks/results/table3-<scale>-<date>.csv)")
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 200)
    start = time.perf_counter()
    try:
        if args.seeds < 1:
            raise t1.ReproduceError("--seeds must be at least 1")
        common = list(args.overrides)
        if args.scale == "smoke" and not args.data_root:
            root = (t1.ROOT / args.runs_dir / "table3-smoke-data").resolve()
            common.append(f"backbone.pretrained={write_smoke_data(root)}")
        else:
            root = Path(args.data_root or t1.default_data_root()).expanduser().resolve()
            if args.scale == "full":
                check_data(root)
        common.insert(0, f"data.root='{root}'")
        seeds = list(range(args.seed, args.seed + args.seeds))
        # CPG first: its ImageNet task measures the pretrained network, Scratch's ImageNet cell
        order = sorted(args.methods, key=lambda m: m != "cpg")
        folders, seconds = {}, {}
        for method in order:
            folders[method], seconds[method] = run_method(method, args.scale, seeds, common, args.runs_dir, console)
        imagenet = float("nan")
        if "cpg" in folders:
            imagenet = sum(pretrained_accuracy(f) for f in folders["cpg"]) / len(seeds)
        measured = {}
        for method in METHODS:
            if method in folders:
                row = t1.mean_row([t1.measured_row(f) for f in folders[method]])
                measured[method] = as_table3_row(row, method, imagenet) if method in WITHOUT_IMAGENET else row
    except t1.ReproduceError as error:
        print(f"reproduce_table3: error: {error}", file=sys.stderr)
        return 2
    table = t1.compare(load_paper(), measured, METHODS, LABELS, extras=("size_mb",))
    n = max(int(row["n_tasks"]) for row in measured.values())
    title = f"CPG Table 3, fine-grained tasks, ResNet-50: paper vs measured (scale {args.scale}, {n} tasks)"
    t1.print_table(console, table, title)
    notes = [
        "Tasks: " + ", ".join(f"{i} {name}" for i, name in enumerate(TITLES[:n], 1)) + "; accuracy (%) of each "
        "task after all tasks; diff = measured - paper. ProgNet (the paper's 76.16 ... 76.35, 563 MB) is not run: "
        "clrun's progressive columns cannot tap ResNet-50's residual blocks.",
        "Scratch and Finetune train one model per fine-grained task; Scratch's ImageNet cell is the pretrained "
        "network's accuracy measured by the CPG run (the paper's 76.16 is torchvision's model).",
        "Size: clrun's model_mb (every stored tensor: weights, masks, per-task heads and batch norm, fp32); the "
        "paper does not say how it counted its sizes (cpg.md §4).",
        f"CPG's goals: the paper's Finetune column ({GOALS.relative_to(t1.ROOT)}). Precision: the paper's numbers "
        f"are fp32; measured in {', '.join(sorted(set(table.loc[table['row'] != 'paper', 'precision'])))}.",
        t1.flag_note(table),
    ]
    for note in notes:
        console.print(f"[dim]{note}[/]")
    out = args.out or t1.RESULTS / f"table3-{args.scale}-{datetime.date.today().isoformat()}.csv"
    t1.write_table(table, out, console, seconds, start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
