"""Speed benchmark: clrun's train path against a reference-style path, side by side in one run.

1. Train images/s of vgg16_bn on CIFAR-shaped data at batch 32 and 256, for the plain, PackNet-masked and CPG
   (masked + picking) steps (the steps of benchmarks/masking.py):
   - clrun's path: uint8 images resident on the device, cropped, flipped and normalised there
     (`clrun.data.prepare`), `hardware=auto`'s settings (on CUDA: bf16 autocast, channels_last, cudnn.benchmark),
     fused optimizers on CUDA, masks precomputed; `--compile` adds torch.compile (`--compile-mode
     reduce_overhead`: CUDA graphs);
   - the reference-style path, standing for how the reference code runs: fp32, a DataLoader with per-sample
     torchvision transforms from uint8 images (`--workers`), no channels_last, no graphs, unfused optimizers,
     masks recomputed from the owner map at every step.
   Rounds alternate the two paths; each path's best round counts (other processes only ever add time).
2. End-to-end wall time of two CPG tasks with every phase of the recipe (train, ten gradual-pruning steps,
   then for the second task picking and the retrain pass), on CIFAR-shaped synthetic tasks of 5 classes, with
   epochs and images scaled down (`--epoch-scale`, `--images`); projected linearly to the full recipe on 2,500
   images, to the 20-task stream (task 1 + 19 x task 2) and to the whole `make reproduce-table1` (scratch,
   PackNet, PAE and CPG, 20 tasks each; their epochs per task from the presets, each method at its step kind's
   measured rate relative to CPG's).
3. Peak memory of each path: CUDA's max allocated bytes; on CPU, the process's peak RSS.

Prints the tables and writes benchmarks/results/speed-<precision>[-compiled]-<host>-<date>.json.

    python benchmarks/speed.py [--quick] [--precision bf16] [--compile] [--compile-mode reduce_overhead]
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from masking import SHAPE, dense_step, shared_step
from rich.console import Console
from rich.table import Table
from throughput import CIFAR_VIEW, PerSampleCifar, host_kind, write_record

from clrun.cli import compose
from clrun.data import iterate, prepare
from clrun.hardware import Hardware, resolve_hardware
from clrun.run import Run

BACKBONE = "vgg16_bn"
KINDS = ("plain", "packnet", "cpg")
STEP_OF = {"scratch": "plain", "packnet": "packnet", "pae": "packnet", "cpg": "cpg"}  # Table 1 method -> step kind
FULL_IMAGES = 2500  # CIFAR-100 superclass task: 5 classes x 500 training images
TASKS = 20
TARGETS = {"cpu": 2.0, "cuda": 10.0}  # clrun / reference images/s at batch 32


def make_step(kind: str, hw, reference: bool):
    """The train step `step(x, y)` of a kind on the backbone."""
    if kind == "plain":
        return dense_step(BACKBONE, hw, reference)
    return shared_step(BACKBONE, hw, picking=kind == "cpg", reference=reference, recompute=reference)


def clrun_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int, hw):
    """Endless augmented batches from device-resident uint8 images, as `clrun.train.Trainer.fit` draws them."""
    while True:
        for x, y in iterate((images, labels), batch_size, shuffle=True):
            yield hw.to_input(prepare(x, CIFAR_VIEW, train=True)), y


def reference_batches(images: np.ndarray, labels: np.ndarray, batch_size: int, device, workers: int):
    """Endless batches from a DataLoader with per-sample PIL transforms, copied to the device."""
    loader = torch.utils.data.DataLoader(
        PerSampleCifar(images, labels),
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )
    while True:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def peak_memory(device) -> int:
    """Peak bytes: CUDA's max allocated since the last reset, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed_round(step, batches, n_steps: int, batch_size: int, device) -> float:
    """Images/s of `n_steps` steps fed by `batches`."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n_steps):
        step(*next(batches))
    sync()
    return n_steps * batch_size / (time.perf_counter() - start)


def warm_up(hw) -> None:
    """A few steps of the backbone before anything is timed (one-time library and allocator set-up)."""
    step = make_step("plain", hw, reference=False)
    x = hw.to_input(torch.randn(32, *SHAPE, device=hw.device))
    for _ in range(3):
        step(x, torch.zeros(32, dtype=torch.long, device=hw.device))


def measure_steps(kind: str, batch_size: int, fast: Hardware, plain: Hardware, args) -> dict:
    """clrun's and the reference-style path's images/s and peak memory for one step kind and batch size."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.images, *SHAPE[1:], SHAPE[0]), dtype=np.uint8)  # HWC, as CIFAR's pickles
    labels = rng.integers(0, 5, args.images)
    device = fast.device
    resident = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(device)
    paths = {
        "clrun": (fast, clrun_batches(resident, torch.from_numpy(labels).to(device), batch_size, fast)),
        "reference": (plain, reference_batches(images, labels, batch_size, device, args.workers)),
    }
    row = {"kind": kind, "batch_size": batch_size}
    steps, rates = {}, {name: [] for name in paths}
    for name, (hw, batches) in paths.items():
        torch.manual_seed(0)
        steps[name] = make_step(kind, hw, reference=name == "reference")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        for _ in range(args.warmup):  # allocations, optimizer state, kernel selection, compilation
            steps[name](*next(batches))
        rates[name].append(timed_round(steps[name], batches, args.steps, batch_size, device))
        row[f"{name}_peak_mb"] = peak_memory(device) / 2**20
    for _ in range(args.rounds - 1):
        for name, (_, batches) in paths.items():
            rates[name].append(timed_round(steps[name], batches, args.steps, batch_size, device))
    for name in paths:
        row[f"{name}_images_per_s"] = max(rates[name])
    row["speedup"] = row["clrun_images_per_s"] / row["reference_images_per_s"]
    return row


def recipe_epochs(method: str) -> int:
    """Epochs one task of a Table 1 method's preset trains (at most: no growth, retrain without early stop)."""
    cfg = compose([f"experiment=table1_{method}"]).method
    if method in ("scratch", "packnet"):
        return cfg.train.epochs + (cfg.retrain.epochs if method == "packnet" else 0)
    retrain = cfg.retrain.epochs if cfg.retrain_pass else 0
    return cfg.train.epochs + len(cfg.sparsities) * cfg.prune_train.epochs + retrain


def cpg_tasks(args, hardware: list[str]) -> dict:
    """Wall time of two scaled CPG tasks run end to end by clrun, and their projections."""
    cfg = compose(["experiment=table1_cpg"]).method
    scale = args.epoch_scale

    def scaled(epochs: int) -> int:
        return max(1, round(epochs / scale))

    epochs = {"train": scaled(cfg.train.epochs), "prune": scaled(cfg.prune_train.epochs)}  # at most, per phase
    epochs["retrain"] = scaled(cfg.retrain.epochs)
    overrides = [
        "experiment=table1_cpg",
        "stream=synthetic",
        "stream.n_tasks=2",
        "stream.classes_per_task=5",
        f"stream.train_per_task={args.task_images}",
        f"stream.test_per_task={max(10, args.task_images // 5)}",  # CIFAR-100: 100 test per 500 training images
        "stream.augment=true",
        "method.min_train_acc=0",
        f"method.train.epochs={epochs['train']}",
        f"method.prune_train.epochs={epochs['prune']}",
        f"method.pruning_interval={min(cfg.pruning_interval, epochs['prune'])}",
        f"method.retrain.epochs={epochs['retrain']}",
        f"method.retrain_patience={epochs['retrain']}",
        "method.train.milestones=[]",
        *hardware,
    ]
    with tempfile.TemporaryDirectory() as folder:
        Run(compose(overrides), Path(folder) / "run", Console(quiet=True)).execute()
        tasks = pd.read_parquet(Path(folder) / "run" / "tasks.parquet")
    walls, run_epochs = tasks["wall_s"].tolist(), tasks["epochs"].tolist()  # pruning may stop early at the goal
    full = recipe_epochs("cpg")
    full_epochs = [full - cfg.retrain.epochs, full]
    images = FULL_IMAGES / args.task_images
    projected = [w * f / e * images for w, f, e in zip(walls, full_epochs, run_epochs, strict=True)]
    return {
        "task_images": args.task_images,
        "epochs_run": run_epochs,
        "epochs_full": full_epochs,
        "wall_s": walls,
        "projected_task_s": projected,
        "projected_stream_s": projected[0] + (TASKS - 1) * projected[1],
    }


def table1_projection(cpg: dict, rows: list[dict]) -> dict:
    """Projected seconds of `make reproduce-table1` for clrun (from the measured CPG tasks, each method at its
    step kind's rate relative to CPG's) and for the reference-style path (its step rates alone), at batch 32."""
    rate = {
        (row["kind"], path): row[f"{path}_images_per_s"]
        for row in rows
        if row["batch_size"] == 32
        for path in ("clrun", "reference")
    }
    cpg_seconds_per_epoch = cpg["projected_task_s"][1] / cpg["epochs_full"][1]
    clrun_s = reference_s = 0.0
    for method, kind in STEP_OF.items():
        epochs = TASKS * recipe_epochs(method)
        clrun_s += epochs * cpg_seconds_per_epoch * rate[("cpg", "clrun")] / rate[(kind, "clrun")]
        reference_s += epochs * FULL_IMAGES / rate[(kind, "reference")]
    return {"clrun_s": clrun_s, "reference_s": reference_s, "ratio": reference_s / clrun_s}


def hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller CPG task (a smoke run)")
    parser.add_argument("--compile", action="store_true", help="torch.compile clrun's path (hardware.compile=true)")
    parser.add_argument("--compile-mode", default="default", choices=["default", "reduce_overhead", "max_autotune"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="clrun's path's")
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[32, 256])
    parser.add_argument("--workers", type=int, default=None, help="reference DataLoader workers (CPU: 0, CUDA: 8)")
    parser.add_argument("--epoch-scale", type=float, default=None, help="CPG recipe epochs divided by this")
    parser.add_argument("--skip-cpg", action="store_true", help="only the step throughputs (also without every kind)")
    parser.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS, help="the steps measured")
    parser.add_argument(
        "--task-images",
        type=int,
        default=None,
        help="CPG tasks' training images (default: 2,500 on CUDA, 250 on CPU; quick: 64)",
    )
    args = parser.parse_args()

    on_cuda = torch.cuda.is_available()
    hardware = ["hardware=auto", f"hardware.compile={str(args.compile).lower()}"]
    hardware += [f"hardware.compile_mode={args.compile_mode}", f"hardware.precision={args.precision}"]
    fast = resolve_hardware(compose(hardware).hardware)
    plain = Hardware(fast.device, autocast_dtype=None, channels_last=False)
    torch.backends.cudnn.benchmark = on_cuda  # the reference code sets it too
    args.workers = (8 if on_cuda else 0) if args.workers is None else args.workers
    args.images = 2048 if args.quick else 4096
    args.steps, args.rounds = (3, 3) if args.quick and not on_cuda else ((10, 2) if not on_cuda else (100, 3))
    args.warmup = 30 if args.compile else (3 if not on_cuda else 10)
    args.epoch_scale = args.epoch_scale or (100.0 if not on_cuda else 10.0)
    args.task_images = args.task_images or (64 if args.quick else (250 if not on_cuda else FULL_IMAGES))

    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(
        f"host: {host_kind()}  device: {fast.device}  autocast: {fast.autocast_dtype}  channels_last: "
        f"{fast.channels_last}  compile: {fast.compile_mode}  torch {torch.__version__}  threads "
        f"{torch.get_num_threads()}  reference workers {args.workers}"
    )
    warm_up(fast)
    rows = []
    for batch_size in args.batch_sizes:
        for kind in args.kinds:
            rows.append(measure_steps(kind, batch_size, fast, plain, args))
            console.print(f"  {kind} batch {batch_size}: x{rows[-1]['speedup']:.2f}")
    target = TARGETS[fast.device.type]
    table = Table(title=f"{BACKBONE} train step, CIFAR-shaped data, clrun vs reference-style path on {fast.device}")
    for column in ("step", "batch", "clrun img/s", "reference img/s", "speed-up", "clrun peak MB", "ref peak MB"):
        table.add_column(column, justify="right")
    for row in rows:
        colour = "green" if row["batch_size"] != 32 or row["speedup"] >= target else "red"
        table.add_row(
            row["kind"],
            str(row["batch_size"]),
            f"{row['clrun_images_per_s']:.1f}",
            f"{row['reference_images_per_s']:.1f}",
            f"[{colour}]{row['speedup']:.2f}x[/]",
            f"{row['clrun_peak_mb']:.0f}",
            f"{row['reference_peak_mb']:.0f}",
        )
    console.print(table)
    fields = {"load_average": os.getloadavg(), "quick": args.quick, "compile": fast.compile_mode, "steps": rows}
    fields["target_speedup_batch32"] = target
    if not args.skip_cpg and 32 in args.batch_sizes and set(args.kinds) == set(KINDS):  # the projection needs all
        cpg = cpg_tasks(args, hardware)
        table1 = table1_projection(cpg, rows)
        fields |= {"cpg": cpg, "table1": table1}
        console.print(
            f"CPG tasks ({cpg['task_images']} images, epochs {cpg['epochs_run']} of {cpg['epochs_full']}): "
            f"{cpg['wall_s'][0]:.1f} s, {cpg['wall_s'][1]:.1f} s -> full task 2 {hours(cpg['projected_task_s'][1])}, "
            f"20-task stream {hours(cpg['projected_stream_s'])}"
        )
        console.print(
            f"reproduce-table1 projected: clrun {hours(table1['clrun_s'])}, reference-style "
            f"{hours(table1['reference_s'])} ({table1['ratio']:.1f}x)"
        )
    precision = "fp32" if fast.autocast_dtype is None else "bf16"
    compiled = (
        ""
        if fast.compile_mode is None
        else f"-compiled{'' if fast.compile_mode == 'default' else '-' + fast.compile_mode}"
    )
    out = write_record(f"speed-{precision}{compiled}-", fast, fields)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
