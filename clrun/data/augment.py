"""Batch-wise augmentation of image batches (N, C, H, W) on their own device, the random draws from torch's global
RNG on that device: torchvision's RandomResizedCrop boxes and resizing, centre crop, flip, pad crop and Cutout."""

import math

import torch

ATTEMPTS = 10  # RandomResizedCrop's tries before its fallback


def resized_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(top, left, h, w) of `n` crops of a `height` x `width` image by torchvision's `RandomResizedCrop.get_params`
    rules: of ATTEMPTS boxes (area share ~ U(scale), log aspect ~ U(log ratio), sides rounded) the first that fits,
    at a uniform offset; else the centred box of the clamped aspect. All attempts are drawn at once, so the random
    stream differs from torchvision's."""
    area = height * width
    shape = (n, ATTEMPTS)
    target = area * torch.empty(shape, dtype=torch.float64, device=device).uniform_(*scale)
    aspect = torch.empty(shape, dtype=torch.float64, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    aspect = aspect.exp()
    w = (target * aspect).sqrt().round().long()
    h = (target / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)
    found = fits.any(1)
    fallback_h, fallback_w = _fallback_size(height, width, ratio)
    h = torch.where(found, h.gather(1, first).squeeze(1), fallback_h)
    w = torch.where(found, w.gather(1, first).squeeze(1), fallback_w)
    top = (torch.rand(n, dtype=torch.float64, device=device) * (height - h + 1)).long()
    left = (torch.rand(n, dtype=torch.float64, device=device) * (width - w + 1)).long()
    top = torch.where(found, top, (height - fallback_h) // 2)
    left = torch.where(found, left, (width - fallback_w) // 2)
    return top, left, h, w


def _fallback_size(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """RandomResizedCrop's fallback (h, w): the whole image, its aspect ratio clamped to `ratio`."""
    if width / height < min(ratio):
        return int(round(width / min(ratio))), width
    if width / height > max(ratio):
        return height, int(round(height * max(ratio)))
    return height, width


def resized_crop(x: torch.Tensor, boxes: tuple[torch.Tensor, ...], size: tuple[int, int]) -> torch.Tensor:
    """Each image's box (top, left, h, w) resized to `size` (bilinear, antialiased) by torchvision's `resized_crop`
    per image: its pixels exactly (random boxes almost never share a size, so there is nothing to batch)."""
    from torchvision.transforms.v2 import functional as TF

    out = x.new_empty((len(x), x.shape[1], *size))
    for i, (top, left, h, w) in enumerate(torch.stack(boxes, 1).tolist()):
        out[i] = TF.resized_crop(x[i], top, left, h, w, list(size), antialias=True)
    return out


def center_crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """torchvision's `center_crop` of every image to `size`: a view, or zero-padded where the images are smaller."""
    from torchvision.transforms.v2 import functional as TF

    return TF.center_crop(x, list(size))


def random_flip(x: torch.Tensor) -> torch.Tensor:
    """Each image mirrored horizontally with probability 1/2. On a GPU one gather of columns; on the CPU a copy
    with the chosen images flipped one by one (15x faster there than the gather, which reads an index per pixel)."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    if x.device.type == "cpu":
        out = x.clone()
        for i in flip.nonzero().flatten().tolist():
            out[i] = x[i].flip(-1)
        return out
    cols = torch.arange(x.shape[-1], device=x.device)
    cols = torch.where(flip[:, None], cols.flip(0), cols)  # (N, W)
    return x.gather(-1, cols[:, None, None, :].expand_as(x))


def pad_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Per image, an H x W window at a uniform offset of the image zero-padded by `padding` on every side."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding,) * 4)
    offsets = torch.randint(0, 2 * padding + 1, (2, n), device=x.device)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (N, W)
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]


def cutout(x: torch.Tensor, length: int) -> torch.Tensor:
    """One square hole per image of a float batch, as CPG's `Cutout` (ivclab/CPG, utils/fine_grained_dataset.py;
    DeVries & Taylor's uoguelph-mlrg/Cutout util/cutout.py with n_holes=1): centre (y, x) uniform over the image,
    rows y - length // 2 to y + length // 2 (end excluded; so 2 * (length // 2) wide) and the same columns,
    clipped at the borders; the image multiplied by the 0/1 mask (after normalisation, so the hole is 0 there)."""
    n, _, h, w = x.shape
    half = length // 2
    cy = torch.randint(0, h, (n, 1), device=x.device)
    cx = torch.randint(0, w, (n, 1), device=x.device)
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_rows = (rows >= cy - half) & (rows < cy + half)  # (N, H)
    in_cols = (cols >= cx - half) & (cols < cx + half)  # (N, W)
    keep = ~(in_rows[:, :, None] & in_cols[:, None, :])
    return x * keep[:, None].to(x.dtype)
