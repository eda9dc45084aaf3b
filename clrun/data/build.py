"""Build a task stream from a stream config: load a dataset, cut it into tasks, place it on the device."""

import math
from collections.abc import Callable

import torch
from torchvision.transforms.functional import InterpolationMode, rotate

from clrun.config import SplitRule
from clrun.data.readers import DATASETS, SYNTHETIC, check_dataset, is_reader, read_cifar100_names, read_custom
from clrun.data.stream import Split, Stream, Task
from clrun.data.synthetic import make_synthetic
from clrun.errors import ClrunError

Transform = Callable[[torch.Tensor], torch.Tensor]

SYNTHETIC_PER_TASK = (1000, 400)  # synthetic training and test images per task when the config leaves them null

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


def build_stream(cfg, root: str, download: bool, seed: int, device: torch.device | str) -> Stream:
    """The stream a StreamConfig node describes, uint8 images on `device`.

    Class order, permutations, subsets and synthetic images come from `cfg.split_seed`,
    or from `seed` when it is null. Task k's local label i is global class `classes[i]`.
    """
    check_dataset(cfg)
    kind = SplitRule(cfg.split)
    if cfg.n_tasks < 1 or cfg.classes_per_task < 1:
        raise ClrunError(f"stream {cfg.name}: n_tasks and classes_per_task must be at least 1")
    stream_seed = seed if cfg.split_seed is None else cfg.split_seed
    g = torch.Generator().manual_seed(stream_seed)
    (x_train, y_train), (x_test, y_test), n_classes, (mean, std) = _load(cfg, kind, root, download, stream_seed)
    specs = _task_specs(cfg, kind, n_classes, x_train.shape, root, download, g)
    tasks = []
    for index, (name, classes, transform) in enumerate(specs):
        train = _task_split(x_train, y_train, classes, cfg.train_per_task, transform, g, device)
        test = _task_split(x_test, y_test, classes, cfg.test_per_task, transform, g, device)
        if not len(train) or not len(test):
            raise ClrunError(f"stream {cfg.name}: task {name} has no {'training' if not len(train) else 'test'} images")
        tasks.append(Task(index, name, classes, train, test))
    return Stream(cfg.name, tasks, tuple(x_train.shape[1:]), mean, std, bool(cfg.augment), cfg.scenario.value)


def _load(cfg, kind: SplitRule, root: str, download: bool, seed: int):
    """Training and test (images, labels), the class count and the (mean, std) of the stream's dataset (the
    synthetic one and a user's reader: measured on the training images)."""
    if is_reader(cfg.dataset):
        train, test = (read_custom(cfg.dataset, root, is_train) for is_train in (True, False))
        return train, test, int(train[1].max()) + 1, _channel_stats(train[0])
    if cfg.dataset == SYNTHETIC:
        domain = kind in (SplitRule.permutation, SplitRule.rotation)
        n_classes = cfg.classes_per_task * (1 if domain else cfg.n_tasks)
        sizes = zip((cfg.train_per_task, cfg.test_per_task), SYNTHETIC_PER_TASK, strict=True)
        per_task = [default if n is None else n for n, default in sizes]
        x_train, y_train, x_test, y_test = make_synthetic(
            n_classes, *(math.ceil(n / cfg.classes_per_task) for n in per_task), seed
        )
        return (x_train, y_train), (x_test, y_test), n_classes, _channel_stats(x_train)
    dataset = DATASETS[cfg.dataset]
    train, test = (dataset.read(root, is_train, download)[:2] for is_train in (True, False))
    return train, test, dataset.n_classes, (dataset.mean, dataset.std)


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images scaled to [0, 1]."""
    pixels = images.float().div_(255)
    return tuple(pixels.mean((0, 2, 3)).tolist()), tuple(pixels.std((0, 2, 3)).tolist())


def _task_specs(
    cfg, kind: SplitRule, n_classes: int, shape: torch.Size, root: str, download: bool, g: torch.Generator
) -> list[tuple[str, list[int], Transform | None]]:
    """Each task's name, global classes and input transform (None: the images as they are)."""
    every = list(range(n_classes))
    if kind is SplitRule.permutation:
        perms = [torch.randperm(shape[2] * shape[3], generator=g) for _ in range(cfg.n_tasks - 1)]
        return [("perm0", every, None)] + [(f"perm{k + 1}", every, _permute(p)) for k, p in enumerate(perms)]
    if kind is SplitRule.rotation:
        degrees = [k * cfg.max_rotation / cfg.n_tasks for k in range(cfg.n_tasks)]
        return [(f"rot{k}_{d:g}deg", every, _rotate(d) if d else None) for k, d in enumerate(degrees)]
    if kind is SplitRule.superclass:
        return [(name, classes, None) for name, classes in _superclass_tasks(cfg, root, download)]
    c = cfg.classes_per_task
    if cfg.n_tasks * c > n_classes:
        raise ClrunError(
            f"stream {cfg.name}: {cfg.n_tasks} tasks x {c} classes need {cfg.n_tasks * c} classes, "
            f"{_dataset_name(cfg.dataset)} has {n_classes}"
        )
    order = every if kind is SplitRule.contiguous else torch.randperm(n_classes, generator=g).tolist()
    cuts = [order[k * c : (k + 1) * c] for k in range(cfg.n_tasks)]
    return [("-".join(map(str, classes)), classes, None) for classes in cuts]


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
    return lambda x: rotate(x, degrees, InterpolationMode.BILINEAR)


def _task_split(
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[int],
    limit: int | None,
    transform: Transform | None,
    g: torch.Generator,
    device: torch.device | str,
) -> Split:
    """The images of `classes` with local labels, a seeded subset of at most `limit`, transformed on `device`."""
    wanted = torch.tensor(classes)
    keep = torch.isin(y, wanted).nonzero().squeeze(1)
    if limit is not None and len(keep) > limit:
        keep = keep[torch.randperm(len(keep), generator=g)[:limit].sort().values]
    images = x[keep].to(device)
    labels = (y[keep, None] == wanted).int().argmax(1)
    return Split(images if transform is None else transform(images), labels.to(device))
