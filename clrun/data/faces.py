"""Readers of face datasets: CPG's facial-informatic tasks (class folders per task), Adience's five age and gender
folds, and LFW's verification pairs.

CPG (Hung et al. 2019, ivclab/CPG@cpg_face experiment 3) learns face verification (4630 identities, A-Softmax) ->
gender (3) -> emotion (7) -> age (8 Adience groups; five runs age0..age4, one per test fold) on 112x112
MTCNN-aligned faces. Face verification is scored on LFW's 10-fold pairs, not by class: `read_lfw_pairs` lists them.
"""

import csv
import logging
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from clrun.data.image_files import ImageFiles, ImageList, PairFiles, TaskFiles, class_folders
from clrun.errors import ClrunError

log = logging.getLogger("clrun")

CPG_FACE_TASKS = ("face_verification", "gender", "emotion", "age0")


VERIFICATION_TASK = "face_verification"  # the task CPG scores on LFW's pairs


def read_cpg_faces(
    root: str | Path,
    tasks: Sequence[str] = CPG_FACE_TASKS,
    folder: str = "face_data",
    lfw_pairs: str | None = None,
    lfw_folder: str | None = None,
) -> ImageFiles:
    """CPG's face tasks, in the order given, from `<root>/<folder>/<task>/{train,val}/<class>/<image>` (the class
    folders torchvision's ImageFolder reads, as CPG's `utils/face_dataset.py` does; `val` is the test split; CPG's
    checkout keeps them in `data/`). A task's classes are its sorted `train` class folders (ImageFolder's order),
    numbered after the previous tasks' and named `<task>/<folder name>`; its `val` folders must be among them.

    With `lfw_pairs` (a pairs.txt under `root`; CPG: `face_data/lfw_pairs.txt`) the task `face_verification` is a
    verification task: its test split is LFW's pairs (`read_lfw_pairs`) over the images in `<root>/<lfw_folder>`
    (default: `<folder>/face_verification/val`, where CPG keeps LFW)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

    base = Path(root).expanduser() / folder
    if isinstance(tasks, str) or not tasks or len(set(tasks)) != len(tasks):
        raise ClrunError(f"stream.dataset.tasks={tasks!r} must be a list of distinct task folders under {base}")
    layout = f"CPG's face layout {folder}/<task>/{{train,val}}/<class>/<image> for the tasks {list(tasks)}"
    train, test, names, task_files = ([], []), ([], []), [], []
    for task in tasks:
        train_dir, val_dir = base / task / "train", base / task / "val"
        classes = class_folders(train_dir, layout, folder)
        pairs = None
        if task == VERIFICATION_TASK and lfw_pairs is not None:
            pairs = _pair_files(read_lfw_pairs(root, lfw_folder or f"{folder}/{task}/val", lfw_pairs))
            val_dir = None  # LFW's identities are not the task's classes: no labelled test images
        unknown = [] if val_dir is None else sorted(set(class_folders(val_dir, layout, folder)) - set(classes))
        if unknown:
            raise ClrunError(
                f"{val_dir / unknown[0]}: {len(unknown)} val class folders have no train folder of that name: a "
                f"task's val classes must be among its train classes (CPG's face_verification/val is LFW, scored by "
                f"pairs: set stream.dataset.lfw_pairs to its pairs.txt, give {task} a val split of its training "
                "identities, or leave it out of stream.dataset.tasks)"
            )
        offset = len(names)
        labels = {name: offset + i for i, name in enumerate(classes)}
        listed = [
            [] if d is None else make_dataset(str(d), labels, IMG_EXTENSIONS, allow_empty=True)
            for d in (train_dir, val_dir)
        ]
        empty = sorted(set(classes) - {classes[label - offset] for _, label in listed[0]})
        if empty:
            raise ClrunError(
                f"{train_dir / empty[0]} holds no image files ({', '.join(IMG_EXTENSIONS)}): expected {layout}"
            )
        for (paths, found), split in zip((train, test), listed, strict=True):
            paths += [Path(path) for path, _ in split]
            found += [label for _, label in split]
        names += [f"{task}/{name}" for name in classes]
        task_files.append(TaskFiles(task, tuple(range(offset, len(names))), pairs=pairs))
    return ImageFiles(
        ImageList(tuple(train[0]), tuple(train[1])),
        ImageList(tuple(test[0]), tuple(test[1])),
        tuple(names),
        tasks=tuple(task_files),
    )


# ---- Adience ---------------------------------------------------------------------------------------------------

# Levi & Hassner's eight age groups, as the fold files write them, in age order (the class order)
ADIENCE_AGES = ("(0, 2)", "(4, 6)", "(8, 12)", "(15, 20)", "(25, 32)", "(38, 43)", "(48, 53)", "(60, 100)")
ADIENCE_GENDERS = ("f", "m")  # sorted; 'u' (unknown) and empty rows are skipped
ADIENCE_FOLDS = 5
_ADIENCE_COLUMNS = ("user_id", "original_image", "face_id", "age", "gender")


def read_adience_age(root: str | Path, fold: int = 0, folder: str = "adience") -> ImageFiles:
    """Adience's eight age groups (ADIENCE_AGES order): fold `fold` is the test split and the other four the
    training split (the five-fold protocol; CPG's age0..age4). Rows whose age is none of the eight groups (single
    ages, other ranges, 'None') are skipped, their count logged. Layout: see `read_adience_gender`."""
    return _read_adience(root, fold, folder, "age", ADIENCE_AGES)


def read_adience_gender(root: str | Path, fold: int = 0, folder: str = "adience") -> ImageFiles:
    """Adience's gender ('f', 'm'; 'u' and empty rows skipped, their count logged), fold `fold` the test split,
    from `<root>/<folder>/fold_<k>_data.txt` (k = 0..4, tab-separated with a header: user_id, original_image,
    face_id, age, gender, x, y, dx, dy, tilt_ang, fiducial_yaw_angle, fiducial_score) and the aligned faces
    `<root>/<folder>/aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>`.

    `official` is the (train, test) count of the rows the fold files label; a row whose image is not on disk is
    left out (the first one logged), so the builder warns about a partial copy."""
    return _read_adience(root, fold, folder, "gender", ADIENCE_GENDERS)


def _read_adience(root: str | Path, fold: int, folder: str, column: str, classes: tuple[str, ...]) -> ImageFiles:
    base = Path(root).expanduser() / folder
    if fold not in range(ADIENCE_FOLDS):
        raise ClrunError(f"stream.dataset.fold={fold}: Adience has the folds 0..{ADIENCE_FOLDS - 1}")
    layout = (
        f"expected Adience's layout {folder}/{{fold_0_data.txt..fold_4_data.txt,"
        "aligned/<user_id>/landmark_aligned_face.<face_id>.<original_image>}; "
        f"set data.root to the folder holding {folder}"
    )
    if not (base / "aligned").is_dir():
        raise ClrunError(f"{base / 'aligned'} not found: {layout}")
    splits = {False: ([], []), True: ([], [])}  # is the test fold -> (paths, labels)
    listed, missing, skipped = Counter(), [], Counter()
    for k in range(ADIENCE_FOLDS):
        paths, labels = splits[k == fold]
        for path, label in _adience_rows(base, base / f"fold_{k}_data.txt", column, classes, skipped, layout):
            listed[k == fold] += 1
            if path.is_file():
                paths.append(path)
                labels.append(label)
            else:
                missing.append(path)
    if skipped:
        shown = ", ".join(f"{value!r} x{n}" for value, n in skipped.most_common(5))
        log.info("%s: %d rows skipped, their %s is not a class (%s)", base, skipped.total(), column, shown)
    if missing:
        log.warning("%s: %d images the fold files list are missing (first: %s)", base, len(missing), missing[0])
    (train_paths, train_labels), (test_paths, test_labels) = splits[False], splits[True]
    return ImageFiles(
        ImageList(tuple(train_paths), tuple(train_labels)),
        ImageList(tuple(test_paths), tuple(test_labels)),
        classes,
        official=(listed[False], listed[True]),
    )


def _adience_rows(
    base: Path, path: Path, column: str, classes: tuple[str, ...], skipped: Counter, layout: str
) -> Iterator[tuple[Path, int]]:
    """(aligned image path, label) of each row of a fold file whose `column` is one of `classes`; the others are
    counted in `skipped` by value."""
    if not path.is_file():
        raise ClrunError(f"{path} not found: {layout}")
    with path.open(newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [name.strip() for name in next(rows, [])]
        absent = [name for name in _ADIENCE_COLUMNS if name not in header]
        if absent:
            raise ClrunError(
                f"{path}:1: the header lacks {', '.join(absent)}: expected Adience's tab-separated columns "
                "user_id, original_image, face_id, age, gender, x, y, dx, dy, tilt_ang, fiducial_yaw_angle, "
                "fiducial_score"
            )
        at = {name: header.index(name) for name in _ADIENCE_COLUMNS}
        for row in rows:
            if not any(cell.strip() for cell in row):
                continue
            if len(row) <= max(at.values()):
                raise ClrunError(
                    f"{path}:{rows.line_num}: {len(row)} tab-separated fields, the header names {len(header)}"
                )
            user, image, face, value = (
                row[at[name]].strip() for name in ("user_id", "original_image", "face_id", column)
            )
            if value not in classes:
                skipped[value or "(empty)"] += 1
                continue
            yield base / "aligned" / user / f"landmark_aligned_face.{face}.{image}", classes.index(value)


# ---- LFW pairs -------------------------------------------------------------------------------------------------


class FacePair(NamedTuple):
    """Two face images and whether they show the same person."""

    a: Path
    b: Path
    same: bool


@dataclass(frozen=True)
class LfwPairs:
    """LFW's verification pairs by fold, each fold its matched pairs then its mismatched ones, as pairs.txt lists
    them. Pairs with an image missing on disk are left out: `missing` names those images; `official` is the pair
    count pairs.txt lists (LFW: 10 folds x 600)."""

    folds: tuple[tuple[FacePair, ...], ...]
    missing: tuple[Path, ...]
    official: int

    def __len__(self) -> int:
        return sum(len(fold) for fold in self.folds)


def read_lfw_pairs(root: str | Path, folder: str = "lfw", pairs: str | None = None, ext: str = "jpg") -> LfwPairs:
    """LFW's View 2 pairs from `<root>/<folder>/pairs.txt` (or `<root>/<pairs>`): a header '<folds> <n>' (LFW:
    '10 300'), then per fold n matched lines 'name n1 n2' and n mismatched lines 'name1 n1 name2 n2'; the images
    are `<root>/<folder>/<name>/<name>_<nnnn>.<ext>` (CPG: folder=data/face_verification/val,
    pairs=face_data/lfw_pairs.txt). torchvision's LFWPairs cannot read an aligned copy: it needs its lfw-py folder
    with the original .tgz archive, checked by MD5."""
    images = Path(root).expanduser() / folder
    path = images / "pairs.txt" if pairs is None else Path(root).expanduser() / pairs
    layout = (
        f"expected LFW's layout {folder}/{{pairs.txt,<name>/<name>_<nnnn>.{ext}}}; "
        f"set data.root to the folder holding {folder}"
    )
    for needed in (path, images):
        if not needed.exists():
            raise ClrunError(f"{needed} not found: {layout}")
    lines = path.read_text(encoding="utf-8").splitlines()
    header = lines[0].split() if lines else []
    if len(header) != 2 or not all(field.isdigit() and int(field) > 0 for field in header):
        raise ClrunError(
            f"{path}:1: expected the header '<folds> <pairs per fold>' (LFW: '10 300'), found {(lines or [''])[0]!r}"
        )
    n_folds, n = (int(field) for field in header)
    body = [(number, line.split()) for number, line in enumerate(lines[1:], 2) if line.strip()]
    if len(body) != 2 * n * n_folds:
        raise ClrunError(
            f"{path}: {len(body)} pair lines, its header '{n_folds} {n}' means {2 * n * n_folds} "
            f"({n_folds} folds of {n} matched then {n} mismatched lines)"
        )
    folds, missing = [], {}
    for start in range(0, len(body), 2 * n):
        fold = []
        for index, (number, fields) in enumerate(body[start : start + 2 * n]):
            same = index < n
            numbers = fields[1:] if same else fields[1::2]
            if len(fields) != (3 if same else 4) or not all(field.isdigit() for field in numbers):
                shape = "matched pair 'name n1 n2'" if same else "mismatched pair 'name1 n1 name2 n2'"
                raise ClrunError(f"{path}:{number}: expected a {shape}, found {' '.join(fields)!r}")
            names = (fields[0], fields[0]) if same else (fields[0], fields[2])
            pair = tuple(images / name / f"{name}_{int(k):04d}.{ext}" for name, k in zip(names, numbers, strict=True))
            absent = [p for p in pair if not p.is_file()]
            missing.update(dict.fromkeys(absent))
            if not absent:
                fold.append(FacePair(*pair, same))
        folds.append(tuple(fold))
    result = LfwPairs(tuple(folds), tuple(missing), 2 * n * n_folds)
    if missing:
        log.warning(
            "%s: %d of %d pairs left out, %d images they name are missing (first: %s)",
            path,
            result.official - len(result),
            result.official,
            len(missing),
            result.missing[0],
        )
    return result


def _pair_files(pairs: LfwPairs) -> PairFiles:
    """LFW's pairs, fold after fold, as indices into the list of the distinct images they name."""
    flat = [pair for fold in pairs.folds for pair in fold]
    paths = tuple(dict.fromkeys(path for pair in flat for path in (pair.a, pair.b)))
    index = {path: i for i, path in enumerate(paths)}
    return PairFiles(
        paths,
        tuple(index[pair.a] for pair in flat),
        tuple(index[pair.b] for pair in flat),
        tuple(pair.same for pair in flat),
    )
