"""What a reader of an image-file dataset returns: the files of each split with their labels, the class names in
label order, and (for datasets whose tasks are fixed by their release, e.g. CORe50's sessions or CPG's six
fine-grained datasets) the tasks themselves. `clrun.data.cache` decodes the files once; `clrun.data.build` cuts
the decoded images into tasks."""

from dataclasses import dataclass
from pathlib import Path

from clrun.errors import ClrunError


@dataclass(frozen=True)
class ImageList:
    """The image files of one split: `paths[i]` has label `labels[i]` (0..K-1); `boxes[i]`, when given, is the
    region (left, top, width, height) in pixels to crop before resizing (CUB-200's bounding boxes)."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    boxes: tuple[tuple[float, float, float, float], ...] | None = None

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class PairFiles:
    """Verification pairs over image files: pair i compares `paths[a[i]]` with `paths[b[i]]`, `same[i]` whether
    they show one identity; in the order of the release's list (LFW's pairs.txt: fold by fold)."""

    paths: tuple[Path, ...]
    a: tuple[int, ...]
    b: tuple[int, ...]
    same: tuple[bool, ...]

    def __len__(self) -> int:
        return len(self.same)


@dataclass(frozen=True)
class TaskFiles:
    """A task fixed by the dataset's release: its name, the global labels it covers (its local label i is
    `classes[i]`), and which images of each split belong to it (indices into `ImageFiles.train` / `.test`;
    None: every image whose label is in `classes`). A verification task (`pairs` set) is tested on those pairs
    instead of labelled images (its `test` is then unused)."""

    name: str
    classes: tuple[int, ...]
    train: tuple[int, ...] | None = None
    test: tuple[int, ...] | None = None
    pairs: PairFiles | None = None


@dataclass(frozen=True)
class ImageFiles:
    """An image-file dataset as a reader lists it.

    `classes` names every label in order (the documented class order). `official` is the (train, test) image
    count of the official release, or None; a copy with fewer files loads with a warning that results are not
    comparable with papers. `tasks` is None when the stream's split rule cuts the classes into tasks, or the
    release's own tasks.
    """

    train: ImageList
    test: ImageList
    classes: tuple[str, ...]
    official: tuple[int, int] | None = None
    tasks: tuple[TaskFiles, ...] | None = None


def not_found(path: Path, layout: str, folder: str | Path) -> ClrunError:
    """The one-line error of a reader missing `path`: the layout it expected and what data.root must hold."""
    return ClrunError(f"{path} not found: expected {layout}; set data.root to the folder holding {folder}")


def class_folders(directory: Path, layout: str, folder: str | Path) -> list[str]:
    """The sorted class folder names in `directory` (torchvision's ImageFolder class order); `layout` and
    `folder` as for `not_found`."""
    from torchvision.datasets.folder import find_classes

    if not directory.is_dir():
        raise not_found(directory, layout, folder)
    try:
        return find_classes(directory)[0]
    except FileNotFoundError as error:
        raise ClrunError(f"{directory} holds no class folders: expected {layout}") from error
