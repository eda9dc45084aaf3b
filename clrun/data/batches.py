"""The input path without a DataLoader: batches by indexing device-resident images (or chunks of host-resident
ones copied ahead of use), then crops, flips, normalisation and Cutout as tensor ops on the device."""

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import torch

from clrun.data import augment
from clrun.errors import ClrunError

CHUNK_BATCHES = 16  # batches per host-to-device copy when the images stay in host memory


@dataclass(frozen=True)
class InputView:
    """How uint8 images (N, C, H, W) become network inputs: while training (with `augment`) the random `crop`
    (`pad`: an H x W window of the image zero-padded by `padding`; `resized`: torchvision's RandomResizedCrop
    to `size` over `scale` and `ratio`; `none`), a random horizontal flip (`flip`); always a centre crop to `size`
    where the image is larger, scaling to [0, 1] and normalisation by `mean` / `std` (with `task_stats`: by the
    images' task's); then, while training, one `cutout` x `cutout` square zeroed per image (0: none). With
    `task_views`, training images take their task's view instead (`stream.task_views`: its own augmentation)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool = False
    size: tuple[int, int] | None = None  # None: the images' own size
    crop: str = "pad"
    padding: int = 4
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    cutout: int = 0
    task_stats: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] | None = None  # per task (mean, std)
    task_views: tuple["InputView", ...] | None = None  # per task, the view its training images take


def iterate(
    tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool, device: torch.device | str | None = None
) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches of aligned rows of `tensors` on `device` (None: where the tensors are), the last one partial;
    shuffled by torch's global RNG on `device`. Tensors held elsewhere (host memory, a memory map) are gathered
    in chunks of CHUNK_BATCHES batches, each copied through pinned memory while the one before is in use; the
    batches are the same as if the tensors were on `device`."""
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(f"tensors of different lengths: {[len(t) for t in tensors]}")
    device = torch.device(device) if device is not None else tensors[0].device
    if device.type == "cuda" and device.index is None:  # `cuda` names the current device; tensors say `cuda:0`
        device = torch.device("cuda", torch.cuda.current_device())
    order = torch.randperm(n, device=device) if shuffle else None
    if all(t.device == device for t in tensors):
        for start in range(0, n, batch_size):
            if order is None:
                yield tuple(t[start : start + batch_size] for t in tensors)
            else:
                index = order[start : start + batch_size]
                yield tuple(t[index] for t in tensors)
        return
    yield from _chunked(tensors, batch_size, order, device)


def _chunked(tensors, batch_size: int, order: torch.Tensor | None, device: torch.device):
    """`iterate`'s batches of tensors held off `device`: each chunk's rows gathered on the host (contiguous
    slices when not shuffled), pinned and copied without blocking, the next chunk's copy issued before this
    chunk's batches are handed out."""
    n = len(tensors[0])
    chunk = batch_size * CHUNK_BATCHES
    host_order = order.cpu() if order is not None else None
    pin = device.type == "cuda"

    def load(start: int) -> tuple[torch.Tensor, ...]:
        if host_order is None:
            rows = tuple(t[start : start + chunk] for t in tensors)
        else:
            index = host_order[start : start + chunk]
            rows = tuple(t[index.to(t.device)] for t in tensors)
        if pin:
            rows = tuple(r.pin_memory() for r in rows)
        return tuple(r.to(device, non_blocking=True) for r in rows)

    ahead = load(0)
    for start in range(0, n, chunk):
        current = ahead
        if start + chunk < n:
            ahead = load(start + chunk)
        for offset in range(0, len(current[0]), batch_size):
            yield tuple(t[offset : offset + batch_size] for t in current)


def prepare(x: torch.Tensor, view: InputView, train: bool, task: int | torch.Tensor | None = None) -> torch.Tensor:
    """Float32 network inputs from a uint8 (N, C, H, W) batch as `view` says; the random draws (crops, flips,
    Cutout; only when `train` and `view.augment`) come from torch's global RNG on the batch's device. `task`: the
    images' task (an index, or one per image), which per-task normalisation and views need."""
    if train and view.task_views is not None:
        return _by_task(x, view, task)
    augmenting = train and view.augment
    if augmenting and view.crop == "pad":
        x = augment.pad_crop(x, view.padding)
    elif augmenting and view.crop == "resized":
        size = view.size or tuple(x.shape[-2:])
        boxes = augment.resized_crop_boxes(len(x), x.shape[-2], x.shape[-1], view.scale, view.ratio, x.device)
        x = augment.resized_crop(x, boxes, size)
    if view.size is not None and tuple(x.shape[-2:]) != tuple(view.size):
        x = augment.center_crop(x, view.size)
    if augmenting and view.flip:
        x = augment.random_flip(x)
    scale, shift = _normalisation(view, task, x.device)
    x = x.to(torch.float32, copy=True)
    x = torch.addcmul(shift, x, scale, out=x)  # in place: 4x faster on a CPU than a new output, the same values
    if augmenting and view.cutout:
        x = augment.cutout(x, view.cutout)
    return x


def _by_task(x: torch.Tensor, view: InputView, task: int | torch.Tensor | None) -> torch.Tensor:
    """Training inputs of a batch, each image through its task's view (a batch of several tasks: task by task)."""
    if task is None:
        raise ClrunError(
            "stream.task_views gives tasks their own training augmentation, which needs the task of every image, "
            "and this method trains on images of several tasks together; set stream.task_views=null"
        )
    if not isinstance(task, torch.Tensor):
        return prepare(x, view.task_views[task], True, task)
    task = task.to(x.device)
    out = torch.empty((len(x), x.shape[1], *(view.size or x.shape[-2:])), device=x.device)
    for k in task.unique().tolist():
        rows = (task == k).nonzero().squeeze(1)
        out[rows] = prepare(x[rows], view.task_views[k], True, k)
    return out


def _normalisation(view: InputView, task, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (scale, shift) of the view's normalisation: per channel, or with `task_stats` per image of `task`."""
    if view.task_stats is None:
        return _affine(tuple(view.mean), tuple(view.std), device)
    if task is None:
        raise ClrunError(
            "stream.normalize=task needs the task of every image, and this method trains or embeds images of "
            "several tasks together; use stream.normalize=dataset"
        )
    scales, shifts = _task_affines(view.task_stats, device)
    if isinstance(task, torch.Tensor):
        task = task.to(device)
    return scales[task], shifts[task]


@lru_cache(maxsize=16)
def _task_affines(task_stats: tuple, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Every task's (scale, shift) stacked (tasks, C, 1, 1), made once per device (not per batch)."""
    affines = [_affine(tuple(mean), tuple(std), device) for mean, std in task_stats]
    return torch.stack([scale for scale, _ in affines]), torch.stack([shift for _, shift in affines])


@lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) mapping uint8 values to normalised ones, made once per device (no copy per batch)."""
    mean_t = torch.tensor(mean, device=device).view(-1, 1, 1)
    std_t = torch.tensor(std, device=device).view(-1, 1, 1)
    return 1 / (255 * std_t), -mean_t / std_t
