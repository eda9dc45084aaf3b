"""Streams whose tasks each take classes of their own dataset (the CTrL streams of Veniat et al. 2021).

`stream.split=tasks` lists the tasks one by one in `stream.tasks`, each a mapping with the keys of `TaskEntry`;
`stream.split=random_tasks` draws `stream.n_tasks` of them (`stream.random_tasks`: CTrL's S_long). Every image is
brought to one shape: the most channels among the datasets (grey images repeated to RGB, as CTrL's
`expand_channels`) and `stream.image_size` (default: the largest), resized bilinearly (CTrL: 32x32).
"""

import logging
from dataclasses import dataclass, fields

import torch
from omegaconf import OmegaConf

from clrun.data.readers import DATASETS
from clrun.data.stream import Split
from clrun.errors import ClrunError

log = logging.getLogger("clrun")


@dataclass
class TaskEntry:
    """One task of a composed stream."""

    dataset: str  # a built-in dataset: mnist, fashion_mnist, cifar10, cifar100
    classes: list[int] | None = None  # its classes in local-label order (null: all); [9, 0, 1, ...] relabels
    train_per_class: int | None = None  # training images per class, a seeded random subset (null: all)
    test_per_class: int | None = None  # test images per class (null: all)
    background: list[int] | None = None  # [R, G, B]: CTrL's rainbow transformation, the black background recoloured
    name: str | None = None  # default: <dataset>_<task index>


def task_entries(cfg, rule: str, g: torch.Generator) -> list[TaskEntry]:
    """The first `stream.n_tasks` entries of `stream.tasks`, or `stream.n_tasks` drawn by `stream.random_tasks`."""
    if rule == "tasks":
        listed = OmegaConf.to_container(cfg.tasks, resolve=True) if cfg.tasks is not None else []
        if cfg.n_tasks > len(listed):
            raise ClrunError(
                f"stream {cfg.name}: stream.tasks lists {len(listed)} tasks, not stream.n_tasks={cfg.n_tasks}"
            )
        return [_entry(item, f"stream.tasks.{i}") for i, item in enumerate(listed[: cfg.n_tasks])]
    return _random_entries(cfg, g)


def _entry(item, path: str) -> TaskEntry:
    if not isinstance(item, dict):
        raise ClrunError(f"{path}: expected a mapping such as {{dataset: mnist, train_per_class: 40}}, not {item!r}")
    known = [f.name for f in fields(TaskEntry)]
    unknown = next((key for key in item if key not in known), None)
    if unknown is not None:
        raise ClrunError(f"{path}.{unknown}: not a task key; a task has {', '.join(known)}")
    if item.get("dataset") not in DATASETS:
        raise ClrunError(f"{path}.dataset={item.get('dataset')}: name a built-in dataset ({', '.join(DATASETS)})")
    entry = TaskEntry(**item)
    n = DATASETS[entry.dataset].n_classes
    if entry.classes is not None and (not entry.classes or not all(0 <= c < n for c in entry.classes)):
        raise ClrunError(f"{path}.classes={entry.classes}: class ids of {entry.dataset}, 0..{n - 1}")
    if entry.background is not None and (
        len(entry.background) != 3 or not all(0 <= v <= 255 for v in entry.background)
    ):
        raise ClrunError(f"{path}.background={entry.background}: an [R, G, B] colour, each 0..255")
    return entry


def _random_entries(cfg, g: torch.Generator) -> list[TaskEntry]:
    """CTrL's S_long draw (`ctrl/streams/s_long.yaml`): per task a dataset uniformly from `datasets`, then
    `classes_per_task` of its classes at random, then a training size uniformly from the options of its stage
    (task k is in stage i when k has passed i of the `steps`)."""
    spec = OmegaConf.to_container(cfg.random_tasks, resolve=True) if cfg.random_tasks is not None else None
    keys = ("datasets", "steps", "train_per_class", "test_per_class")
    if not isinstance(spec, dict) or set(spec) != set(keys):
        raise ClrunError(f"stream.random_tasks: a mapping of {', '.join(keys)} (see conf/stream/ctrl_long.yaml)")
    if len(spec["train_per_class"]) != len(spec["steps"]) + 1 or not all(spec["train_per_class"]):
        raise ClrunError("stream.random_tasks.train_per_class: one non-empty list of options per stage, len(steps) + 1")
    entries = []
    for k in range(cfg.n_tasks):
        dataset = spec["datasets"][int(torch.randint(len(spec["datasets"]), (), generator=g))]
        if dataset not in DATASETS:
            raise ClrunError(
                f"stream.random_tasks.datasets: {dataset} is not a built-in dataset ({', '.join(DATASETS)})"
            )
        n = DATASETS[dataset].n_classes
        if cfg.classes_per_task > n:
            raise ClrunError(f"stream.classes_per_task={cfg.classes_per_task}: {dataset} has {n} classes")
        classes = torch.randperm(n, generator=g)[: cfg.classes_per_task].tolist()
        options = spec["train_per_class"][sum(k >= step for step in spec["steps"])]
        size = options[int(torch.randint(len(options), (), generator=g))]
        entries.append(TaskEntry(dataset, classes, size, spec["test_per_class"], name=f"{dataset}_{k}"))
    return entries


def per_class(x: torch.Tensor, y: torch.Tensor, classes: list[int], n: int | None, g: torch.Generator, where: str):
    """Up to `n` images of each class (a seeded random subset, in dataset order), labelled by their position in
    `classes`; warns when a class has fewer."""
    keep, labels, short = [], [], []
    for label, c in enumerate(classes):
        rows = (y == c).nonzero().squeeze(1)
        if n is not None and len(rows) > n:
            rows = rows[torch.randperm(len(rows), generator=g)[:n].sort().values]
        elif n is not None and len(rows) < n:
            short.append(f"{c} ({len(rows)})")
        keep.append(rows)
        labels.append(torch.full((len(rows),), label, dtype=torch.long))
    if short:
        log.warning("%s: fewer than the %d images a class asked for class %s", where, n, ", ".join(short))
    order = torch.cat(keep).sort()
    return x[order.values], torch.cat(labels)[order.indices]


def formatted(x: torch.Tensor, channels: int, size: tuple[int, int], background: list[int] | None) -> torch.Tensor:
    """uint8 images with `channels` channels (grey repeated) at `size`, the background recoloured when asked
    (CTrL's `change_background_color`: x + (max - x) * colour)."""
    from torchvision.transforms.functional import resize

    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)
    if tuple(x.shape[2:]) != size:
        x = resize(x, list(size), antialias=True)
    if background is not None:
        colour = torch.tensor(background, dtype=torch.float32).view(1, -1, 1, 1) / 255
        x = (x + (255 - x.float()) * colour).round().clamp(0, 255).to(torch.uint8)
    return x.contiguous()


def composed_splits(cfg, entries: list[TaskEntry], root: str, download: bool, g: torch.Generator):
    """Each entry's (name, classes, train Split, test Split) on the CPU, in one image shape."""
    loaded = {
        name: tuple(DATASETS[name].read(root, train, download)[:2] for train in (True, False))
        for name in dict.fromkeys(e.dataset for e in entries)
    }
    shapes = [x.shape[1:] for (x, _), _ in loaded.values()]
    channels = max(s[0] for s in shapes)
    size = (
        tuple(cfg.image_size) if cfg.image_size is not None else (max(s[1] for s in shapes), max(s[2] for s in shapes))
    )
    out = []
    for index, entry in enumerate(entries):
        name = entry.name or f"{entry.dataset}_{index}"
        classes = entry.classes or list(range(DATASETS[entry.dataset].n_classes))
        splits = []
        for (x, y), n, limit, part in zip(
            loaded[entry.dataset],
            (entry.train_per_class, entry.test_per_class),
            (cfg.train_per_task, cfg.test_per_task),
            ("training", "test"),
            strict=True,
        ):
            images, labels = per_class(x, y, classes, n, g, f"stream {cfg.name}, task {name}, {part}")
            if limit is not None and len(labels) > limit:
                rows = torch.randperm(len(labels), generator=g)[:limit].sort().values
                images, labels = images[rows], labels[rows]
            splits.append(Split(formatted(images, channels, size, entry.background), labels))
        out.append((name, classes, *splits))
    return out
