"""The `clrun-import-cpg` command: a checkpoint of ivclab/CPG's CIFAR-100 code as a finished clrun CPG run.

CPG's `Manager.save_checkpoint` (utils/manager.py) writes, after its last task, a dict of `model_state_dict`
(`custom_vgg_cifar100` of models/vgg.py at its widest, with every task's head `classifiers.<k>`),
`dataset_history` (the task names in order), `dataset2num_classes`, `masks` (`module.<layer>` -> uint8 owner:
0 free, k task k) and `shared_layer_info[task]` (that task's batch norm, linear biases, float piggymasks and
`network_width_multiplier`, the channel multiplier: the square root of the parameter multiplier). The importer
turns it into the state a clrun CPG run saves after the same tasks: the masks become the owner maps (the same
tags); each task's piggymask its binary picks (above 5e-3, where CPG's forward binarises it); its tensors and head
keep its width, and clrun's task views slice the shared weights to that width as CPG's inference does. `Run` then
evaluates every task through its own view and writes the run folder. The checkpoint holds the network after the
last task only, so only the last row of the accuracy matrix, R[T-1][j], is measured.
"""

import argparse
import math
import sys
from functools import partial
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from clrun.cli import compose, discard_unstarted
from clrun.config import check_config
from clrun.errors import ClrunError
from clrun.methods.cpg import CPG
from clrun.models.shared_net import shared_layers
from clrun.naming import RUNS_DIR, run_name
from clrun.run import Run

CPG_KEYS = ("model_state_dict", "dataset_history", "dataset2num_classes", "masks", "shared_layer_info")
THRESHOLD = 5e-3  # CPG's forward uses a weight where its piggymask is above this (models/layers.py)
PRESET = "experiment=table1_cpg"  # put before the overrides unless they name an experiment
BATCH_NORM = {  # the field of shared_layer_info[task] holding each batch-norm tensor
    "weight": "bn_layer_weight",
    "bias": "bn_layer_bias",
    "running_mean": "bn_layer_running_mean",
    "running_var": "bn_layer_running_var",
}


def read_checkpoint(path: Path) -> dict:
    """CPG's checkpoint at `path` on the CPU; a `ClrunError` when it is missing or not in CPG's format."""
    if not path.is_file():
        raise ClrunError(f"file not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # whatever torch cannot read is the user's to know, in one line
        raise ClrunError(f"{path}: torch cannot read it as a checkpoint ({type(error).__name__})") from None
    missing = [key for key in CPG_KEYS if not isinstance(checkpoint, dict) or key not in checkpoint]
    if missing:
        raise ClrunError(f"{path} is not a checkpoint of ivclab/CPG's Manager.save_checkpoint: no {', '.join(missing)}")
    return checkpoint


def _cpg_key(key: str, n_features: int) -> str:
    """CPG's name of clrun's vgg16_bn module or tensor `key`. CPG's `features` also holds the View and the two
    linear layers (at n_features, + 1, + 3) that clrun keeps in `classifier` (Flatten at 0, Linear at 1 and 3)."""
    group, index, *rest = key.split(".")
    return key if group == "features" else ".".join([f"features.{n_features + int(index)}", *rest])


def _lookup(tensors: dict, key: str, where: str):
    if not isinstance(tensors, dict) or key not in tensors:
        raise ClrunError(f"{where} has no {key}: is this a checkpoint of CPG's CIFAR-100 code (custom_vgg_cifar100)?")
    return tensors[key]


def _checked(tensor, shape: torch.Size, where: str) -> torch.Tensor:
    """`tensor`, detached, if it has `shape`; else a `ClrunError` naming `where`."""
    if not isinstance(tensor, torch.Tensor) or tensor.shape != shape:
        got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ClrunError(
            f"{where} is {got} but clrun's vgg16_bn needs {tuple(shape)}: backbone.width must be the checkpoint's "
            "(1 for CPG's release)"
        )
    return tensor.detach()


def _structure(method: CPG, multiplier: float) -> nn.Module:
    """The method's backbone at parameter multiplier `multiplier`, structure only (no initialisation)."""
    with torch.device("meta"):
        return method.net.build(math.sqrt(multiplier))


def _private(view: nn.Module, info: dict, where: str) -> dict[str, torch.Tensor]:
    """A task's batch norm and linear biases at its width (`view`), from its shared_layer_info `info`."""
    shared, n, private = shared_layers(view), len(view.features), {}
    for key, target in view.state_dict().items():
        module, suffix = key.rsplit(".", 1)
        if module in shared and suffix == "weight":
            continue
        if suffix == "num_batches_tracked":  # CPG keeps no count; evaluation does not read it
            private[key] = torch.zeros((), dtype=torch.long)
            continue
        field = "bias" if module in shared else BATCH_NORM[suffix]
        name = _cpg_key(module, n)
        value = _lookup(_lookup(info, field, where), name, f"{where}[{field}]")
        private[key] = _checked(value, target.shape, f"{where}[{field}][{name}]").float()
    return private


def _picks(view: nn.Module, info: dict, owners: dict, tag: int, where: str) -> dict[str, torch.Tensor]:
    """Task `tag`'s binary picks over earlier tasks' weights, from its float piggymasks (none: it uses them all)."""
    piggymasks = info.get("piggymask") or {}
    if not piggymasks:
        return {}
    picks = {}
    for module, layer in shared_layers(view).items():
        name = _cpg_key(module, len(view.features))
        where_mask = f"{where}[piggymask][{name}]"
        piggymask = _checked(_lookup(piggymasks, name, f"{where}[piggymask]"), layer.weight.shape, where_mask)
        owner = owners[module][tuple(slice(0, n) for n in layer.weight.shape)]
        dropped = int((piggymask[owner == tag] <= THRESHOLD).sum())
        if dropped:  # CPG zeroes the piggymask's gradient there, so its code never does this
            raise ClrunError(f"{where_mask} drops {dropped} of the task's own weights, which clrun's CPG always uses")
        picks[module] = (piggymask > THRESHOLD) & (owner >= 1) & (owner < tag)
    return picks


def adopt(checkpoint: dict, method, stream) -> list[dict]:
    """Load CPG's `checkpoint` into `method`, a fresh clrun CPG on the same tasks (`Run.execute`'s `adopt`)."""
    history = list(checkpoint["dataset_history"])
    names = [task.name for task in stream.tasks]
    if history != names:
        raise ClrunError(
            f"the checkpoint's tasks are {', '.join(history)} but the stream's {', '.join(names)}: use "
            f"stream=cifar100_20 stream.n_tasks={len(history)}"
        )
    state = {key.removeprefix("module."): value for key, value in checkpoint["model_state_dict"].items()}
    masks = {key.removeprefix("module."): value for key, value in checkpoint["masks"].items()}
    infos = [_lookup(checkpoint["shared_layer_info"], name, "shared_layer_info") for name in history]
    # CPG stores the channel multiplier sqrt(m) (1.0 when absent, as its inference assumes); clrun the m
    multipliers = [round(float(info.get("network_width_multiplier", 1.0)) ** 2, 6) for info in infos]
    if multipliers != sorted(multipliers):
        raise ClrunError(f"shared_layer_info's network_width_multiplier shrinks from task to task: {multipliers}")

    widest = _structure(method, multipliers[-1])
    n = len(widest.features)
    places = {_cpg_key(key, n) for key in widest.state_dict()}
    for key in state:
        if key not in places and not key.startswith(("classifier.", "classifiers.")) and "piggymask" not in key:
            raise ClrunError(
                f"model_state_dict's {key} has no place in clrun's vgg16_bn: only checkpoints of CPG's "
                "custom_vgg_cifar100 (CPG_cifar100_main_normal.py) can be imported"
            )
    net_state, owners = {}, {}
    for module, layer in shared_layers(widest).items():
        name = _cpg_key(module, n)
        weight = _checked(_lookup(state, f"{name}.weight", "model_state_dict"), layer.weight.shape, f"{name}.weight")
        owner = _checked(_lookup(masks, name, "masks"), layer.weight.shape, f"masks[module.{name}]").to(torch.uint8)
        net_state[f"backbone.{module}.weight"] = weight.float() * (owner > 0)  # released weights are 0 (end_task)
        net_state[f"backbone.{module}.owner"] = owners[module] = owner

    records, head_shapes = [], []
    for index, (task, info, multiplier) in enumerate(zip(stream.tasks, infos, multipliers, strict=True)):
        view, where = _structure(method, multiplier), f"shared_layer_info[{task.name}]"
        picks = _picks(view, info, owners, index + 1, where)
        records.append({"multiplier": multiplier, "private": _private(view, info, where), "pick": picks})
        n_classes, features = task.n_classes, view.out_features
        head_shapes.append((n_classes, features))
        for suffix, shape in (("weight", (n_classes, features)), ("bias", (n_classes,))):
            key = f"classifiers.{index}.{suffix}"
            head = _checked(_lookup(state, key, "model_state_dict"), torch.Size(shape), key)
            net_state[f"heads.heads.{index}.{suffix}"] = head.float()
    net_state |= {f"backbone.{key}": value for key, value in records[-1]["private"].items()}
    extra = {"multiplier": multipliers[-1], "records": records, "head_shapes": head_shapes}
    method.load_state_dict({"net": net_state, "extra": extra})
    return [{"width_multiplier": multiplier} for multiplier in multipliers]


def import_checkpoint(path: Path, overrides=(), out: Path | None = None, console: Console | None = None):
    """Write the clrun run folder of CPG's checkpoint at `path` (the folder `clrun <overrides>` uses, or `out`),
    evaluating every task; print the report; return (the summary row, the folder)."""
    checkpoint = read_checkpoint(Path(path))
    overrides = list(overrides)
    if not any(o.lstrip("+~").startswith("experiment=") for o in overrides):
        overrides.insert(0, PRESET)
    cfg = compose(overrides)
    if not issubclass(check_config(cfg), CPG) or cfg.backbone.name != "vgg16_bn":
        raise ClrunError(
            "CPG's CIFAR-100 checkpoints need method=cpg and backbone=vgg16_bn, "
            f"not method={cfg.method.name} backbone={cfg.backbone.name}"
        )
    run_dir = Path(out) if out else Path(RUNS_DIR) / run_name(cfg)
    console = console or Console()
    try:
        summary = Run(cfg, run_dir, console, overrides).execute(adopt=partial(adopt, checkpoint))
    finally:
        discard_unstarted(run_dir)
    again = [*overrides, *([f"hydra.run.dir={run_dir}"] if out else [])]
    last = summary["n_tasks"] - 1
    console.print(
        f"CPG's checkpoint holds the network after its last task only: row {last} (every task's accuracy after "
        f"task {last}) is measured; the other rows, BWT and forgetting are not.",
        markup=False,
        soft_wrap=True,
    )
    console.print(
        f"`clrun {' '.join(again)}` finds this run finished and prints it again.", markup=False, soft_wrap=True
    )
    return summary, run_dir


def main(argv: list[str] | None = None) -> None:
    """The `clrun-import-cpg` console script."""
    parser = argparse.ArgumentParser(
        prog="clrun-import-cpg",
        description="Evaluate a checkpoint of ivclab/CPG's CIFAR-100 code (checkpoint-<epoch>.pth.tar) as a clrun "
        f"CPG run: write its run folder and print its accuracy matrix (only the last row: CPG saves the network "
        f"after the last task). The overrides are clrun's; {PRESET} comes first unless they name an experiment.",
    )
    parser.add_argument("checkpoint", type=Path, help="CPG's checkpoint file")
    parser.add_argument("overrides", nargs="*", help="clrun's config overrides, e.g. data.root=...")
    parser.add_argument("--out", type=Path, help="the run folder (default: the one `clrun <overrides>` uses)")
    args = parser.parse_args(argv)
    try:
        import_checkpoint(args.checkpoint, args.overrides, args.out)
    except ClrunError as error:
        print(f"clrun-import-cpg: error: {' '.join(str(error).split())}", file=sys.stderr)  # always one line
        sys.exit(2)
