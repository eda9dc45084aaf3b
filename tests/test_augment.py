import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from clrun.data import augment

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RATIO = (3 / 4, 4 / 3)


def images(n, c, h, w, device="cpu"):
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
def test_resized_crop_equals_torchvision_per_image(device, channels):
    x = images(5, channels, 37, 53, device)
    # (top, left, h, w): down-scaling, up-scaling, the output size itself (no resize), the whole image, a thin strip
    boxes = [(2, 3, 30, 41), (11, 20, 5, 7), (4, 9, 17, 23), (0, 0, 37, 53), (30, 1, 7, 50)]
    tensors = tuple(torch.tensor(column, device=device) for column in zip(*boxes, strict=True))
    for size in [(17, 23), (24, 15)]:
        out = augment.resized_crop(x, tensors, size)
        assert out.dtype == torch.uint8 and out.shape == (5, channels, *size)
        for i, (top, left, h, w) in enumerate(boxes):
            assert torch.equal(out[i], TF.resized_crop(x[i], top, left, h, w, list(size), antialias=True))


@pytest.mark.parametrize("device", DEVICES)
def test_center_crop_equals_torchvision(device):
    x = images(3, 3, 9, 10, device)
    # height/width differences even and odd (torchvision rounds the offset half to even), and larger than the image
    for size in [(4, 5), (5, 4), (7, 7), (9, 10), (12, 13), (6, 14)]:
        out = augment.center_crop(x, size)
        assert out.shape == (3, 3, *size)
        for i in range(3):
            assert torch.equal(out[i], TF.center_crop(x[i], list(size)))
    # the offsets by hand (round half to even): (9 - 4) / 2 -> 2, (10 - 5) / 2 -> 2, (9 - 7) / 2 -> 1, (10 - 7) / 2 -> 2
    assert torch.equal(augment.center_crop(x, (4, 5)), x[..., 2:6, 2:7])
    assert torch.equal(augment.center_crop(x, (7, 7)), x[..., 1:8, 2:9])
    padded = augment.center_crop(x, (12, 13))  # 1 row / column of zeros before, 2 after
    assert torch.equal(padded[..., 1:10, 1:11], x) and padded.sum(dtype=torch.int64) == x.sum(dtype=torch.int64)


def area_and_aspect_fit(h, w, height, width, scale, ratio):
    """Whether some target area share in `scale` and aspect in `ratio` round to these sides: with a = sqrt(A r),
    b = sqrt(A / r) within 0.5 of w and h, A = a b and r = a / b lie in the intervals checked."""
    h, w = h.double(), w.double()
    area_low, area_high = (w - 0.5) * (h - 0.5) / (height * width), (w + 0.5) * (h + 0.5) / (height * width)
    aspect_low, aspect_high = (w - 0.5) / (h + 0.5), (w + 0.5) / (h - 0.5)
    return (area_high >= scale[0]) & (area_low <= scale[1]) & (aspect_high >= ratio[0]) & (aspect_low <= ratio[1])


@pytest.mark.parametrize("device", DEVICES)
def test_drawn_boxes_obey_the_rules(device):
    torch.manual_seed(0)
    for height, width, scale, ratio in [(80, 120, (0.08, 1.0), RATIO), (50, 31, (0.3, 0.5), (0.5, 2.0))]:
        top, left, h, w = augment.resized_crop_boxes(4000, height, width, scale, ratio, device)
        assert all(t.dtype == torch.int64 and t.shape == (4000,) and t.device.type == device for t in (top, left, h, w))
        assert (top >= 0).all() and (left >= 0).all() and (h > 0).all() and (w > 0).all()
        assert (top + h <= height).all() and (left + w <= width).all()
        assert area_and_aspect_fit(h, w, height, width, scale, ratio).all()
    # one possible size: the offsets take every value 0..4 (uniform, bound included)
    top, left, h, w = augment.resized_crop_boxes(4000, 8, 8, (0.25, 0.25), (1, 1), device)
    assert (h == 4).all() and (w == 4).all()
    assert set(top.tolist()) == set(range(5)) and set(left.tolist()) == set(range(5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("height, width", [(64, 96), (96, 64), (50, 80), (80, 50), (50, 50), (60, 61)])
def test_fallback_boxes_equal_torchvision(device, height, width):
    """No attempt fits when the target area exceeds the image: the centred box of the clamped aspect."""
    scale = (2.0, 3.0)
    expected = RandomResizedCrop.get_params(torch.zeros(1, height, width), scale, RATIO)
    boxes = augment.resized_crop_boxes(50, height, width, scale, RATIO, device)
    for value, column in zip(expected, boxes, strict=True):
        assert (column == value).all()


def test_box_distribution_matches_torchvision():
    """Mean area share and mean log aspect of 4000 boxes each, on a non-square image (so the rejections differ
    between the sides), within 5 standard errors of the difference of two means (a 1-in-a-million miss for a
    correct implementation; uniform aspect instead of uniform log aspect shifts the log-aspect mean by ~7)."""
    n, height, width = 4000, 80, 120
    torch.manual_seed(1)
    ours = torch.stack(augment.resized_crop_boxes(n, height, width, (0.08, 1.0), RATIO), 1).double()
    image = torch.zeros(1, height, width)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, (0.08, 1.0), RATIO) for _ in range(n)]).double()
    for statistic in [lambda b: b[:, 2] * b[:, 3] / (height * width), lambda b: (b[:, 3] / b[:, 2]).log()]:
        a, b = statistic(ours), statistic(theirs)
        tolerance = 5 * math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < tolerance


@pytest.mark.parametrize("device", DEVICES)
def test_cutout_zeroes_exactly_the_clipped_square(device):
    x = torch.rand(300, 2, 10, 12, device=device) + 0.5
    for length in [6, 5]:
        torch.manual_seed(3)
        out = augment.cutout(x, length)
        torch.manual_seed(3)
        cy = torch.randint(0, 10, (300, 1), device=device).flatten().tolist()
        cx = torch.randint(0, 12, (300, 1), device=device).flatten().tolist()
        expected = x.clone()
        half = length // 2
        clipped = 0
        for i, (row, col) in enumerate(zip(cy, cx, strict=True)):
            expected[i, :, max(row - half, 0) : min(row + half, 10), max(col - half, 0) : min(col + half, 12)] = 0
            clipped += row - half < 0 or row + half > 10 or col - half < 0 or col + half > 12
        assert torch.equal(out, expected)
        assert 0 < clipped < 300


@pytest.mark.parametrize("device", DEVICES)
def test_flip_mirrors_exactly_the_chosen_samples(device):
    x = images(64, 3, 5, 7, device)
    torch.manual_seed(4)
    out = augment.random_flip(x)
    torch.manual_seed(4)
    chosen = (torch.rand(64, device=device) < 0.5).tolist()
    assert 0 < sum(chosen) < 64
    for i, flipped in enumerate(chosen):
        assert torch.equal(out[i], x[i].flip(-1) if flipped else x[i])


@pytest.mark.parametrize("device", DEVICES)
def test_pad_crop_is_a_window_of_the_padded_image(device):
    x = images(64, 3, 6, 9, device)
    torch.manual_seed(5)
    out = augment.pad_crop(x, 2)
    torch.manual_seed(5)
    rows, cols = torch.randint(0, 5, (2, 64), device=device).tolist()
    padded = TF.pad(x, [2])
    for i in range(64):
        assert torch.equal(out[i], padded[i, :, rows[i] : rows[i] + 6, cols[i] : cols[i] + 9])
    assert set(rows) == set(range(5))


def pipeline(x, seed):
    torch.manual_seed(seed)
    boxes = augment.resized_crop_boxes(len(x), x.shape[2], x.shape[3], (0.08, 1.0), RATIO, x.device)
    y = augment.random_flip(augment.resized_crop(augment.pad_crop(x, 4), boxes, (24, 24)))
    return augment.cutout(y.float(), 8)


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_runs_are_reproducible(device):
    x = images(16, 3, 32, 40, device)
    assert torch.equal(pipeline(x, 7), pipeline(x, 7))
    assert not torch.equal(pipeline(x, 7), pipeline(x, 8))
