"""Datasets: readers of the official on-disk formats of MNIST, Fashion-MNIST, CIFAR-10 and CIFAR-100 (no MD5
checks), and of a user's own dataset through a reader `_target_`.

Every reader checks what it reads and raises a one-line `ClrunError` naming the
file and the problem. A missing file is fetched with torchvision's downloader when
`download` is set. Copies with fewer samples than the official files load with a
warning: results on them are not comparable with papers.
"""

import gzip
import hashlib
import inspect
import logging
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from clrun.config import import_target
from clrun.data.image_files import ImageFiles
from clrun.errors import ClrunError

log = logging.getLogger("clrun")

_IMAGES_MAGIC = 0x0803  # idx: unsigned bytes, 3 dimensions
_LABELS_MAGIC = 0x0801  # idx: unsigned bytes, 1 dimension
_OFFICIAL_SIZE = {
    "MNIST": (60000, 10000),
    "Fashion-MNIST": (60000, 10000),
    "CIFAR-10": (50000, 10000),
    "CIFAR-100": (50000, 10000),
}
# MD5 of the official files (torchvision's for the .gz; MNIST's uncompressed ones computed from the official .gz),
# checked when a file holds the official number of images: a copy altered or damaged in place is warned of
_OFFICIAL_MD5 = {
    "MNIST": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "Fashion-MNIST": {  # the uncompressed files' MD5s are not published
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
_DOWNLOADER = {"MNIST": "MNIST", "Fashion-MNIST": "FashionMNIST", "CIFAR-10": "CIFAR10", "CIFAR-100": "CIFAR100"}


def read_mnist(root: str | Path, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images uint8 (N, 1, 28, 28) and labels int64 (N,) from `<root>/MNIST/raw/` (idx files, gzipped or not)."""
    return _read_idx_dataset(root, "MNIST", "MNIST", train, download)


def read_fashion_mnist(root: str | Path, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images uint8 (N, 1, 28, 28) and labels int64 (N,) from `<root>/FashionMNIST/raw/` (MNIST's
    file names and idx format, gzipped or not; torchvision's layout)."""
    return _read_idx_dataset(root, "FashionMNIST", "Fashion-MNIST", train, download)


def _read_idx_dataset(root: str | Path, folder: str, dataset: str, train: bool, download: bool):
    """Images and labels of an MNIST-format dataset under `<root>/<folder>/raw/`."""
    root = Path(root).expanduser()
    prefix = "train" if train else "t10k"
    stems = [root / folder / "raw" / f"{prefix}-{kind}-ubyte" for kind in ("images-idx3", "labels-idx1")]
    _ensure([f"{s}[.gz]" for s in stems if _idx_file(s) is None], dataset, root, download)
    images_path, labels_path = (_idx_file(s) for s in stems)
    images = _read_idx(images_path, _IMAGES_MAGIC)
    labels = _read_idx(labels_path, _LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise ClrunError(f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, expected 28x28")
    _check_labels(labels_path, labels, len(images), 10)
    _warn_if_partial(images_path, dataset, train, len(images))
    if len(images) == _OFFICIAL_SIZE[dataset][0 if train else 1]:
        for path in (images_path, labels_path):
            _warn_if_altered(path, _OFFICIAL_MD5[dataset].get(path.name))
    return torch.from_numpy(images.reshape(-1, 1, 28, 28).copy()), torch.from_numpy(labels.astype(np.int64))


def _warn_if_altered(path: Path, official: str | None) -> None:
    """Warn when a file of the official size does not have the official file's MD5 (None: not known)."""
    if official is not None and (found := hashlib.md5(path.read_bytes()).hexdigest()) != official:
        log.warning(
            "%s: MD5 %s, not the official file's %s: the file was altered or damaged, results are not comparable "
            "with papers",
            path,
            found,
            official,
        )


def read_cifar10(root: str | Path, train: bool, download: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-10 images uint8 (N, 3, 32, 32) and labels int64 (N,) from `<root>/cifar-10-batches-py/`."""
    root = Path(root).expanduser()
    folder = root / "cifar-10-batches-py"
    paths = [folder / f"data_batch_{i}" for i in range(1, 6)] if train else [folder / "test_batch"]
    _ensure([p for p in paths if not p.is_file()], "CIFAR-10", root, download)
    batches = [_read_batch(p, {b"labels": 10}) for p in paths]
    images, labels = (torch.cat(parts) for parts in zip(*batches, strict=True))
    _warn_if_partial(folder if train else paths[0], "CIFAR-10", train, len(images))
    return images, labels


def read_cifar100(
    root: str | Path, train: bool, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CIFAR-100 images uint8 (N, 3, 32, 32), fine and coarse labels int64 (N,) from `<root>/cifar-100-python/`."""
    root = Path(root).expanduser()
    path = root / "cifar-100-python" / ("train" if train else "test")
    _ensure([path] if not path.is_file() else [], "CIFAR-100", root, download)
    images, fine, coarse = _read_batch(path, {b"fine_labels": 100, b"coarse_labels": 20})
    _warn_if_partial(path, "CIFAR-100", train, len(images))
    return images, fine, coarse


def read_cifar100_names(root: str | Path, download: bool = False) -> tuple[list[str], list[str]]:
    """CIFAR-100's 100 fine and 20 coarse class names, in label order, from `<root>/cifar-100-python/meta`."""
    root = Path(root).expanduser()
    path = root / "cifar-100-python" / "meta"
    _ensure([path] if not path.is_file() else [], "CIFAR-100", root, download)
    meta = _load_pickle(path)
    names = []
    for key, count in ((b"fine_label_names", 100), (b"coarse_label_names", 20)):
        values = meta.get(key) if isinstance(meta, dict) else None
        if not isinstance(values, list) or len(values) != count:
            raise ClrunError(f"{path}: {key.decode()} must be a list of {count} names")
        names.append([v.decode() if isinstance(v, bytes) else str(v) for v in values])
    return names[0], names[1]


def _ensure(missing: list, dataset: str, root: Path, download: bool) -> None:
    """Fetch a dataset with torchvision when files are `missing` and `download` is set; else raise for the first."""
    if not missing:
        return
    if not download:
        raise ClrunError(
            f"{dataset} file not found: {missing[0]}; put the official files there, "
            "or set data.root=... to the folder that holds them, or set data.download=true"
        )
    import torchvision.datasets  # here: torchvision imports its models and operators, which a run needs not

    try:
        getattr(torchvision.datasets, _DOWNLOADER[dataset])(str(root), download=True)
    except Exception as e:  # network, disk or checksum problems all end the run the same way
        raise ClrunError(f"could not download {dataset} into {root}: {_one_line(e)}") from e


def _idx_file(stem: Path) -> Path | None:
    """The idx file at `stem`, uncompressed or `.gz`, if either exists."""
    return next((p for p in (stem, stem.with_name(stem.name + ".gz")) if p.is_file()), None)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of an idx file, checking its magic number and its size against its header."""
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ClrunError(f"{path}: cannot read ({_one_line(e)})") from e
    ndim = magic & 0xFF
    found = int.from_bytes(data[:4], "big")
    if found != magic or len(data) < 4 + 4 * ndim:
        raise ClrunError(f"{path}: bad idx magic number {found:#010x}, expected {magic:#010x}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", ndim, 4))
    payload = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if payload.size != np.prod(dims):
        shape = "x".join(map(str, dims))
        raise ClrunError(f"{path}: truncated or corrupt: header says {shape} bytes, the file holds {payload.size}")
    return payload.reshape(dims)


def _load_pickle(path: Path) -> object:
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="bytes")
    except Exception as e:  # a truncated or foreign file can fail inside pickle in many ways
        raise ClrunError(f"{path}: not a readable CIFAR pickle ({_one_line(e)})") from e


def _read_batch(path: Path, label_keys: dict[bytes, int]) -> tuple[torch.Tensor, ...]:
    """Images uint8 (N, 3, 32, 32) and one int64 label tensor per key (with its class count) of a CIFAR pickle."""
    batch = _load_pickle(path)
    data = batch.get(b"data") if isinstance(batch, dict) else None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ClrunError(f"{path}: 'data' must be an N x 3072 uint8 array, found {found}")
    labels = []
    for key, n_classes in label_keys.items():
        values = np.asarray(batch.get(key, []), dtype=np.int64)
        _check_labels(path, values, len(data), n_classes, key.decode())
        labels.append(torch.from_numpy(values))
    return (torch.from_numpy(data.reshape(-1, 3, 32, 32)), *labels)


def _check_labels(path: Path, labels: np.ndarray, n: int, n_classes: int, key: str = "labels") -> None:
    if labels.shape != (n,):
        raise ClrunError(f"{path}: {labels.size} {key} for {n} images")
    if n and (labels.min() < 0 or labels.max() >= n_classes):
        raise ClrunError(f"{path}: {key} outside 0..{n_classes - 1} (found {labels.min()}..{labels.max()})")


def _warn_if_partial(path: Path, dataset: str, train: bool, n: int) -> None:
    warn_if_partial(f"{path}", _OFFICIAL_SIZE[dataset][0 if train else 1], n, "training" if train else "test")


def warn_if_partial(where: str, official: int | None, found: int, split: str) -> None:
    """Warn (through the `clrun` logger) when a copy of a dataset holds fewer `split` images than the official."""
    if official is not None and found < official:
        log.warning(
            "%s: %d of the official %d %s images: a partial copy, results are not comparable with papers",
            where,
            found,
            official,
            split,
        )


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ---- the datasets a stream can name ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """A built-in dataset: its reader (root, train, download) -> (images, labels, ...), class count and the
    per-channel mean and std of its official training set."""

    read: Callable[..., tuple[torch.Tensor, ...]]
    n_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


DATASETS = {
    "mnist": Dataset(read_mnist, 10, (0.1307,), (0.3081,)),
    "fashion_mnist": Dataset(read_fashion_mnist, 10, (0.2860,), (0.3530,)),
    "cifar10": Dataset(read_cifar10, 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Dataset(read_cifar100, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
SYNTHETIC = "synthetic"  # procedurally generated images (clrun.data.synthetic); needs no files
READER_KEY = "stream.dataset._target_"


def is_reader(dataset) -> bool:
    """Whether `stream.dataset` is a reader of the user's own (a node with `_target_`) rather than a name."""
    return isinstance(dataset, DictConfig) and "_target_" in dataset


def check_dataset(stream) -> None:
    """One-line errors, before any work, for a `stream.dataset` that is neither a built-in dataset's name nor an
    importable reader `_target_`."""
    dataset = stream.dataset
    if is_reader(dataset):
        import_target(dataset._target_, READER_KEY)
        return
    names = [SYNTHETIC, *DATASETS]
    if isinstance(dataset, DictConfig) or str(dataset) not in names:
        shown = OmegaConf.to_container(dataset) if isinstance(dataset, DictConfig) else dataset
        raise ClrunError(
            f"stream.dataset={shown} is not a dataset: name a built-in one ({', '.join(names)}) "
            "or a reader of your own as stream.dataset._target_=<module.function> (see README, Adding a dataset)"
        )


def _reader_keys(dataset: DictConfig) -> dict:
    return {k: v for k, v in OmegaConf.to_container(dataset, resolve=True).items() if k != "_target_"}


def read_image_files(dataset: DictConfig, root: str) -> ImageFiles | None:
    """The files a reader of an image-file dataset lists, called `_target_(root=root, **its other keys)` (clrun's
    own, e.g. `clrun.data.cl_benchmarks.read_tiny_imagenet`, or a user's); None when the `_target_` reads tensors
    instead (it takes a `train` argument: `read_custom`). Partial copies are warned about by the caller."""
    target = dataset._target_
    read = import_target(target, READER_KEY)
    if "train" in inspect.signature(read).parameters:
        return None
    try:
        found = read(root=root, **_reader_keys(dataset))
    except ClrunError:
        raise
    except Exception as error:  # the reader's own code: report whatever it raised, in one line
        raise ClrunError(f"{READER_KEY}={target} failed: {type(error).__name__}: {_one_line(error)}") from error
    if not isinstance(found, ImageFiles):
        wrong = type(found).__name__
        raise ClrunError(f"{READER_KEY}={target} must return clrun.data.image_files.ImageFiles, not {wrong}")
    if not len(found.train) and not len(found.test):
        raise ClrunError(f"{READER_KEY}={target} listed no image files under {root}")
    return found


def read_custom(dataset: DictConfig, root: str, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The images uint8 (N, C, H, W) and labels int64 (N,) a user's reader returns for a split: it is called
    `_target_(root=root, train=train, **its other keys)` (`root`: data.root) and returns (images (N, C, H, W) or
    (N, H, W) uint8, integer labels (N,))."""
    target = dataset._target_
    read = import_target(target, READER_KEY)
    try:
        found = read(root=root, train=train, **_reader_keys(dataset))
    except Exception as error:  # the user's code: report whatever it raised, in one line
        raise ClrunError(f"{READER_KEY}={target} failed: {type(error).__name__}: {_one_line(error)}") from error
    where = f"{READER_KEY}={target} (train={train})"
    if not (isinstance(found, (tuple, list)) and len(found) == 2):
        raise ClrunError(f"{where} must return (images, labels), not {type(found).__name__}")
    images, labels = (torch.as_tensor(np.asarray(v)) if not isinstance(v, torch.Tensor) else v for v in found)
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dtype != torch.uint8 or images.dim() != 4:
        found = f"{images.dtype} {tuple(images.shape)}"
        raise ClrunError(f"{where}: images must be uint8 (N, C, H, W) or (N, H, W), not {found}")
    if labels.dim() != 1 or len(labels) != len(images) or labels.is_floating_point() or labels.min() < 0:
        raise ClrunError(f"{where}: labels must be {len(images)} non-negative integers, one per image")
    return images.contiguous(), labels.long()
