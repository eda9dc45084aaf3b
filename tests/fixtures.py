"""Writers of small fake MNIST, CIFAR-10 and CIFAR-100 copies in the exact official on-disk formats, and of image
files for the image-folder readers' copies.

Images are seeded random bytes; labels cycle through every class. Each writer returns
what it wrote, as numpy arrays, so tests can compare a reader's output with it.
"""

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

CIFAR100_FINE_NAMES = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()
CIFAR100_COARSE_NAMES = (
    "aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices "
    "household_furniture insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes "
    "large_omnivores_and_herbivores medium_mammals non-insect_invertebrates people reptiles small_mammals trees "
    "vehicles_1 vehicles_2"
).split()
# the coarse label of each fine label, as in the official CIFAR-100 files
CIFAR100_COARSE_OF_FINE = np.array([
    4, 1, 14, 8, 0, 6, 7, 7, 18, 3, 3, 14, 9, 18, 7, 11, 3, 9, 7, 11, 6, 11, 5, 10, 7, 6, 13, 15, 3, 15,
    0, 11, 1, 10, 12, 14, 16, 9, 11, 5, 5, 19, 8, 8, 15, 13, 14, 17, 18, 10, 16, 4, 17, 4, 2, 0, 17, 4, 18, 17,
    10, 3, 2, 12, 12, 16, 12, 1, 9, 19, 2, 10, 0, 1, 16, 12, 9, 13, 15, 13, 16, 19, 2, 4, 6, 19, 5, 5, 8, 19,
    18, 1, 2, 15, 6, 0, 17, 8, 14, 13,
])  # fmt: skip


def write_mnist(
    root: Path, n_train: int, n_test: int, gz: bool = True, folder: str = "MNIST"
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Idx files under `<root>/<folder>/raw/` (MNIST; Fashion-MNIST with folder FashionMNIST, its files having
    MNIST's names and format); returns {"train"/"test": (images (N, 28, 28), labels)}."""
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    written = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images, gz)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels, gz)
        written[split] = images, labels
    return written


def write_idx(stem: Path, array: np.ndarray, gz: bool = True) -> Path:
    """An idx file of uint8 `array` at `stem` (plus `.gz` when `gz`): magic 0x0000080<ndim>, big-endian dims."""
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path = stem.with_name(stem.name + ".gz") if gz else stem
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_cifar10(root: Path, n_per_batch: int, n_test: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Python-version pickles under `<root>/cifar-10-batches-py/` (5 training batches, a test batch, batches.meta)."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    parts = {}
    for i, name in enumerate(names):
        n, first = (n_test, 0) if name == "test_batch" else (n_per_batch, i * n_per_batch)
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [(first + j) % 10 for j in range(n)]  # training labels cycle across the batches
        _pickle(folder / name, {b"batch_label": name.encode(), b"labels": labels, b"data": data})
        parts[name] = data, np.array(labels)
    _pickle(folder / "batches.meta", {b"label_names": [b"c%d" % i for i in range(10)], b"num_vis": 3072})
    train = [parts[n] for n in names[:5]]
    return {"train": tuple(np.concatenate(p) for p in zip(*train, strict=True)), "test": parts["test_batch"]}


def write_cifar100(root: Path, n_train: int, n_test: int) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Pickles `train`, `test` and `meta` (the official names) under `<root>/cifar-100-python/`."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(2)
    written = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = np.arange(n) % 100
        coarse = CIFAR100_COARSE_OF_FINE[fine]
        _pickle(folder / name, {
            b"filenames": [b"img_%d.png" % i for i in range(n)],
            b"batch_label": name.encode(),
            b"fine_labels": fine.tolist(),
            b"coarse_labels": coarse.tolist(),
            b"data": data,
        })  # fmt: skip
        written[name] = data, fine, coarse
    _pickle(folder / "meta", {
        b"fine_label_names": [n.encode() for n in CIFAR100_FINE_NAMES],
        b"coarse_label_names": [n.encode() for n in CIFAR100_COARSE_NAMES],
    })  # fmt: skip
    return written


def _pickle(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def write_image(path: Path, shade: int = 100) -> Path:
    """A real 20x16 RGB image file, JPEG or PNG by the suffix, its colour set by `shade`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (20, 16), (shade, 255 - shade, 40)).save(path)
    return path


def torchvision_model(name: str) -> nn.Module:
    """torchvision's `name` with random weights and random batch-norm statistics, in eval mode."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


# ivclab/CPG's VGG16 "D" config (CPG_cifar100_main_normal.py's custom_cfg) for custom_vgg_cifar100 (models/vgg.py)
CPG_VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def cpg_vgg_layers(width: float) -> list[tuple[str, str, tuple[int, ...]]]:
    """(module name, kind, weight shape) of CPG's `custom_vgg_cifar100` at channel multiplier `width`, in order:
    `features` holds conv, BatchNorm2d, ReLU per conv and a MaxPool per "M", then View, SharableLinear, ReLU,
    SharableLinear, ReLU. Kinds: conv, bn, pool (no tensors), linear."""
    layers, c, i = [], 3, 0
    for v in CPG_VGG16:
        if v == "M":
            layers.append((f"features.{i}", "pool", ()))
            i += 1
            continue
        out = int(v * width + 1e-6)
        layers += [(f"features.{i}", "conv", (out, c, 3, 3)), (f"features.{i + 1}", "bn", (out,))]
        c, i = out, i + 3
    hidden = int(4096 * width + 1e-6)
    return layers + [(f"features.{i + 1}", "linear", (hidden, c)), (f"features.{i + 3}", "linear", (hidden, hidden))]


def write_cpg_checkpoint(
    path: Path, tasks: list[str], multipliers: list[float], base: float = 1.0, n_classes: int = 5
) -> dict:
    """A checkpoint as ivclab/CPG's `Manager.save_checkpoint` writes it after the last of `tasks` (utils/manager.py):
    `model_state_dict` (the widest network, the last task's batch norm, biases and piggymask, every head
    `classifiers.<k>` at its task's width and the duplicate `classifier` of the last), `dataset_history`,
    `dataset2num_classes`, `masks` (`module.<layer>` -> uint8 owner at the widest size; a task owns nothing beyond
    its width) and `shared_layer_info` (per task: batch norm, linear biases as Parameters, float piggymasks from
    the second task on, its own weights' piggymask at CPG's 0.01, and `network_width_multiplier`, sqrt of the
    parameter multiplier). Channels are `base` times CPG's (CPG's release: 1). Returns the dict saved."""
    g = torch.Generator().manual_seed(0)
    widths = [base * math.sqrt(m) for m in multipliers]
    widest = cpg_vgg_layers(widths[-1])
    state, masks = {}, {}
    for name, kind, shape in widest:
        if kind in ("conv", "linear"):
            fan_in = math.prod(shape[1:])
            state[f"{name}.weight"] = torch.randn(shape, generator=g) * math.sqrt(2 / fan_in)
            owner = torch.randint(0, len(tasks) + 1, shape, generator=g, dtype=torch.uint8)
            for tag, width in enumerate(widths, 1):  # no task owns weights beyond its width
                own_width = dict((n, s) for n, _, s in cpg_vgg_layers(width))[name]
                outside = torch.ones(shape, dtype=torch.bool)
                outside[tuple(slice(0, n) for n in own_width)] = False
                owner[outside & (owner == tag)] = 0
            masks[f"module.{name}"] = owner
    info = {}
    for index, (task, width) in enumerate(zip(tasks, widths, strict=True)):
        fields = ("bias", "bn_layer_running_mean", "bn_layer_running_var", "bn_layer_weight", "bn_layer_bias")
        info[task] = {field: {} for field in (*fields, "piggymask")}
        info[task]["network_width_multiplier"] = math.sqrt(multipliers[index])
        for name, kind, shape in cpg_vgg_layers(width):
            if kind == "bn":
                n = shape[0]
                info[task]["bn_layer_weight"][name] = nn.Parameter(1 + 0.1 * torch.randn(n, generator=g))
                info[task]["bn_layer_bias"][name] = nn.Parameter(0.1 * torch.randn(n, generator=g))
                info[task]["bn_layer_running_mean"][name] = 0.1 * torch.randn(n, generator=g)
                info[task]["bn_layer_running_var"][name] = 0.5 + torch.rand(n, generator=g)
            elif kind in ("conv", "linear"):
                if kind == "linear":
                    info[task]["bias"][name] = nn.Parameter(0.1 * torch.randn(shape[0], generator=g))
                if index > 0:  # CPG's piggymask: trained over earlier tasks' weights, 0.01 elsewhere
                    piggymask = 0.02 * torch.rand(shape, generator=g)  # about a quarter at or below 5e-3
                    owner = masks[f"module.{name}"][tuple(slice(0, n) for n in shape)]
                    piggymask[(owner == 0) | (owner > index)] = 0.01
                    info[task]["piggymask"][name] = nn.Parameter(piggymask)
        hidden = int(4096 * width + 1e-6)
        state[f"classifiers.{index}.weight"] = 0.1 * torch.randn(n_classes, hidden, generator=g)
        state[f"classifiers.{index}.bias"] = 0.1 * torch.randn(n_classes, generator=g)
    last = info[tasks[-1]]
    for name, kind, _ in widest:  # the live network holds the last task's tensors
        if kind == "bn":
            for suffix in ("weight", "bias", "running_mean", "running_var"):
                state[f"{name}.{suffix}"] = last[f"bn_layer_{suffix}"][name].detach()
            state[f"{name}.num_batches_tracked"] = torch.tensor(1000)
        elif kind == "linear":
            state[f"{name}.bias"] = last["bias"][name].detach()
        if kind in ("conv", "linear") and name in last["piggymask"]:
            state[f"{name}.piggymask"] = last["piggymask"][name].detach()
    state["classifier.weight"] = state[f"classifiers.{len(tasks) - 1}.weight"]
    state["classifier.bias"] = state[f"classifiers.{len(tasks) - 1}.bias"]
    checkpoint = {
        "model_state_dict": state,
        "dataset_history": list(tasks),
        "dataset2num_classes": {task: n_classes for task in tasks},
        "masks": masks,
        "shared_layer_info": info,
    }
    torch.save(checkpoint, path)
    return checkpoint
