"""The decoded-image cache: an image-file dataset decoded once, resized, and stored as uint8 pixels in a
memory-mapped file, so that later runs read pixels without decoding.

A cache lives in `<cache_dir>/<name>-<key>/` (`images.npy`, `index.parquet`), the key a hash of the settings (each
file's own resize rule included) and of every file's path, size, modification time and label: a changed setting or
file gives a new folder. A build writes a temporary sibling folder and renames it, so a folder with its final name is
always complete.
"""

import hashlib
import json
import logging
import os
import re
import secrets
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

from clrun.config import ResizeRule
from clrun.data.image_files import ImageList
from clrun.errors import ClrunError

log = logging.getLogger("clrun")

FORMAT = 1  # the cache layout's version, part of the key
RESIZE_RULES = tuple(rule.value for rule in ResizeRule)  # stream.resize's choices
CHUNK = 1024  # images handed to the thread pool at a time
Rule = tuple[str, tuple[int, int]]  # a file's own (resize rule, (h, w))


@dataclass
class DecodedImages:
    """The decoded images kept (`images` uint8 (N, 3, H, W), memory-mapped), their labels, their indices in the
    `ImageList`, and the files skipped as corrupt."""

    images: torch.Tensor
    labels: torch.Tensor
    kept: torch.Tensor
    skipped: tuple[Path, ...]


def decode_images(
    files: ImageList,
    size: tuple[int, int],
    resize: str,
    cache_dir: Path | str,
    *,
    name: str,
    skip_corrupt: bool = False,
    console: Console | None = None,
    own: dict[int, Rule] | None = None,
) -> DecodedImages:
    """The images of `files` resized to `size` (H, W) by the rule `resize` (`short_side`: the short side to
    min(size), then a centre crop; `stretch`: to `size`), each first cropped to its box if given; decoded once
    and read from the cache in `cache_dir` after that. `own`: the files (by index) resized by a rule of their
    own, (resize, (h, w)) with h, w no larger than `size`: such an image is centred on zeros where the crop
    `augment.center_crop` to (h, w) takes it back. Corrupt files raise, or with `skip_corrupt` are skipped."""
    own = own or {}
    if any(rule not in RESIZE_RULES for rule, _ in [(resize, size), *own.values()]):
        raise ValueError(f"resize rules must be among {RESIZE_RULES}")
    if any(h > size[0] or w > size[1] for _, (h, w) in own.values()):
        raise ValueError(f"a file's own size must be no larger than {size}")
    folder = Path(cache_dir).expanduser() / f"{name}-{_key(files, size, resize, own)}"
    if not folder.is_dir():
        _build(files, size, resize, own, folder, name, skip_corrupt, console or Console(stderr=True))
    return _load(files, folder, skip_corrupt)


def _key(files: ImageList, size: tuple[int, int], resize: str, own: dict[int, Rule]) -> str:
    """16 hex digits of a hash of the settings and of every file's absolute path, byte size, mtime and label."""
    settings = [FORMAT, list(size), resize, files.boxes]
    if own:  # only then: the keys of caches made before files had rules of their own stay the same
        settings.append([[i, rule, list(own_size)] for i, (rule, own_size) in sorted(own.items())])
    digest = hashlib.sha256(json.dumps(settings).encode())
    for path, label in zip(files.paths, files.labels, strict=True):
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise ClrunError(
                f"{path}: listed by the dataset's index but not found; restore the file or the whole dataset"
            ) from None
        digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()[:16]


def _build(files, size, resize, own, folder: Path, name: str, skip_corrupt: bool, console: Console) -> None:
    """Decode `files` into a temporary sibling of `folder`, then rename it to `folder`."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f"{folder.name}.tmp-*"):
        if not _alive(int(stale.name.rsplit(".tmp-", 1)[1].split("-")[0])):
            shutil.rmtree(stale, ignore_errors=True)  # left by a build that was killed
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    tmp.mkdir()
    try:
        _write(files, size, resize, own, tmp, name, skip_corrupt, console)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not folder.is_dir():
            raise  # else another process built the same key first: its folder is used


def _alive(pid: int) -> bool:
    """Whether process `pid` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's
    return True


def _write(files: ImageList, size, resize, own, tmp: Path, name: str, skip_corrupt: bool, console: Console) -> None:
    """Decode every file in parallel into `tmp/images.npy` and write `tmp/index.parquet`."""
    n = len(files)
    images = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(n, 3, *size))
    shapes = np.zeros((n, 2), dtype=np.int64)
    errors = [""] * n
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(), TimeRemainingColumn())
    pool = ThreadPoolExecutor(os.cpu_count())
    try:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task(f"decoding {name}", total=n)
            for start in range(0, n, CHUNK):
                stop = min(start + CHUNK, n)
                rules = [own.get(i, (resize, size)) for i in range(start, stop)]
                futures = [pool.submit(_decode_into, images, i, files, *rule) for i, rule in enumerate(rules, start)]
                for i, future in enumerate(futures, start):
                    shapes[i], errors[i] = future.result()
                    if errors[i] and not skip_corrupt:
                        raise _corrupt(files.paths[i], errors[i])
                    progress.advance(bar)
    finally:
        pool.shutdown(cancel_futures=True)
    images.flush()
    kept = np.array([not e for e in errors], dtype=bool)
    if not kept.all():  # copy the kept images into a file of their number
        rows = np.flatnonzero(kept)
        compact = np.lib.format.open_memmap(tmp / "kept.npy", mode="w+", dtype=np.uint8, shape=(len(rows), 3, *size))
        for start in range(0, len(rows), CHUNK):
            compact[start : start + CHUNK] = images[rows[start : start + CHUNK]]
        compact.flush()
        os.replace(tmp / "kept.npy", tmp / "images.npy")
    index = {"path": [os.path.abspath(p) for p in files.paths], "label": np.asarray(files.labels, dtype=np.int64)}
    index |= {"orig_height": shapes[:, 0], "orig_width": shapes[:, 1], "kept": kept, "error": errors}
    import pandas as pd  # here, not at the top: a run of an array dataset (MNIST, CIFAR) starts without pandas

    pd.DataFrame(index).to_parquet(tmp / "index.parquet", index=False)


def _decode_into(images: np.ndarray, i: int, files: ImageList, resize: str, size) -> tuple[tuple[int, int], str]:
    """Decode file `i` resized by `resize` to `size` into `images[i]`, centred on zeros where `size` is smaller (at
    torchvision's centre-crop offsets): its original (height, width), and the decoder's message if it failed."""
    from torchvision.io import ImageReadMode, decode_image, read_file
    from torchvision.transforms.v2 import functional as F

    try:
        image = decode_image(read_file(str(files.paths[i])), mode=ImageReadMode.RGB)
    except RuntimeError as error:
        message = re.sub(r"^\w+, \S+:\d+, ", "", " ".join(str(error).split()))  # without torchvision's source line
        return (0, 0), message
    height, width = image.shape[-2:]
    if files.boxes is not None:
        left, top, box_width, box_height = (round(v) for v in files.boxes[i])
        right, bottom = left + box_width, top + box_height
        left, top = min(max(left, 0), width - 1), min(max(top, 0), height - 1)
        right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)
        image = F.crop(image, top, left, bottom - top, right - left)
    if resize == "stretch":
        image = F.resize(image, list(size), antialias=True)
    else:
        image = F.center_crop(F.resize(image, [min(size)], antialias=True), list(size))
    top, left = (round((outer - inner) / 2) for outer, inner in zip(images.shape[-2:], size, strict=True))
    images[i] = 0
    images[i, :, top : top + size[0], left : left + size[1]] = image.numpy()
    return (height, width), ""


def _corrupt(path: Path, message: str) -> ClrunError:
    return ClrunError(f"{path}: cannot be decoded ({message}); set data.skip_corrupt=true to skip such files")


def _load(files: ImageList, folder: Path, skip_corrupt: bool) -> DecodedImages:
    """The images of a complete cache folder, memory-mapped (copy on write, so torch may take them as writable)."""
    import pandas as pd

    index = pd.read_parquet(folder / "index.parquet")
    kept = index["kept"].to_numpy()
    skipped = np.flatnonzero(~kept)
    if len(skipped) and not skip_corrupt:
        raise _corrupt(files.paths[skipped[0]], index["error"].iloc[skipped[0]])
    if len(skipped):
        log.warning(
            "%d image files could not be decoded and were skipped; the first: %s", len(skipped), files.paths[skipped[0]]
        )
    return DecodedImages(
        images=torch.from_numpy(np.load(folder / "images.npy", mmap_mode="c")),
        labels=torch.from_numpy(index["label"].to_numpy()[kept]),
        kept=torch.from_numpy(np.flatnonzero(kept).astype(np.int64)),
        skipped=tuple(files.paths[i] for i in skipped),
    )


class _Rate(ProgressColumn):
    """Images decoded per second."""

    def render(self, task) -> Text:
        return Text(f"{task.speed:.0f} images/s" if task.speed else "")
