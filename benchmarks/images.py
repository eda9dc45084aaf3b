"""Image-file benchmark: the decoded-image cache and clrun's 224x224 augmented epoch against ImageFolder + DataLoader.

On generated JPEGs of a photograph's size (500x375, quality 90), side by side in one process:
- the cache build (decode, short side to 256, centre 256x256; every core): images/s, bytes per image on disk;
- one augmented training epoch at 224x224 (RandomResizedCrop, flip, ImageNet normalisation, batch 32): clrun's
  path (batches indexed from the memory-mapped cache, augmented as tensor ops on the device; on a GPU also with
  the cache left in host memory and streamed in chunks) against `torchvision.datasets.ImageFolder` + `DataLoader`
  (num_workers = cores, PIL transforms), both handing float batches to the device;
- on a GPU, ResNet-50's training step at batch 32 for comparison: the input path keeps it fed when it is faster.
Prints a table and writes benchmarks/results/images-<host>-<date>.json.

    python benchmarks/images.py [--quick] [--images N]
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table
from throughput import auto_hardware, backbone_train_throughput, host_kind, write_record
from torchvision import datasets, transforms

from clrun.data import iterate, prepare
from clrun.data.batches import InputView
from clrun.data.cache import decode_images
from clrun.data.image_files import ImageList

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
VIEW = InputView(IMAGENET_MEAN, IMAGENET_STD, augment=True, size=(224, 224), crop="resized", flip=True)
BATCH = 32
CLASSES = 10


def write_jpegs(root: Path, n: int) -> ImageList:
    """`n` 500x375 JPEGs in ImageFolder layout (`root/<class>/<i>.jpg`): smooth colour fields with fine noise,
    which compress and decode like photographs (pure noise would not)."""
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(n):
        label = i % CLASSES
        coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((500, 375), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-12, 13, field.shape), 0, 255).astype(np.uint8)
        path = root / f"class{label}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
        labels.append(label)
    return ImageList(tuple(paths), tuple(labels))


def timed_epochs(epoch, hw, epochs: int) -> float:
    """Images/s over `epochs` calls of `epoch()` (each returns the images it did), after one warm-up epoch."""
    epoch()
    sync = torch.cuda.synchronize if hw.device.type == "cuda" else (lambda: None)
    sync()
    start, images = time.perf_counter(), 0
    for _ in range(epochs):
        images += epoch()
    sync()
    return images / (time.perf_counter() - start)


def clrun_epoch(images: torch.Tensor, labels: torch.Tensor, hw):
    """One augmented epoch of clrun's path over `images` (on the device, or in host memory: streamed in chunks)."""

    def epoch() -> int:
        for xb, _ in iterate((images, labels), BATCH, shuffle=True, device=hw.device):
            hw.to_input(prepare(xb, VIEW, train=True))
        return len(labels)

    return epoch


def loader_epoch(root: Path, hw, workers: int):
    """One augmented epoch of ImageFolder + DataLoader with torchvision's PIL transforms."""
    recipe = transforms.Compose(
        [
            transforms.RandomResizedCrop(224),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    loader = torch.utils.data.DataLoader(
        datasets.ImageFolder(root, recipe),
        batch_size=BATCH,
        shuffle=True,
        num_workers=workers,
        pin_memory=hw.device.type == "cuda",
        persistent_workers=workers > 0,
    )

    def epoch() -> int:
        for xb, _ in loader:
            hw.to_input(xb.to(hw.device, non_blocking=True))
        return len(loader.dataset)

    return epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and epochs (a smoke run)")
    parser.add_argument("--images", type=int, default=None, help="JPEGs to generate (default 2000; quick: 300)")
    args = parser.parse_args()
    n = args.images or (300 if args.quick else 2000)
    epochs = 1 if args.quick else 2
    hw = auto_hardware()
    cores = os.cpu_count()
    console = Console()
    console.print(f"host: {host_kind()}  device: {hw.device}  cores: {cores}  torch {torch.__version__}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "jpegs"
        files = write_jpegs(root, n)
        jpeg_bytes = sum(p.stat().st_size for p in files.paths) / n

        start = time.perf_counter()
        decoded = decode_images(files, (256, 256), "short_side", Path(tmp) / "cache", name="bench", console=console)
        build_s = time.perf_counter() - start
        (folder,) = (Path(tmp) / "cache").iterdir()
        cache_bytes = sum(p.stat().st_size for p in folder.iterdir()) / n

        images, labels = decoded.images, decoded.labels
        rates = {}
        if hw.device.type == "cuda":
            rates["clrun_host_chunked"] = timed_epochs(clrun_epoch(images, labels, hw), hw, epochs)
        on_device = (images.to(hw.device), labels.to(hw.device))
        rates["clrun_on_device"] = timed_epochs(clrun_epoch(*on_device, hw), hw, epochs)
        rates["dataloader"] = timed_epochs(loader_epoch(root, hw, cores), hw, epochs)

    record = {
        "quick": args.quick,
        "images": n,
        "image_size": [375, 500],
        "jpeg_bytes_per_image": jpeg_bytes,
        "cache_build_images_per_s": n / build_s,
        "cache_bytes_per_image": cache_bytes,
        "batch_size": BATCH,
        "loader_workers": cores,
        "epoch_images_per_s": rates,
        "speedup_vs_dataloader": rates["clrun_on_device"] / rates["dataloader"],
    }
    if hw.device.type == "cuda":
        record["resnet50_train_images_per_s"] = backbone_train_throughput("resnet50", hw, 4.0)["images_per_s"]

    table = Table(title=f"{n} JPEGs of 500x375 on {hw.device}, {cores} cores")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("JPEG bytes / image", f"{jpeg_bytes / 1e3:.0f} kB")
    table.add_row("cache build (decode, resize to 256) img/s", f"{record['cache_build_images_per_s']:.0f}")
    table.add_row("cache bytes / image (256x256 uint8)", f"{cache_bytes / 1e3:.0f} kB")
    for path, rate in rates.items():
        table.add_row(f"224 augmented epoch img/s: {path}", f"{rate:.0f}")
    table.add_row("clrun / DataLoader", f"{record['speedup_vs_dataloader']:.1f}x")
    if "resnet50_train_images_per_s" in record:
        table.add_row("ResNet-50 train step img/s (batch 32)", f"{record['resnet50_train_images_per_s']:.0f}")
    console.print(table)
    console.print(f"wrote {write_record('images-', hw, record)}")


if __name__ == "__main__":
    main()
