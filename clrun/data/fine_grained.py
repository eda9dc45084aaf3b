"""Readers of fine-grained image-file datasets: CPG's six tasks from Piggyback's prepared folders, and the official
releases of CUB-200-2011, Stanford Cars and Oxford 102 Flowers. They list files, labels and (CUB) boxes; the
decoded-image cache decodes them. Files an index lists but a copy lacks are left out: such a partial copy loads,
and the stream builder warns that it holds fewer images than the official release."""

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io

from clrun.data.image_files import ImageFiles, ImageList, TaskFiles, class_folders, not_found
from clrun.errors import ClrunError

# CPG's ImageNet -> fine-grained sequence (ivclab/CPG experiment2/CPG_imagenet.sh), in Piggyback's folder names
CPG_FINE_GRAINED = ("imagenet", "cubs_cropped", "stanford_cars_cropped", "flowers", "wikiart", "sketches")
_CPG_EVAL_FOLDER = {"imagenet": "val"}  # CPG's and Piggyback's set_dataset_paths: `val` for ImageNet, else `test`
_CPG_LAYOUT = "<dataset>/{train,test}/<class>/<image> (imagenet: val, not test)"

_CUB_LAYOUT = (
    "CUB_200_2011/{images.txt,image_class_labels.txt,train_test_split.txt,classes.txt,bounding_boxes.txt,images/}"
)
_CUB_OFFICIAL = (5994, 5794)
_CARS_LAYOUT = (
    "stanford_cars/{devkit/cars_meta.mat,devkit/cars_train_annos.mat,cars_train/,"
    "cars_test_annos_withlabels.mat,cars_test/}"
)
_CARS_OFFICIAL = (8144, 8041)
_FLOWERS_LAYOUT = "flowers-102/{jpg/image_NNNNN.jpg,imagelabels.mat,setid.mat}"
_FLOWERS_SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}  # setid.mat's key of each split
_FLOWERS_OFFICIAL = {"train": 1020, "val": 1020, "test": 6149}


def read_cpg_fine_grained(
    root: str | Path, datasets: Sequence[str] = CPG_FINE_GRAINED, folder: str = "."
) -> ImageFiles:
    """CPG's fine-grained tasks, one per dataset in `datasets`' order, from Piggyback's prepared folders
    `<root>/<folder>/<dataset>/{train,test}/<class>/<image>` (ImageNet's evaluation folder is `val`), read as CPG's
    ImageFolder reads them: a dataset's classes are its sorted class folder names (named `<dataset>/<class>`), its
    labels follow those of the datasets before it. ImageNet's `train` folder may be absent (CPG starts from
    torchvision's pretrained ResNet-50): its task then has no training images. `official` is None: Piggyback's release
    publishes no image counts to check a copy against."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    if not datasets or len(set(datasets)) != len(datasets):
        raise ClrunError(
            f"datasets={list(datasets)} must name each of CPG's dataset folders once, e.g. {CPG_FINE_GRAINED}"
        )
    base = _base(root, folder)
    train, test, classes, tasks = _Files(), _Files(), [], []
    for name in datasets:
        eval_dir = base / name / _CPG_EVAL_FOLDER.get(name, "test")
        train_dir = base / name / "train"
        holder = Path(folder) / name  # what data.root must hold
        layout = f"Piggyback's layout {_CPG_LAYOUT}, as CPG reads it"
        names = class_folders(eval_dir, layout, holder)
        if (train_dir.is_dir() or name != "imagenet") and class_folders(train_dir, layout, holder) != names:
            raise ClrunError(f"{train_dir} and {eval_dir} hold different class folders: expected the same classes")
        offset = len(classes)
        labels = {c: offset + i for i, c in enumerate(names)}
        for files, directory in ((train, train_dir), (test, eval_dir)):
            if directory.is_dir():
                for path, label in make_dataset(directory, labels, IMG_EXTENSIONS, allow_empty=True):
                    files.append(Path(path), label)
        classes.extend(f"{name}/{c}" for c in names)
        tasks.append(TaskFiles(name, tuple(range(offset, len(classes)))))  # its images: those of its labels
    return ImageFiles(train.build(), test.build(), tuple(classes), None, tuple(tasks))


def read_cub200(root: str | Path, crop: bool = False, folder: str = "CUB_200_2011") -> ImageFiles:
    """CUB-200-2011 from its release `<root>/CUB_200_2011/` (1-based image and class ids, joined by image id):
    classes in `classes.txt`'s id order, the official split of `train_test_split.txt` (5994 / 5794); `crop`: each
    image's box (x, y, width, height) in pixels from `bounding_boxes.txt`."""
    base = _base(root, folder)
    files = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt"]
    for name in [*files, *(["bounding_boxes.txt"] if crop else []), "images"]:
        if not (base / name).exists():
            raise not_found(base / name, f"CUB-200-2011's layout {_CUB_LAYOUT}", folder)
    paths = {i: base / "images" / row[0] for i, row in _read_rows(base / "images.txt", str).items()}
    names = _read_rows(base / "classes.txt", str)
    if sorted(names) != list(range(1, len(names) + 1)):
        raise ClrunError(f"{base / 'classes.txt'}: class ids must be 1..{len(names)}, each once")
    labels = _joined(base / "image_class_labels.txt", paths, int, allowed=range(1, len(names) + 1))
    is_train = _joined(base / "train_test_split.txt", paths, int, allowed=range(2))
    boxes = _joined(base / "bounding_boxes.txt", paths, float, width=4) if crop else {}
    splits = _Files(with_boxes=crop), _Files(with_boxes=crop)
    for i, path in paths.items():
        if path.is_file():
            splits[1 - is_train[i][0]].append(path, labels[i][0] - 1, boxes.get(i))
    return ImageFiles(*(s.build() for s in splits), tuple(names[k][0] for k in sorted(names)), _CUB_OFFICIAL)


def read_stanford_cars(root: str | Path, folder: str = "stanford_cars") -> ImageFiles:
    """Stanford Cars in torchvision's `StanfordCars` layout `<root>/stanford_cars/` (the devkit's .mat files): the
    official split (8144 / 8041), classes in `cars_meta.mat`'s order (an annotation's class k is label k - 1)."""
    base = _base(root, folder)
    meta = base / "devkit/cars_meta.mat"
    splits = [(base / "devkit/cars_train_annos.mat", base / "cars_train")]
    splits += [(base / "cars_test_annos_withlabels.mat", base / "cars_test")]
    for path in [meta, *(p for split in splits for p in split)]:
        if not path.exists():
            raise not_found(path, f"torchvision's StanfordCars layout {_CARS_LAYOUT}", folder)
    (class_names,) = _mat(meta, "class_names")
    classes = tuple(str(c) for c in np.atleast_1d(class_names))
    lists = []
    for annotations, images in splits:
        files = _Files()
        (records,) = _mat(annotations, "annotations")
        for record in np.atleast_1d(records):
            try:
                path, label = images / str(record["fname"]), int(record["class"]) - 1
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise ClrunError(f"{annotations}: annotations need the fields fname and class ({e})") from e
            if not 0 <= label < len(classes):
                raise ClrunError(f"{annotations}: {path.name}: class {label + 1} outside 1..{len(classes)} of {meta}")
            if path.is_file():
                files.append(path, label)
        lists.append(files.build())
    return ImageFiles(*lists, classes, _CARS_OFFICIAL)


def read_flowers102(
    root: str | Path, train_splits: Sequence[str] = ("train", "val"), folder: str = "flowers-102"
) -> ImageFiles:
    """Oxford 102 Flowers in torchvision's `Flowers102` layout `<root>/flowers-102/`: training images from the
    official `train_splits` (train and val, 1020 each), the official test split (6149), each in `setid.mat`'s
    order; labels 0..101 are `imagelabels.mat`'s 1..102, named as torchvision's Flowers102 names them."""
    from torchvision.datasets import Flowers102

    if not train_splits or not set(train_splits) <= {"train", "val"} or len(set(train_splits)) != len(train_splits):
        raise ClrunError(f"train_splits={list(train_splits)} must name train and/or val (once each), Flowers-102's")
    base = _base(root, folder)
    for name in ("imagelabels.mat", "setid.mat", "jpg"):
        if not (base / name).exists():
            raise not_found(base / name, f"torchvision's Flowers102 layout {_FLOWERS_LAYOUT}", folder)
    (labels,) = _mat(base / "imagelabels.mat", "labels")
    labels = np.atleast_1d(labels).astype(np.int64)
    n_classes = len(Flowers102.classes)
    if labels.size and (labels.min() < 1 or labels.max() > n_classes):
        raise ClrunError(f"{base / 'imagelabels.mat'}: labels outside 1..{n_classes}")
    ids = dict(zip(_FLOWERS_SPLITS, _mat(base / "setid.mat", *_FLOWERS_SPLITS.values()), strict=True))

    def split(*names: str) -> ImageList:
        files = _Files()
        for name in names:
            for image_id in np.atleast_1d(ids[name]).astype(np.int64).tolist():
                if not 1 <= image_id <= len(labels):
                    key = _FLOWERS_SPLITS[name]
                    raise ClrunError(f"{base / 'setid.mat'}: {key}: image id {image_id} outside 1..{len(labels)}")
                path = base / "jpg" / f"image_{image_id:05d}.jpg"
                if path.is_file():
                    files.append(path, int(labels[image_id - 1]) - 1)
        return files.build()

    official = (sum(_FLOWERS_OFFICIAL[s] for s in train_splits), _FLOWERS_OFFICIAL["test"])
    return ImageFiles(split(*train_splits), split("test"), tuple(Flowers102.classes), official)


class _Files:
    """The (path, label[, box]) of one split, collected into an ImageList."""

    def __init__(self, with_boxes: bool = False):
        self.paths, self.labels, self.boxes = [], [], [] if with_boxes else None

    def append(self, path: Path, label: int, box: tuple[float, ...] | None = None) -> None:
        self.paths.append(path)
        self.labels.append(label)
        if self.boxes is not None:
            self.boxes.append(box)

    def build(self) -> ImageList:
        return ImageList(tuple(self.paths), tuple(self.labels), None if self.boxes is None else tuple(self.boxes))


def _base(root: str | Path, folder: str) -> Path:
    return Path(root).expanduser() / folder


def _read_rows(path: Path, kind: type, width: int = 1, allowed: range | None = None) -> dict[int, tuple]:
    """The rows `<id> <value> ...` (`width` values) of a CUB index file by id; a malformed line, a value outside
    `allowed` or an id listed twice names the file and line."""
    rows = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            if len(fields) != width + 1:
                raise ValueError(f"{len(fields)} fields, expected {width + 1}")
            key, values = int(fields[0]), tuple(kind(v) for v in fields[1:])
            if allowed is not None and values[0] not in allowed:
                raise ValueError(f"{values[0]} outside {allowed.start}..{allowed.stop - 1}")
            if key in rows:
                raise ValueError(f"id {key} listed twice")
        except ValueError as e:
            raise ClrunError(f"{path}:{number}: malformed line {line.strip()!r} ({e})") from e
        rows[key] = values
    return rows


def _joined(path: Path, images: dict, kind: type, width: int = 1, allowed: range | None = None) -> dict[int, tuple]:
    """A CUB index file's rows, which must cover every image id of images.txt."""
    rows = _read_rows(path, kind, width, allowed)
    missing = next((i for i in images if i not in rows), None)
    if missing is not None:
        raise ClrunError(f"{path}: no line for image id {missing} of images.txt")
    return rows


def _mat(path: Path, *keys: str) -> tuple:
    """Variables of a MATLAB file, squeezed as torchvision reads them."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except Exception as e:  # a truncated or foreign file fails inside scipy in many ways
        raise ClrunError(f"{path}: not a readable .mat file ({' '.join(str(e).split())})") from e
    missing = [k for k in keys if k not in mat]
    if missing:
        raise ClrunError(f"{path}: no variable {missing[0]!r}")
    return tuple(mat[k] for k in keys)
