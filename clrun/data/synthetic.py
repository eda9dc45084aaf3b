"""Procedurally generated image classes: a fast, learnable but not trivial stand-in for CIFAR.

Each class has a fixed recipe (a function of its id only): a shape family, a hue, a
texture frequency and strength, a stripe angle and a typical size. Samples draw
position, scale, rotation, colour, contrast, background, clutter and noise around
that recipe, so that class statistics overlap and every class shares the same
background and clutter features.
"""

import math

import torch

FAMILIES = ("disc", "square", "triangle", "cross", "ring", "stripes", "checker", "blob")
SIZE = 32
_EDGE = 10.0  # sharpness of the soft shape edges, per unit of shape-local distance


def make_synthetic(
    n_classes: int, train_per_class: int, test_per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images uint8 (N, 3, 32, 32) and labels int64 of `n_classes` classes, train then test, deterministic per seed."""
    g = torch.Generator().manual_seed(seed)
    per_class = train_per_class + test_per_class
    images = torch.cat([_draw_class(c, per_class, g) for c in range(n_classes)])
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    is_train = (torch.arange(len(labels)) % per_class) < train_per_class
    return images[is_train], labels[is_train], images[~is_train], labels[~is_train]


def _recipe(c: int) -> dict:
    """The fixed generative parameters of class `c`."""
    r = torch.Generator().manual_seed(7919 * (c + 1))
    u = torch.rand(4, generator=r).tolist()
    return {
        "family": FAMILIES[c % len(FAMILIES)],
        "hue": (c * 0.381966) % 1.0,  # golden-angle spacing: neighbouring class ids get distant hues
        "freq": 2.0 + 6.0 * u[0],  # texture frequency, in cycles per shape size
        "texture": 0.15 + 0.35 * u[1],  # texture strength
        "angle": math.pi * u[2],  # stripe orientation
        "scale": 0.45 + 0.2 * u[3],  # typical shape radius, in half-image units
    }


def _draw_class(c: int, n: int, g: torch.Generator) -> torch.Tensor:
    """`n` uint8 images of class `c`."""
    rec = _recipe(c)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(n, *shape, generator=g)

    axis = torch.linspace(-1 + 1 / SIZE, 1 - 1 / SIZE, SIZE)
    y, x = torch.meshgrid(axis, axis, indexing="ij")  # (H, W), in [-1, 1]

    # background: a random muted colour, a linear gradient and clutter discs and squares
    slope = (rand(2) - 0.5) * 0.4
    gradient = slope[:, 0, None, None] * x + slope[:, 1, None, None] * y
    image = (0.25 + 0.5 * rand(3, 1, 1)) * (0.7 + 0.3 * rand(1, 1, 1)) + gradient[:, None]
    for _ in range(3):
        centre = (rand(2) - 0.5) * 2.0
        radius = 0.1 + 0.2 * rand(1)
        du = (x - centre[:, 0, None, None]) / radius[:, :, None]
        dv = (y - centre[:, 1, None, None]) / radius[:, :, None]
        square = rand(1)[:, :, None] < 0.5
        dist = torch.where(square, torch.maximum(du.abs(), dv.abs()), torch.sqrt(du**2 + dv**2))
        _paint(image, _soft(dist), rand(3, 1, 1), 0.8)

    # the class's shape in local coordinates (u, v): centred, scaled, rotated
    centre = (rand(2) - 0.5) * 0.8
    scale = rec["scale"] * (0.7 + 0.6 * rand(1))[:, :, None]
    if rec["family"] == "stripes":
        theta = rec["angle"] + 0.35 * torch.randn(n, generator=g)
    else:
        theta = 2 * math.pi * rand()
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    dx, dy = x - centre[:, 0, None, None], y - centre[:, 1, None, None]
    u, v = (cos * dx + sin * dy) / scale, (cos * dy - sin * dx) / scale
    mask = _shape(rec["family"], u, v, rand(1)[:, :, None])

    # fill: class hue with overlapping spread, texture grating of class frequency
    hue = rec["hue"] + 0.12 * torch.randn(n, generator=g)
    fill = _hsv_to_rgb(hue, 0.35 + 0.6 * rand(), 0.45 + 0.55 * rand())
    phase = 2 * math.pi * rand()[:, None, None]
    freq = rec["freq"] * (0.8 + 0.4 * rand())[:, None, None]
    grating = torch.sin(math.pi * freq * (u + v) / math.sqrt(2) + phase)
    _paint(image, mask * (0.45 + 0.55 * rand(1, 1)), fill * (1 + rec["texture"] * grating[:, None]))

    image += 0.07 * torch.randn(n, 1, SIZE, SIZE, generator=g)  # luminance noise
    return image.clamp_(0, 1).mul_(255).round_().to(torch.uint8)


def _shape(family: str, u: torch.Tensor, v: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """Soft mask (N, H, W) in [0, 1] of a shape family at local coordinates; `jitter` in [0, 1) varies it per sample."""
    r = torch.sqrt(u**2 + v**2)
    box = torch.maximum(u.abs(), v.abs())
    if family == "disc":
        return _soft(r)
    if family == "square":
        return _soft(box / 0.85)
    if family == "triangle":
        return _soft(torch.maximum(-v, (math.sqrt(3) * u.abs() + v) / 2) / 0.5)
    if family == "cross":
        arm = 0.25 + 0.15 * jitter
        return _soft(torch.minimum(torch.maximum(u.abs() / arm, v.abs()), torch.maximum(v.abs() / arm, u.abs())))
    if family == "ring":
        return _soft((r - 0.75).abs() / (0.2 + 0.1 * jitter))
    if family == "stripes":
        return _soft(box) * torch.sigmoid(_EDGE * torch.sin(2.5 * math.pi * u))
    if family == "checker":
        return _soft(box / 0.9) * torch.sigmoid(_EDGE * torch.sin(2 * math.pi * u) * torch.sin(2 * math.pi * v))
    lobes = torch.sin(3 * torch.atan2(v, u) + 2 * math.pi * jitter)  # blob
    return _soft(r / (0.85 + 0.25 * lobes))


def _soft(dist: torch.Tensor) -> torch.Tensor:
    """Anti-aliased inside-mask of a distance that is below 1 inside the shape."""
    return torch.sigmoid(_EDGE * (1 - dist))


def _paint(image: torch.Tensor, mask: torch.Tensor, colour: torch.Tensor, alpha: float = 1.0) -> None:
    """Blend `colour` (N, 3, 1 or H, 1 or W) over `image` in place where `mask` (N, H, W) is on, `alpha` opaque."""
    image.lerp_(colour.expand_as(image), alpha * mask[:, None])


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(N, 3, 1, 1) RGB colours of (N,) hue (wrapping at 1), saturation and value."""
    k = (torch.tensor([5.0, 3.0, 1.0]) + 6 * (h % 1.0)[:, None]) % 6
    rgb = v[:, None] - v[:, None] * s[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))
    return rgb[:, :, None, None]


# CPG's face tasks and their class counts (experiment3: face_verification has 4630 identities; a few here)
FACE_TASKS = {"face_verification": 6, "gender": 3, "emotion": 7, **{f"age{k}": 8 for k in range(5)}}


def write_face_folders(
    root,
    tasks: dict[str, int] | None = None,
    train_per_class: int = 4,
    val_per_class: int = 2,
    pairs_per_fold: int = 2,
    folds: int = 10,
    folder: str = "face_data",
    seed: int = 0,
) -> None:
    """Synthetic stand-ins for CPG's face data in its layout (`clrun.data.faces.read_cpg_faces`), for smoke runs and
    tests: `<root>/<folder>/<task>/{train,val}/<class>/<n>.png` for each task of `tasks` (name -> classes; default
    `FACE_TASKS`), each class drawn from its own `make_synthetic` recipe. `face_verification/val` is an LFW copy
    instead: identities `id<k>` with `<name>/<name>_<nnnn>.jpg` images of the training identities' recipes, and
    `<folder>/lfw_pairs.txt` lists `folds` folds of `pairs_per_fold` matched then as many mismatched pairs."""
    from pathlib import Path

    from PIL import Image

    base = Path(root).expanduser() / folder
    tasks = FACE_TASKS if tasks is None else tasks
    offset = 0
    for task, n_classes in tasks.items():
        verification = task == "face_verification"
        lfw = 2 * pairs_per_fold * folds if verification else val_per_class  # LFW images per identity, at most
        x_train, y_train, x_val, y_val = make_synthetic(n_classes + offset, train_per_class, lfw, seed)
        for split, x, y in (("train", x_train, y_train), ("val", x_val, y_val)):
            for c in range(n_classes):
                images = x[y == offset + c]
                for i, image in enumerate(images):
                    if split == "val" and verification:
                        path = base / task / split / f"id{c}" / f"id{c}_{i + 1:04d}.jpg"
                    else:
                        path = base / task / split / f"c{c}" / f"{i}.png"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
        if verification:
            lines = [f"{folds}\t{pairs_per_fold}"]
            for fold in range(folds):
                for p in range(pairs_per_fold):
                    k, first = (fold + p) % n_classes, 2 * (fold * pairs_per_fold + p) % lfw + 1
                    lines.append(f"id{k}\t{first}\t{first + 1}")
                for p in range(pairs_per_fold):
                    k, other = (fold + p) % n_classes, (fold + p + 1) % n_classes
                    lines.append(f"id{k}\t{p + 1}\tid{other}\t{fold + 1}")
            (base / "lfw_pairs.txt").write_text("\n".join(lines) + "\n")
        offset += n_classes
