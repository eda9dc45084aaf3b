"""Masking overhead: the train step of the weight-sharing methods against plain dense layers of the same width.

For each backbone and batch size, three train steps (forward, backward, optimizer step; SGD momentum 0.9,
CIFAR-shaped random data) are timed side by side in one process:

- dense: the backbone's plain layers (`TaskModel`), every parameter trained;
- packnet: a `SharedNet` in the middle of its second task (`begin_task(2, picking=False)` after task 1 was
  pruned to 60% free and ended): the forward pass composes own + frozen old weights through the masks, weight
  decay goes to the task's own weights by hand (what PackNet and PAE train);
- cpg: the same with `picking=True`: a binarised picking mask over the old weights, its straight-through
  gradient, and the masks under a second optimizer (Adam), as CPG trains.

Each kind runs as clrun trains now (`MaskedWeight`, the picking mask over earlier tasks' weights only,
`optimizer_kernels`) and as it trained before issue 18 (`*_before`: the masked weight as plain autograd
expressions, a picking mask and its Adam state over every weight, single-tensor optimizers).
Steps of the six kinds alternate in a shuffled order and each kind's fastest step counts (the median is
recorded too), so load from other processes on a shared machine biases no kind.
Prints the ratios masked/dense (targets on the CPU at batch 32: PackNet 1.1x, CPG 1.3x) and writes
benchmarks/results/masking-<host>-<date>.json.

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
from clrun.models.shared_net import SharedNet, shared_layers
from clrun.train import optimizer_kernels

SHAPE = (3, 32, 32)
N_CLASSES = 5
WEIGHT_DECAY = 4e-5  # CPG's CIFAR recipe
KINDS = ("dense", "packnet", "cpg", "dense_before", "packnet_before", "cpg_before")
TARGETS = {"packnet": 1.1, "cpg": 1.3}  # masked / dense on the CPU at batch 32


def backbone_builder(name: str):
    """`build(channel_multiplier)` as `WeightSharingMethod` makes it: the backbone at width 1 x multiplier."""
    cfg = OmegaConf.merge(OmegaConf.structured(BackboneConfig), {"name": name})

    def build(channels: float) -> torch.nn.Module:
        return build_backbone(OmegaConf.merge(cfg, {"width": cfg.width * channels}), SHAPE)

    return build


def fused(hw, reference: bool) -> dict:
    """Optimizer options as clrun sets them (`optimizer_kernels`) or as the reference code does (single-tensor)."""
    return {} if reference else optimizer_kernels(hw.device)


def unfused_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The masked weight as plain autograd expressions, the picking mask over every weight (before issue 18)."""
    old = layer.weight.detach() * layer.old_mask
    if layer.pick is not None:
        old = old * ((layer.pick > layer.threshold).to(layer.pick.dtype) + layer.pick - layer.pick.detach())
    return layer.weight * layer.own_mask + old


def unfuse(net: SharedNet, tag: int, picks: bool = True) -> None:
    """Route `net`'s current task through `unfused_weight`, with new full-size picking masks (`picks`)."""
    for layer in shared_layers(net.backbone).values():
        layer.old_mask = ((layer.owner >= 1) & (layer.owner < tag)).to(layer.weight.dtype)
        if layer.pick is not None and picks:
            layer.pick = torch.nn.Parameter(torch.full_like(layer.weight, net.mask_init))
        layer.weight_fn = unfused_weight


def decay_by_hand(net: SharedNet, weight_decay: float) -> None:
    """Weight decay added to the own weights' gradients after the backward pass, as before issue 18."""
    for layer in shared_layers(net.backbone).values():
        if layer.weight.grad is not None:
            layer.weight.grad.add_(layer.weight.detach() * layer.own_mask, alpha=weight_decay)


def dense_step(name: str, hw, reference: bool = False):
    """Plain layers: a `TaskModel` with one head, all parameters under SGD (weight decay in the gradient).
    `reference`: single-tensor optimizer steps."""
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


def shared_step(name: str, hw, picking: bool, reference: bool = False, recompute: bool = False):
    """A `SharedNet` mid-way through task 2 (task 1 pruned to 60% free and ended), trained as the methods do:
    shared weights, private tensors and head under SGD (weight decay on own weights only), picks under Adam.
    `reference`: the masked weight as before issue 18 (`unfuse`), single-tensor optimizer steps, and with
    `recompute` the masks recomputed from the owner map at every step, as the reference code does."""
    net = SharedNet(backbone_builder(name))
    net = hw.prepare_model(net)
    net.heads.add(net.backbone.out_features, N_CLASSES)
    net.heads.to(net.device)
    net.begin_task(1, picking=False)
    net.prune(1, 0.6)
    net.end_task(1)
    net.begin_task(2, picking=picking)
    if reference:
        unfuse(net, 2)
    head = net.heads.add(net.backbone.out_features, N_CLASSES)
    net.heads.heads[head].to(net.device)
    if not reference:
        net.own_weight_decay(WEIGHT_DECAY)  # in the masked weights' backward pass
    hw.compile(net)
    params = net.private_parameters() + list(net.heads.heads[head].parameters()) + net.shared_weights()
    optimizers = [torch.optim.SGD(params, lr=0.01, momentum=0.9, **fused(hw, reference))]
    if picking:
        optimizers.append(torch.optim.Adam(net.picks(), lr=5e-4, **fused(hw, reference)))
    net.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        if recompute:
            net.refresh_masks(2)
            unfuse(net, 2, picks=False)
        with hw.autocast():
            loss = F.cross_entropy(net.forward_current(x, head), y)
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if reference:
            decay_by_hand(net, WEIGHT_DECAY)
        for optimizer in optimizers:
            optimizer.step()

    return step


def measure(name: str, batch_size: int, hw, seconds: float, min_steps: int) -> dict:
    """Images/s of each kind's train step: steps of the six kinds alternate (in a shuffled order each round)
    for about `seconds` in all, at least `min_steps` each; each kind's fastest step counts."""
    x = hw.to_input(torch.randn(batch_size, *SHAPE, device=hw.device))
    y = torch.randint(0, N_CLASSES, (batch_size,), device=hw.device)
    torch.manual_seed(0)
    steps = {}
    for suffix, reference in (("", False), ("_before", True)):
        steps[f"dense{suffix}"] = dense_step(name, hw, reference)
        steps[f"packnet{suffix}"] = shared_step(name, hw, False, reference)
        steps[f"cpg{suffix}"] = shared_step(name, hw, True, reference)
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
        **{f"{kind}_ratio": best[kind] / best["dense"] for kind in TARGETS},
        **{f"{kind}_ratio_before": best[f"{kind}_before"] / best["dense_before"] for kind in TARGETS},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings (a smoke run)")
    parser.add_argument("--backbones", nargs="*", default=["vgg16_bn", "convnet"], choices=["vgg16_bn", "convnet"])
    parser.add_argument("--batch-sizes", nargs="*", type=int, default=[32, 128])
    args = parser.parse_args()
    seconds, min_steps = (2.0, 2) if args.quick else (30.0, 5)  # per backbone and batch size, the six kinds together

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
                f"packnet x{row['packnet_ratio']:.2f} (before x{row['packnet_ratio_before']:.2f}), "
                f"cpg x{row['cpg_ratio']:.2f} (before x{row['cpg_ratio_before']:.2f})"
            )

    targets = ", ".join(f"{kind} <= {target}x" for kind, target in TARGETS.items())
    table = Table(title=f"train step with masks vs plain dense layers on {hw.device} (time ratio; {targets})")
    columns = ["backbone", "batch", "dense img/s", "packnet img/s", "cpg img/s"]
    columns += ["packnet/dense", "before", "cpg/dense", "before"]
    for column in columns:
        table.add_column(column, justify="right")
    for row in rows:
        ratios = []
        for kind, target in TARGETS.items():
            ratio = row[f"{kind}_ratio"]
            ratios += [
                f"[{'green' if ratio <= target else 'red'}]{ratio:.2f}x[/]",
                f"{row[f'{kind}_ratio_before']:.2f}x",
            ]
        table.add_row(
            row["backbone"],
            str(row["batch_size"]),
            *(f"{row[f'{kind}_images_per_s']:.1f}" for kind in ("dense", "packnet", "cpg")),
            *ratios,
        )
    console.print(table)

    fields = {
        "load_average": os.getloadavg(),  # other processes' load (1, 5, 15 min) when the timings ended
        "quick": args.quick,
        "target_ratios": TARGETS,
        "rows": rows,
    }
    out = write_record("masking-", hw, fields)
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
