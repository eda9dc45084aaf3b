"""Build a task stream from a stream config: load a dataset (image files through the decoded-image cache), cut it
into tasks, place it on the device where it fits."""

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from clrun.config import TASK_VIEW_KEYS, CropRule, Normalization, Scenario, SplitRule, with_changes
from clrun.data.batches import InputView
from clrun.data.cache import decode_images
from clrun.data.composed import composed_splits, task_entries
from clrun.data.image_files import ImageFiles, ImageList, PairFiles, TaskFiles
from clrun.data.readers import (
    DATASETS,
    READER_KEY,
    SYNTHETIC,
    check_dataset,
    is_reader,
    read_cifar100_names,
    read_custom,
    read_image_files,
    warn_if_partial,
)
from clrun.data.stream import Pairs, Split, Stream, Task
from clrun.data.synthetic import make_synthetic
from clrun.errors import ClrunError

log = logging.getLogger("clrun")

Transform = Callable[[torch.Tensor], torch.Tensor]

SYNTHETIC_PER_TASK = (1000, 400)  # synthetic training and test images per task when the config leaves them null
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DEVICE_SHARE = 0.5  # the stream's images stay on a CUDA device when they take at most this share of its free memory

# CPG's 20 CIFAR-100 tasks: the superclasses in coarse-label order, each with its fine classes alphabetically
SUPERCLASSES = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}


@dataclass
class Loaded:
    """A dataset as loaded: uint8 images and labels of each split, the class count, how to get the dataset's own
    (mean, std) (called only when `stream.normalize=dataset`: a pass over every training image), the tasks its
    release fixes (None: the split rule cuts), and the labels of files skipped as corrupt."""

    train: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    n_classes: int
    stats: Callable[[], tuple[tuple[float, ...], tuple[float, ...]]]
    tasks: tuple[TaskFiles, ...] | None = None
    train_rows: torch.Tensor | None = None  # per decoded image, its index in the reader's list (release tasks)
    test_rows: torch.Tensor | None = None
    skipped_labels: list[int] = field(default_factory=list)
    pairs: dict[str, Pairs] = field(default_factory=dict)  # verification tasks' test pairs, by task name (on the CPU)
    task_cfgs: dict[str, DictConfig] = field(default_factory=dict)  # the stream config of each task in task_views


def build_stream(cfg, data, seed: int, device: torch.device | str, console: Console | None = None) -> Stream:
    """The stream a StreamConfig node describes, with uint8 images on `device` where they fit (`data`: the run's
    DataConfig: root, download, cache, skip_corrupt; `console`: where the cache shows its progress).

    Class order, permutations, subsets and synthetic images come from `cfg.split_seed`,
    or from `seed` when it is null. Task k's local label i is global class `classes[i]`.
    """
    check_dataset(cfg)
    kind = SplitRule(cfg.split)
    if cfg.n_tasks < 1 or cfg.classes_per_task < 1:
        raise ClrunError(f"stream {cfg.name}: n_tasks and classes_per_task must be at least 1")
    if cfg.task_views and kind is not SplitRule.release:
        raise ClrunError("stream.task_views names tasks of a dataset's release: it needs stream.split=release")
    stream_seed = seed if cfg.split_seed is None else cfg.split_seed
    g = torch.Generator().manual_seed(stream_seed)
    if kind in (SplitRule.tasks, SplitRule.random_tasks):
        return _composed_stream(cfg, kind, data, g, torch.device(device))
    loaded = _load(cfg, kind, data, stream_seed, console)
    (x_train, y_train), (x_test, y_test) = loaded.train, loaded.test
    specs = _task_specs(cfg, kind, loaded, x_train.shape, data.root, data.download, g)
    verifying = sorted(set(loaded.pairs) & {spec[0] for spec in specs})
    if verifying and cfg.scenario is not Scenario.task:
        raise ClrunError(
            f"stream {cfg.name}: {verifying[0]} is a verification task (scored by pairs, with its task id): "
            f"stream.scenario=task only (got {cfg.scenario.value})"
        )
    device = torch.device(device)
    place = device if _fits(device, x_train, x_test) else torch.device("cpu")
    tasks = []
    for index, (name, classes, transform, rows) in enumerate(specs):
        train = _task_split(x_train, y_train, classes, cfg.train_per_task, transform, g, place, rows[0])
        if name in loaded.pairs:  # a verification task: tested on every pair (a fold needs them all)
            pairs = loaded.pairs[name]
            test = Pairs(pairs.x.to(place), pairs.a.to(place), pairs.b.to(place), pairs.same.to(place))
        else:
            test = _task_split(x_test, y_test, classes, cfg.test_per_task, transform, g, place, rows[1])
        if not len(train) or not len(test):
            split = "training" if not len(train) else "test"
            raise ClrunError(
                f"stream {cfg.name}: task {name} has no {split} images; add its {split} files under data.root, "
                f"or leave the task out of the stream (e.g. stream.dataset.datasets, stream.n_tasks)"
            )
        skipped = sum(label in classes for label in loaded.skipped_labels)
        tasks.append(Task(index, name, classes, train, test, skipped))
    _hold_out(cfg, tasks, stream_seed)
    view = _input_view(cfg, loaded.stats, tuple(x_train.shape[1:]), tasks, loaded.task_cfgs)
    input_shape = (x_train.shape[1], *view.size) if view.size else tuple(x_train.shape[1:])
    return Stream(cfg.name, tasks, input_shape, view, cfg.scenario.value, device)


def _composed_stream(cfg, kind: SplitRule, data, g: torch.Generator, device: torch.device) -> Stream:
    """A stream whose tasks each take classes of their own dataset (`clrun.data.composed`); `normalize=dataset`
    uses the statistics of all its training images."""
    splits = composed_splits(cfg, task_entries(cfg, kind.value, g), data.root, data.download, g)
    images = [split.x for _, _, *pair in splits for split in pair]
    place = device if _fits(device, *images) else torch.device("cpu")
    tasks = [
        Task(index, name, classes, *(Split(s.x.to(place), s.y.to(place)) for s in pair))
        for index, (name, classes, *pair) in enumerate(splits)
    ]
    _hold_out(cfg, tasks, g.initial_seed())
    train = torch.cat([task.train.x.cpu() for task in tasks])
    view = _input_view(cfg, partial(_channel_stats, train), tuple(train.shape[1:]), tasks, {})
    input_shape = (train.shape[1], *view.size) if view.size else tuple(train.shape[1:])
    return Stream(cfg.name, tasks, input_shape, view, cfg.scenario.value, device)


def _hold_out(cfg, tasks: list[Task], seed: int) -> None:
    """Move `stream.val_fraction` of each task's training images, drawn per class (each class keeps at least one
    training image) by a generator of `seed` of its own, from `train` to `val`; the rest of the stream is as
    without a validation split."""
    if not cfg.val_fraction:
        return
    g = torch.Generator().manual_seed(seed)
    for task in tasks:
        if task.verification:
            raise ClrunError(
                f"stream.val_fraction: task {task.name} is scored by verification pairs, which a validation split "
                "of its training identities cannot give; set stream.val_fraction=0 or leave the task out"
            )
        y = task.train.y.cpu()
        held = []
        for label in y.unique().tolist():
            rows = (y == label).nonzero().squeeze(1)
            n = min(int(cfg.val_fraction * len(rows) + 0.5), len(rows) - 1)
            held.append(rows[torch.randperm(len(rows), generator=g)[:n]])
        held = torch.cat(held).sort().values
        if not len(held):
            raise ClrunError(
                f"stream.val_fraction={cfg.val_fraction} holds out no image of task {task.name}'s {len(y)} training "
                "images; raise it (or stream.train_per_task)"
            )
        keep = torch.ones(len(y), dtype=torch.bool)
        keep[held] = False
        x, labels = task.train.x, task.train.y
        task.val = Split(x[held.to(x.device)], labels[held.to(labels.device)])
        task.train = Split(x[keep.to(x.device)], labels[keep.to(labels.device)])


def _input_view(cfg, stats, image_shape: tuple[int, ...], tasks: list[Task], task_cfgs: dict) -> InputView:
    """The stream's InputView: its augmentation keys and the normalisation `stream.normalize` names; with
    `task_cfgs` (`stream.task_views`), each task's training augmentation."""
    task_stats = None
    if cfg.normalize is Normalization.task:
        if cfg.scenario is not Scenario.task:
            raise ClrunError(
                f"stream.normalize=task normalises each task's images by its own statistics, which needs the task "
                f"id at test time: stream.scenario=task only (got {cfg.scenario.value})"
            )
        task_stats = tuple(_measured_stats(task.train.x) for task in tasks)
        mean, std = task_stats[0]
    elif cfg.normalize is Normalization.dataset:
        mean, std = stats()
    elif cfg.normalize is Normalization.imagenet:
        mean, std = IMAGENET_STATS
    else:
        mean, std = (0.5,) * image_shape[0], (0.5,) * image_shape[0]
    if len(mean) != image_shape[0]:
        channels = f"{len(mean)} channels, the images {image_shape[0]}"
        raise ClrunError(f"stream.normalize={cfg.normalize.value} has {channels}")
    size = tuple(cfg.input_size) if cfg.input_size is not None else None
    if size is not None and (len(size) != 2 or size[0] > image_shape[1] or size[1] > image_shape[2]):
        images = f"{image_shape[1]}x{image_shape[2]}"
        raise ClrunError(f"stream.input_size={list(size)} must be [H, W] no larger than the images ({images})")
    view = InputView(tuple(mean), tuple(std), size=size, task_stats=task_stats, **_augmentation(cfg))
    if not task_cfgs:
        return view
    own = tuple(replace(view, **_augmentation(task_cfgs.get(task.name, cfg))) for task in tasks)
    return replace(view, task_views=own)


def _augmentation(cfg) -> dict:
    """The InputView's augmentation keys from a stream config."""
    keys = {"augment": bool(cfg.augment), "crop": cfg.crop.value, "padding": cfg.padding, "flip": cfg.flip}
    return keys | {"scale": tuple(cfg.scale), "ratio": tuple(cfg.ratio), "cutout": cfg.cutout}


def _fits(device: torch.device, *images: torch.Tensor) -> bool:
    """Whether images fit on `device` (always on the CPU; on CUDA within DEVICE_SHARE of its free memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return sum(x.numel() for x in images) <= DEVICE_SHARE * free


def _load(cfg, kind: SplitRule, data, seed: int, console: Console | None) -> Loaded:
    """The stream's dataset: a reader of image files (decoded once into the cache), a reader of tensors, the
    synthetic images, or a built-in dataset."""
    root, download = data.root, data.download
    if is_reader(cfg.dataset):
        files = read_image_files(cfg.dataset, root)
        if files is not None:
            return _decode(cfg, files, data, console)
        train, test = (read_custom(cfg.dataset, root, is_train) for is_train in (True, False))
        return Loaded(train, test, int(train[1].max()) + 1, partial(_channel_stats, train[0]))
    if cfg.dataset == SYNTHETIC:
        domain = kind in (SplitRule.permutation, SplitRule.rotation, SplitRule.label_permutation)
        n_classes = cfg.classes_per_task * (1 if domain else cfg.n_tasks)
        sizes = zip((cfg.train_per_task, cfg.test_per_task), SYNTHETIC_PER_TASK, strict=True)
        per_task = [default if n is None else n for n, default in sizes]
        x_train, y_train, x_test, y_test = make_synthetic(
            n_classes, *(math.ceil(n / cfg.classes_per_task) for n in per_task), seed
        )
        return Loaded((x_train, y_train), (x_test, y_test), n_classes, partial(_channel_stats, x_train))
    dataset = DATASETS[cfg.dataset]
    train, test = (dataset.read(root, is_train, download)[:2] for is_train in (True, False))
    return Loaded(train, test, dataset.n_classes, lambda: (dataset.mean, dataset.std))


def _decode(cfg, files: ImageFiles, data, console: Console | None) -> Loaded:
    """An image-file dataset's splits decoded through the cache at `stream.image_size`."""
    if cfg.image_size is None or len(cfg.image_size) != 2:
        raise ClrunError(
            f"stream {cfg.name} reads image files: set stream.image_size=[H,W], the size they are decoded to"
        )
    target = cfg.dataset._target_
    splits = (files.train, files.test)
    for official, split, part in zip(files.official or (None, None), splits, ("training", "test"), strict=True):
        warn_if_partial(f"{READER_KEY}={target}", official, len(split), part)
    size = (int(cfg.image_size[0]), int(cfg.image_size[1]))
    task_cfgs = _task_cfgs(cfg, [task.name for task in files.tasks or ()])
    own = ({}, {})  # per split: the files of tasks decoded by a rule of their own
    for task in files.tasks or ():
        rule = _decode_rule(cfg, task_cfgs[task.name], task.name) if task.name in task_cfgs else None
        if rule is None or rule == (cfg.resize.value, size):
            continue
        classes = set(task.classes)
        for rules, split, listed in zip(own, (files.train, files.test), (task.train, task.test), strict=True):
            rows = listed if listed is not None else [i for i, y in enumerate(split.labels) if y in classes]
            rules.update(dict.fromkeys(rows, rule))
    decoded = [
        decode_images(
            split,
            size,
            cfg.resize.value,
            data.cache,
            name=f"{cfg.name}-{part}",
            skip_corrupt=data.skip_corrupt,
            console=console,
            own=rules,
        )
        for part, split, rules in (("train", files.train, own[0]), ("test", files.test, own[1]))
    ]
    train, test = decoded
    pairs = {
        task.name: _decode_pairs(cfg, task.name, task.pairs, size, data, console)
        for task in files.tasks or ()
        if task.pairs is not None
    }
    skipped_labels = [
        split.labels[i] for split, d in zip((files.train, files.test), decoded, strict=True) for i in _skipped(split, d)
    ]
    return Loaded(
        (train.images, train.labels),
        (test.images, test.labels),
        len(files.classes),
        partial(_measured_stats, train.images),
        files.tasks,
        train.kept,
        test.kept,
        skipped_labels,
        pairs,
        task_cfgs,
    )


def _decode_pairs(cfg, task: str, files: PairFiles, size: tuple[int, int], data, console: Console | None) -> Pairs:
    """A verification task's pair images decoded through the cache, the pairs left whose images both decoded."""
    listed = ImageList(files.paths, (0,) * len(files.paths))
    decoded = decode_images(
        listed,
        size,
        cfg.resize.value,
        data.cache,
        name=f"{cfg.name}-{task}-pairs",
        skip_corrupt=data.skip_corrupt,
        console=console,
    )
    position = torch.full((len(files.paths),), -1, dtype=torch.long)
    position[decoded.kept] = torch.arange(len(decoded.kept))
    a, b = position[torch.tensor(files.a, dtype=torch.long)], position[torch.tensor(files.b, dtype=torch.long)]
    keep = (a >= 0) & (b >= 0)
    if not bool(keep.any()):
        raise ClrunError(f"stream {cfg.name}: task {task} has no verification pair whose two images decode")
    return Pairs(decoded.images, a[keep], b[keep], torch.tensor(files.same, dtype=torch.bool)[keep])


def _task_cfgs(cfg, names: list[str]) -> dict[str, DictConfig]:
    """The stream config of each task `stream.task_views` names (one of the release's `names`): the stream's with
    the task's changes, which may touch only TASK_VIEW_KEYS, checked as the run's config is."""
    task_cfgs = {}
    for name, changes in (cfg.task_views or {}).items():
        path = f"stream.task_views.{name}"
        if name not in names:
            known = ", ".join(names)
            raise ClrunError(f"{path}: the release has no task {name} (its tasks: {known}); drop it: ~{path}")
        if not isinstance(changes, DictConfig):
            raise ClrunError(f"{path}: expected a mapping of stream keys to change, e.g. {{crop: none}}, not {changes}")
        unknown = next((key for key in changes if key not in TASK_VIEW_KEYS), None)
        if unknown is not None:
            raise ClrunError(f"{path}.{unknown}: not a per-task key; a task may change {', '.join(TASK_VIEW_KEYS)}")
        task_cfgs[name] = with_changes(cfg, OmegaConf.to_container(changes, resolve=True), path)
    return task_cfgs


def _decode_rule(cfg, task_cfg, name: str) -> tuple[str, tuple[int, int]]:
    """A task's (resize, image_size). An image_size below the stream's (its images centred on zeros) must hold
    `input_size`, and a random resized crop, which would take the zero border, is refused."""
    path = f"stream.task_views.{name}"
    stream_size, own = tuple(cfg.image_size), tuple(task_cfg.image_size or ())
    if own != stream_size:
        low = tuple(cfg.input_size) if cfg.input_size is not None else stream_size
        if len(own) != 2 or not all(a <= b <= c for a, b, c in zip(low, own, stream_size, strict=True)):
            shown = None if task_cfg.image_size is None else list(task_cfg.image_size)
            raise ClrunError(
                f"{path}.image_size={shown} must be [H, W] between stream.input_size {list(low)} and "
                f"stream.image_size {list(stream_size)}"
            )
        if task_cfg.augment and task_cfg.crop is CropRule.resized:
            raise ClrunError(
                f"{path}.crop=resized would crop the zero border around its smaller image_size: set crop none or pad"
            )
    return task_cfg.resize.value, (int(own[0]), int(own[1]))


def _skipped(files, decoded) -> list[int]:
    """Positions in the reader's list of the files the cache skipped as corrupt."""
    kept = set(decoded.kept.tolist())
    return [i for i in range(len(files)) if i not in kept]


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    pixels = images.float().div_(255)
    return tuple(pixels.mean((0, 2, 3)).tolist()), _divisors(pixels.std((0, 2, 3)).tolist())


def _divisors(std: list[float]) -> tuple[float, ...]:
    """The stds normalisation divides by: a constant channel's (std about 0) is 1, so it becomes 0, not NaN."""
    return tuple(s if s > 1e-4 else 1.0 for s in std)


def _measured_stats(images: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1], summed `chunk` images at a time in float64 (the
    decoded images of a file dataset can be larger than memory)."""
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64, device=images.device)  # images may be on the GPU already
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        pixels = images[start : start + chunk].to(torch.float64).div_(255)
        total += pixels.sum((0, 2, 3))
        squares += pixels.square().sum((0, 2, 3))
    count = max(images.numel() // channels, 2)
    mean = total / count
    std = ((squares - count * mean.square()) / (count - 1)).clamp_min(0).sqrt()
    return tuple(mean.tolist()), _divisors(std.tolist())


TaskSpec = tuple[str, list[int], Transform | None, tuple[torch.Tensor | None, torch.Tensor | None]]
EVERY_ROW = (None, None)  # a task's images are those of its classes


def _task_specs(
    cfg, kind: SplitRule, loaded: Loaded, shape: torch.Size, root: str, download: bool, g: torch.Generator
) -> list[TaskSpec]:
    """Each task's name, global classes, input transform (None: the images as they are) and, for tasks a
    release fixes, which decoded rows of each split may belong to it."""
    n_classes = loaded.n_classes
    every = list(range(n_classes))
    if kind is SplitRule.release:
        return _release_tasks(cfg, loaded)
    if loaded.tasks is not None:
        raise ClrunError(f"stream {cfg.name}: its dataset's release fixes the tasks: set stream.split=release")
    if kind is SplitRule.permutation:
        perms = [torch.randperm(shape[2] * shape[3], generator=g) for _ in range(cfg.n_tasks - 1)]
        specs = [("perm0", every, None)] + [(f"perm{k + 1}", every, _permute(p)) for k, p in enumerate(perms)]
        return [(*spec, EVERY_ROW) for spec in specs]
    if kind is SplitRule.label_permutation:
        orders = [torch.randperm(n_classes, generator=g).tolist() for _ in range(cfg.n_tasks - 1)]
        return [("labels0", every, None, EVERY_ROW)] + [
            (f"labels{k + 1}", order, None, EVERY_ROW) for k, order in enumerate(orders)
        ]
    if kind is SplitRule.rotation:
        degrees = [k * cfg.max_rotation / cfg.n_tasks for k in range(cfg.n_tasks)]
        return [(f"rot{k}_{d:g}deg", every, _rotate(d) if d else None, EVERY_ROW) for k, d in enumerate(degrees)]
    if kind is SplitRule.superclass:
        return [(name, classes, None, EVERY_ROW) for name, classes in _superclass_tasks(cfg, root, download)]
    c = cfg.classes_per_task
    if cfg.n_tasks * c > n_classes:
        raise ClrunError(
            f"stream {cfg.name}: {cfg.n_tasks} tasks x {c} classes need {cfg.n_tasks * c} classes, "
            f"{_dataset_name(cfg.dataset)} has {n_classes}"
        )
    order = every if kind is SplitRule.contiguous else torch.randperm(n_classes, generator=g).tolist()
    cuts = [order[k * c : (k + 1) * c] for k in range(cfg.n_tasks)]
    return [("-".join(map(str, classes)), classes, None, EVERY_ROW) for classes in cuts]


def _release_tasks(cfg, loaded: Loaded) -> list[TaskSpec]:
    """The first `n_tasks` tasks the dataset's release fixes, each restricted to the decoded rows its files
    became."""
    if loaded.tasks is None:
        raise ClrunError(f"stream {cfg.name}: split release needs a dataset whose reader lists its tasks")
    if cfg.n_tasks > len(loaded.tasks):
        raise ClrunError(f"stream {cfg.name}: the release has {len(loaded.tasks)} tasks, not {cfg.n_tasks}")
    specs = []
    for task in loaded.tasks[: cfg.n_tasks]:
        rows = tuple(
            None if listed is None else torch.isin(kept, torch.tensor(listed, dtype=torch.long)).nonzero().squeeze(1)
            for listed, kept in ((task.train, loaded.train_rows), (task.test, loaded.test_rows))
        )
        specs.append((task.name, list(task.classes), None, rows))
    return specs


def _dataset_name(dataset) -> str:
    return f"the reader {dataset._target_}" if is_reader(dataset) else str(dataset)


def _superclass_tasks(cfg, root: str, download: bool) -> list[tuple[str, list[int]]]:
    """CPG's CIFAR-100 tasks (superclass name, fine class ids), checked against the dataset's meta names."""
    if cfg.dataset != "cifar100":
        raise ClrunError(f"stream {cfg.name}: split superclass needs dataset cifar100, not {cfg.dataset}")
    if cfg.n_tasks > len(SUPERCLASSES):
        raise ClrunError(f"stream {cfg.name}: split superclass has {len(SUPERCLASSES)} tasks, not {cfg.n_tasks}")
    fine_names, coarse_names = read_cifar100_names(root, download)
    ids = {name: i for i, name in enumerate(fine_names)}
    if coarse_names != list(SUPERCLASSES) or set(ids) != {f for fines in SUPERCLASSES.values() for f in fines}:
        raise ClrunError(f"CIFAR-100 meta file under {root}: class names differ from the official CIFAR-100 names")
    return [(name, [ids[f] for f in fines]) for name, fines in list(SUPERCLASSES.items())[: cfg.n_tasks]]


def _permute(perm: torch.Tensor) -> Transform:
    """Shuffle the pixel positions of an (N, C, H, W) batch, the same way in every channel."""
    return lambda x: x.flatten(2)[:, :, perm.to(x.device)].view_as(x)


def _rotate(degrees: float) -> Transform:
    """Rotate an (N, C, H, W) uint8 batch counter-clockwise, filling the corners with zeros."""
    from torchvision.transforms.functional import InterpolationMode, rotate

    return lambda x: rotate(x, degrees, InterpolationMode.BILINEAR)


def _task_split(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[int],
    limit: int | None,
    transform: Transform | None,
    g: torch.Generator,
    device: torch.device | str,
    rows: torch.Tensor | None = None,
) -> Split:
    """The images of `classes` (among `rows`, when given) with local labels, a seeded subset of at most `limit`,
    transformed, on `device`."""
    wanted = torch.tensor(classes)
    keep = torch.isin(y, wanted).nonzero().squeeze(1)
    if rows is not None:
        keep = keep[torch.isin(keep, rows)]
    if limit is not None and len(keep) > limit:
        keep = keep[torch.randperm(len(keep), generator=g)[:limit].sort().values]
    images = x[keep].to(device)
    labels = (y[keep, None] == wanted).int().argmax(1)
    return Split(images if transform is None else transform(images), labels.to(device))
