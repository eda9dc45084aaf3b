"""Masking overhead: the train step of the weight-sharing methods against plain dense layers of the same width.

For each backbone and batch size, three train steps (forward, backward, optimizer step; SGD momentum 0.9,
CIFAR-shaped random data) are timed side by side in one process:

- dense: the backbone's plain layers (`TaskModel`), every parameter trained;
- packnet: a `SharedNet` in the middle of its second task (`begin_task(2, picking=False)` after task 1 was
  pruned to 60% free and ended): the forward pass composes own + frozen old weights through the masks, weight
  decay goes to the task's own weights by hand (what PackNet and PAE train);
- cpg: the same with `picking=True`: a binarised picking mask over the old weights, its straight-through
  gradient, and the masks under a second optimizer (Adam), as CPG trains.

Steps of the three kinds alternate in a shuffled order and each kind's fastest step counts (the median is
recorded too), so load from other processes on a shared machine biases no kind.
Prints the ratio masked/dense (target: at most 1.2x) and writes benchmarks/results/masking-<host>-<date>.json.

    python benchmarks/masking.py [--quick] [--backbones vgg16_bn convnet] [--batch-sizes 32 128]
"""

import argparse
import os
import random
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table
from throughput import auto_hardware, host_kind, write_record

from clrun.config import BackboneConfig
from clrun.models import TaskModel, build_backbone
from clrun.models.shared_net import SharedNet

SHAPE = (3, 32, 32)
N_CLASSES = 5
WEIGHT_DECAY = 4e-5  # CPG's CIFAR recipe
KINDS = ("dense", "packnet", "cpg")
TARGET = 1.2


def backbone_builder(name: str):
    """`build(channel_multiplier)` as `WeightSharingMethod` makes it: the backbone at width 1 x multiplier."""
    cfg = OmegaConf.merge(OmegaConf.structured(BackboneConfig), {"name": name})

    def build(channels: float) -> torch.nn.Module:
        return build_backbone(OmegaConf.merge(cfg, {"width": cfg.width * channels}), SHAPE)

    return build


def fused(hw, reference: bool) -> dict:
    """Optimizer options as clrun sets them (fused kernels on CUDA) or as the reference code does (not fused)."""
    return {"fused": True} if hw.device.type == "cuda" and not reference else {}


def dense_step(name: str, hw, reference: bool = False):
    """Plain layers: a `TaskModel` with one head, all parameters under SGD (weight decay in the gradient)."""
    model = hw.prepare_model(TaskModel(backbone_builder(name)(1.0)))
    model.add_head(N_CLASSES)
    model.to(hw.device)
    hw.compile(model)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, weight_decay=WEIGHT_DECAY, **fused(hw, reference)
    )
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with hw.autocast():
            loss = F.cross_entropy(model(x, 0), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def shared_step(name: str, hw, picking: bool, reference: bool = False):
    """A `SharedNet` mid-way through task 2 (task 1 pruned to 60% free and ended), trained as the methods do:
    shared weights, private tensors and head under SGD (weight decay on own weights only), picks under Adam.
    `reference`: the masks are recomputed from the owner map at every step, as the reference code does."""
    net = SharedNet(backbone_builder(name))
    net = hw.prepare_model(net)
    net.heads.add(net.backbone.out_features, N_CLASSES)
    net.heads.to(net.device)
    net.begin_task(1, picking=False)
    net.prune(1, 0.6)
    net.end_task(1)
    net.begin_task(2, picking=picking)
    head = net.heads.add(net.backbone.out_features, N_CLASSES)
    net.heads.heads[head].to(net.device)
    hw.compile(net)
    params = net.private_parameters() + list(net.heads.heads[head].parameters()) + net.shared_weights()
    optimizers = [torch.optim.SGD(params, lr=0.01, momentum=0.9, **fused(hw, reference))]
    if picking:
        optimizers.append(torch.optim.Adam(net.picks(), lr=5e-4, **fused(hw, reference)))
    net.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if reference:
            net.refresh_masks(2)
        with hw.autocast():
            loss = F.cross_entropy(net.forward_current(x, head), y)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        net.decay_own_weights(WEIGHT_DECAY)
        for optimizer in optimizers:
            optimizer.step()

    return step


def measure(name: str, batch_size: int, hw, seconds: float, min_steps: int) -> dict:
    """Images/s of each kind's train step: steps of the three kinds alternate (in a shuffled order each round)
    for about `seconds` in all, at least `min_steps` each; each kind's fastest step counts."""
    x = hw.to_input(torch.randn(batch_size, *SHAPE, device=hw.device))
    y = torch.randint(0, N_CLASSES, (batch_size,), device=hw.device)
    torch.manual_seed(0)
    steps = {"dense": dense_step(name, hw), "packnet": shared_step(name, hw, False), "cpg": shared_step(name, hw, True)}
    sync = torch.cuda.synchronize if hw.device.type == "cuda" else (lambda: None)
    for step in steps.values():  # warm-up: allocations, optimizer state, kernel selection
        step(x, y)
    sync()
    times: dict[str, list[float]] = {kind: [] for kind in KINDS}
    order = list(KINDS)
    generator = random.Random(0)
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times["dense"]) < min_steps:
        generator.shuffle(order)  # no kind always runs right after another (caches, turbo, a neighbour's load)
        for kind in order:
            tick = time.perf_counter()
            steps[kind](x, y)
            sync()
            times[kind].append(time.perf_counter() - tick)
    best = {kind: min(values) for kind, values in times.items()}  # other processes only ever add time
    return {
        "backbone": name,
        "batch_size": batch_size,
        "steps": len(times["dense"]),
        **{f"{kind}_images_per_s": batch_size / best[kind] for kind in KINDS},
        **{f"{kind}_median_step_s": statistics.median(times[kind]) for kind in KINDS},
        "packnet_ratio": best["packnet"] / best["dense"],
        "cpg_ratio": best["cpg"] / best["dense"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings (a smoke run)")
    parser.add_argument("--backbones", nargs="*", default=["vgg16_bn", "convnet"], choices=["vgg16_bn", "convnet"])
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[32, 128])
    args = parser.parse_args()
    seconds, min_steps = (2.0, 2) if args.quick else (10.0, 3)  # per backbone and batch size, the three kinds together

    hw = auto_hardware()
    console = Console(width=None if sys.stdout.isatty() else 120)  # logs get the table unsqueezed
    console.print(f"host: {host_kind()}  device: {hw.device}  autocast: {hw.autocast_dtype}  torch {torch.__version__}")

    rows = []
    for name in args.backbones:
        for batch_size in args.batch_sizes:
            rows.append(measure(name, batch_size, hw, seconds, min_steps))
            row = rows[-1]
            console.print(
                f"  {name} batch {batch_size}: dense {row['dense_images_per_s']:.1f} img/s, "
                f"packnet x{row['packnet_ratio']:.2f}, cpg x{row['cpg_ratio']:.2f}"
            )

    table = Table(title=f"train step with masks vs plain dense layers on {hw.device} (time ratio, target <= {TARGET}x)")
    for column in ("backbone", "batch", "dense img/s", "packnet img/s", "cpg img/s", "packnet/dense", "cpg/dense"):
        table.add_column(column, justify="right")
    for row in rows:
        ratios = []
        for kind in ("packnet", "cpg"):
            ratio = row[f"{kind}_ratio"]
            ratios.append(f"[{'green' if ratio <= TARGET else 'red'}]{ratio:.2f}x[/]")
        table.add_row(
            row["backbone"],
            str(row["batch_size"]),
            *(f"{row[f'{kind}_images_per_s']:.1f}" for kind in KINDS),
            *ratios,
        )
    console.print(table)

    fields = {
        "load_average": os.getloadavg(),  # other processes' load (1, 5, 15 min) when the timings ended
        "quick": args.quick,
        "target_ratio": TARGET,
        "rows": rows,
    }
    out = write_record("masking-", hw, fields)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
