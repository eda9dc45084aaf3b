"""Readers of the continual-learning benchmarks kept as image files: TinyImageNet-200, MiniImageNet (its image
folder and csvs, or the pickled cache) and CORe50 at 128x128 with its official NC and NI batch filelists. The file
readers list files and labels (`ImageFiles`; the decoded-image cache decodes them); `read_mini_imagenet_pickle`
returns tensors. Files an index lists but a copy lacks are left out: such a partial copy loads, and the stream
builder warns that it holds fewer images than the official release."""

import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from clrun.data.image_files import ImageFiles, ImageList, TaskFiles, not_found
from clrun.errors import ClrunError

_IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")

_TINY_LAYOUT = "{wnids.txt,train/<wnid>/images/*.JPEG,val/images/*.JPEG,val/val_annotations.txt}"
_TINY_OFFICIAL = (100_000, 10_000)  # 500 training images per class; the validation split (50 per class) as test

_MINI_LAYOUT = "{images/*.jpg,train.csv,val.csv,test.csv} (csv header filename,label)"
_MINI_CSVS = ("train", "val", "test")  # the few-shot splits (64/16/20 classes), read in this order
_MINI_PICKLE_LAYOUT = "mini-imagenet-cache-{train,val,test}.pkl (dicts with image_data and class_dict)"
_MINI_CLASSES, _MINI_PER_CLASS = 100, 600

# CORe50's object-level filelists (batches_filelists.zip; Avalanche's `scen2dirs`): folder and training batches
_CORE50_SCENARIOS = {"nc": ("NC_inc", 9), "ni": ("NI_inc", 8)}
_CORE50_LAYOUT = (
    "{core50_128x128/s<k>/o<k>/C_<ss>_<oo>_<fff>.png,"
    "batches_filelists/<NC_inc|NI_inc>/run<r>/{train_batch_<bb>_filelist.txt,test_filelist.txt}}"
)
# the 10 categories in CORe50's order (objects 1-5 are category 0, ...); object o<5c+i> is named `<category><i>`
CORE50_CATEGORIES = (
    "plug_adapter",
    "mobile_phone",
    "scissors",
    "light_bulb",
    "can",
    "glasses",
    "ball",
    "marker",
    "cup",
    "remote_control",
)
CORE50_OBJECTS = tuple(f"{category}{i}" for category in CORE50_CATEGORIES for i in range(1, 6))


def read_tiny_imagenet(root: str | Path, folder: str = "tiny-imagenet-200") -> ImageFiles:
    """TinyImageNet-200 from the official `tiny-imagenet-200.zip` unpacked under `<root>/<folder>/`: classes in
    `wnids.txt`'s line order, named by the first name `words.txt` gives (the wnid when it is absent); training
    images `train/<wnid>/images/*.JPEG` (500 per class) sorted by file name; as test split the labelled validation
    split (50 per class) in `val/val_annotations.txt`'s order (the official test split has no labels)."""
    base = Path(root).expanduser() / folder
    layout = f"TinyImageNet's layout {folder}/{_TINY_LAYOUT}"
    wnids = [line for _, line in _lines(base / "wnids.txt", layout, folder)]
    labels = {wnid: label for label, wnid in enumerate(wnids)}
    if len(labels) != len(wnids):
        raise ClrunError(f"{base / 'wnids.txt'}: a wnid is listed twice: expected each class once")
    train_paths, train_labels = [], []
    for label, wnid in enumerate(wnids):
        images = base / "train" / wnid / "images"
        found = sorted(p for p in images.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES) if images.is_dir() else []
        train_paths += found
        train_labels += [label] * len(found)
    if not train_paths:
        raise ClrunError(f"{base / 'train'} holds no images of the classes in wnids.txt: expected {layout}")
    annotations = base / "val" / "val_annotations.txt"
    test_paths, test_labels = [], []
    for number, line in _lines(annotations, layout, folder):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in labels:
            raise ClrunError(
                f"{annotations}:{number}: expected '<file>\\t<wnid of wnids.txt>\\t<x>\\t<y>\\t<w>\\t<h>', "
                f"found {line!r}"
            )
        path = base / "val" / "images" / fields[0]
        if path.is_file():
            test_paths.append(path)
            test_labels.append(labels[fields[1]])
    return ImageFiles(
        ImageList(tuple(train_paths), tuple(train_labels)),
        ImageList(tuple(test_paths), tuple(test_labels)),
        _tiny_names(base / "words.txt", wnids),
        _TINY_OFFICIAL,
    )


def _tiny_names(words: Path, wnids: list[str]) -> tuple[str, ...]:
    """Each wnid's first name in `words.txt` (`<wnid>\\t<name>, <synonym>, ...`), or the wnid itself."""
    names = {}
    if words.is_file():
        for line in words.read_text().splitlines():
            wnid, _, gloss = line.partition("\t")
            names[wnid.strip()] = gloss.split(",")[0].strip()
    return tuple(names.get(wnid) or wnid for wnid in wnids)


def read_mini_imagenet(root: str | Path, folder: str = "miniImageNet", train_per_class: int = 500) -> ImageFiles:
    """Split MiniImageNet from the usual layout `<root>/<folder>/{images/*.jpg,train.csv,val.csv,test.csv}` (each
    csv `filename,label`, 600 images per class): all 100 classes, labelled in the order they first appear in
    train.csv, then val.csv, then test.csv (the few-shot splits' 64, 16 and 20 classes); each class's first
    `train_per_class` images in csv order train, the rest test. 500 / 100 is the count of the continual-learning
    papers (ACL, Ebrahimi et al. 2020, data/split_miniimagenet.py, cuts 500 / 100 after a seeded shuffle); the
    in-order cut of the csvs is MIR's (Aljundi et al. 2019, data.py get_miniimagenet, which keeps 480 / 120:
    `train_per_class=480` gives its split)."""
    base = Path(root).expanduser() / folder
    layout = f"MiniImageNet's layout {folder}/{_MINI_LAYOUT}"
    _check_train_per_class(train_per_class)
    if not (base / "images").is_dir():
        raise not_found(base / "images", layout, folder)
    files: dict[str, list[str]] = {}  # wnid -> its file names in csv order; insertion order is the class order
    for split in _MINI_CSVS:
        path = base / f"{split}.csv"
        rows = _lines(path, layout, folder)
        header = next(rows, (1, ""))
        if header[1].replace(" ", "") != "filename,label":
            raise ClrunError(f"{path}:{header[0]}: expected the header 'filename,label', found {header[1]!r}")
        for number, line in rows:
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != 2 or not all(fields):
                raise ClrunError(f"{path}:{number}: expected '<file name>,<wnid>', found {line!r}")
            files.setdefault(fields[1], []).append(fields[0])
    splits = ([], []), ([], [])
    for label, names in enumerate(files.values()):
        for i, name in enumerate(names):
            path = base / "images" / name
            if path.is_file():
                paths, labels = splits[i >= train_per_class]
                paths.append(path)
                labels.append(label)
    if not splits[0][0]:
        raise ClrunError(f"{base / 'images'} holds none of the images the csvs list: expected {layout}")
    train, test = (ImageList(tuple(paths), tuple(labels)) for paths, labels in splits)
    return ImageFiles(train, test, tuple(files), _mini_official(train_per_class))


def read_mini_imagenet_pickle(
    root: str | Path, train: bool, folder: str = "miniImageNet", train_per_class: int = 500
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split MiniImageNet's images uint8 (N, 3, 84, 84) and labels int64 (N,) from the pickled cache
    `<root>/<folder>/mini-imagenet-cache-{train,val,test}.pkl` (dicts of `image_data` uint8 (N, 84, 84, 3) and
    `class_dict` {wnid: image indices}): `read_mini_imagenet`'s class order and cut, each file's classes in the order
    of their first image (the csv order the cache was written in), each class's images in index order."""
    base = Path(root).expanduser() / folder
    _check_train_per_class(train_per_class)
    labels: dict[str, int] = {}
    images, targets = [], []
    for split in _MINI_CSVS:
        path = base / f"mini-imagenet-cache-{split}.pkl"
        data, class_dict = _read_mini_cache(path, folder)
        for wnid, rows in sorted(class_dict.items(), key=lambda item: min(item[1], default=len(data))):
            rows = sorted(rows)
            keep = rows[:train_per_class] if train else rows[train_per_class:]
            label = labels.setdefault(wnid, len(labels))
            images.append(data[keep])
            targets.append(np.full(len(keep), label, dtype=np.int64))
    x = torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(np.concatenate(targets))


def _read_mini_cache(path: Path, folder: str) -> tuple[np.ndarray, dict[str, list[int]]]:
    """The image array and class index lists of one pickled MiniImageNet cache file, checked."""
    if not path.is_file():
        raise not_found(path, f"MiniImageNet's pickled cache {folder}/{_MINI_PICKLE_LAYOUT}", folder)
    try:
        with path.open("rb") as f:
            cache = pickle.load(f, encoding="latin1")  # latin1: the Python 2 pickles' numpy arrays load too
    except Exception as e:  # a truncated or foreign file fails inside pickle in many ways
        raise ClrunError(f"{path}: not a readable pickle ({' '.join(str(e).split())})") from e
    cache = {_text(k): v for k, v in cache.items()} if isinstance(cache, dict) else {}
    data, class_dict = cache.get("image_data"), cache.get("class_dict")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 4 or data.shape[3] != 3:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ClrunError(f"{path}: 'image_data' must be a uint8 array (N, H, W, 3), found {found}")
    if not isinstance(class_dict, dict):
        raise ClrunError(f"{path}: 'class_dict' must map each wnid to its image indices")
    rows = {_text(k): [int(i) for i in v] for k, v in class_dict.items()}
    if any(not 0 <= i < len(data) for v in rows.values() for i in v):
        raise ClrunError(f"{path}: 'class_dict' has image indices outside 0..{len(data) - 1}")
    return data, rows


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _check_train_per_class(n: int) -> None:
    if not 0 < n < _MINI_PER_CLASS:
        raise ClrunError(f"train_per_class={n}: expected 1..{_MINI_PER_CLASS - 1} of each class's 600 images")


def _mini_official(train_per_class: int) -> tuple[int, int]:
    return _MINI_CLASSES * train_per_class, _MINI_CLASSES * (_MINI_PER_CLASS - train_per_class)


def read_core50(root: str | Path, scenario: str = "nc", run: int = 0, folder: str = "core50") -> ImageFiles:
    """CORe50 at 128x128 with its official object-level batch filelists, as the release unpacks under
    `<root>/<folder>/` (core50_128x128.zip, batches_filelists.zip; the layout Avalanche reads):
    `core50_128x128/s<k>/o<k>/*.png` and `batches_filelists/{NC_inc,NI_inc}/run<run>/` (runs 0-9 order the batches
    differently). Labels are the filelists' object ids 0..49 (objects 1-5 are category 0, ...). The tasks are the
    release's training batches: `nc`, 9 batches of new objects (10, then 8 x 5), each tested on the test images of
    its objects; `ni`, 8 batches of new sessions of all 50 objects, each tested on the whole test set (sessions 3, 7
    and 10): a domain-incremental stream. `official` is what the filelists list."""
    if scenario not in _CORE50_SCENARIOS:
        raise ClrunError(f"scenario={scenario!r}: expected one of CORe50's scenarios {', '.join(_CORE50_SCENARIOS)}")
    base = Path(root).expanduser() / folder
    layout = f"CORe50's layout {folder}/{_CORE50_LAYOUT}"
    images = base / "core50_128x128"
    if not images.is_dir():
        raise not_found(images, layout, folder)
    subfolder, n_batches = _CORE50_SCENARIOS[scenario]
    lists = base / "batches_filelists" / subfolder / f"run{run}"
    n_objects = len(CORE50_OBJECTS)
    train_paths, train_labels, tasks, listed = [], [], [], 0
    for batch in range(n_batches):
        entries = _core50_filelist(lists / f"train_batch_{batch:02d}_filelist.txt", layout, folder)
        listed += len(entries)
        start = len(train_paths)
        for path, label in entries:
            if (images / path).is_file():
                train_paths.append(images / path)
                train_labels.append(label)
        classes = range(n_objects) if scenario == "ni" else sorted({label for _, label in entries})
        tasks.append(TaskFiles(f"batch{batch:02d}", tuple(classes), tuple(range(start, len(train_paths)))))
    if not train_paths:
        raise ClrunError(f"{images} holds none of the images the filelists in {lists} list: expected {layout}")
    entries = _core50_filelist(lists / "test_filelist.txt", layout, folder)
    test = [(images / path, label) for path, label in entries if (images / path).is_file()]
    return ImageFiles(
        ImageList(tuple(train_paths), tuple(train_labels)),
        ImageList(tuple(p for p, _ in test), tuple(label for _, label in test)),
        CORE50_OBJECTS,
        (listed, len(entries)),
        tuple(tasks),
    )


def _core50_filelist(path: Path, layout: str, folder: str) -> list[tuple[str, int]]:
    """The (image path under core50_128x128, object id) lines `s11/o1/C_11_01_000.png 0` of a CORe50 filelist."""
    entries = []
    for number, line in _lines(path, layout, folder):
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) >= len(CORE50_OBJECTS):
            raise ClrunError(
                f"{path}:{number}: expected '<s<k>/o<k>/<image>.png> <object id 0..{len(CORE50_OBJECTS) - 1}>', "
                f"found {line!r}"
            )
        entries.append((fields[0], int(fields[1])))
    return entries


def _lines(path: Path, layout: str, folder: str) -> Iterator[tuple[int, str]]:
    """The non-blank lines of an index file, stripped, with their 1-based line numbers."""
    if not path.is_file():
        raise not_found(path, layout, folder)
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # utf-8-sig: a leading BOM is dropped
    return ((number, line.strip()) for number, line in enumerate(lines, 1) if line.strip())
