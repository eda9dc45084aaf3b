"""The device-resident input path: batches by indexing, augmentation and normalisation as tensor ops."""

from collections.abc import Iterator
from functools import lru_cache

import torch

PAD = 4  # zero padding of the random crop


def iterate(tensors: tuple[torch.Tensor, ...], batch_size: int, shuffle: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    """Batches of aligned rows of `tensors`, the last one partial; shuffled by torch's global RNG when `shuffle`."""
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(f"tensors of different lengths: {[len(t) for t in tensors]}")
    order = torch.randperm(n, device=tensors[0].device) if shuffle else None
    for start in range(0, n, batch_size):
        if order is None:
            yield tuple(t[start : start + batch_size] for t in tensors)
        else:
            index = order[start : start + batch_size]
            yield tuple(t[index] for t in tensors)


def prepare(x: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], augment: bool) -> torch.Tensor:
    """Float32 inputs from a uint8 (N, C, H, W) batch: optionally a random crop (zero padding 4) and a random
    horizontal flip per sample, drawn from torch's global RNG on the batch's device; then scaled to [0, 1] and
    normalised per channel."""
    if augment:
        x = _crop_and_flip(x)
    scale, shift = _affine(tuple(mean), tuple(std), x.device)
    return torch.addcmul(shift, x.float(), scale)


@lru_cache(maxsize=16)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) mapping uint8 values to normalised ones, made once per device (no copy per batch)."""
    mean_t = torch.tensor(mean, device=device).view(-1, 1, 1)
    std_t = torch.tensor(std, device=device).view(-1, 1, 1)
    return 1 / (255 * std_t), -mean_t / std_t


def _crop_and_flip(x: torch.Tensor) -> torch.Tensor:
    """Per sample: an H x W window at a random offset of the zero-padded image, mirrored with probability 1/2."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (PAD, PAD, PAD, PAD))
    offsets = torch.randint(0, 2 * PAD + 1, (2, n), device=x.device)
    flip = torch.rand(n, device=x.device) < 0.5
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]
