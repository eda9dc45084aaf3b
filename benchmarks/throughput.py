"""Throughput benchmark: training images/s per backbone, and clrun's data path against a DataLoader.

Everything is measured side by side in one process on the current hardware.
Prints a table and writes benchmarks/results/<host-kind>-<date>.json.

    python benchmarks/throughput.py [--quick]
"""

import argparse
import datetime
import json
import os
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from rich.console import Console
from rich.table import Table
from torchvision import transforms

from clrun.config import BackboneConfig, Device, HardwareConfig, MlpConfig, Precision
from clrun.data import iterate, prepare
from clrun.data.batches import InputView
from clrun.hardware import resolve_hardware
from clrun.models import TaskModel, build_backbone

# where the benchmarks write their JSON; CLRUN_BENCH_RESULTS elsewhere (`gpu_check.py --dry-run`: a scratch folder)
RESULTS = Path(os.environ.get("CLRUN_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR_VIEW = InputView(CIFAR_MEAN, CIFAR_STD, augment=True)  # clrun's CIFAR recipe: pad-4 crop and flip
# backbone -> (input shape, batch size)
BACKBONES = {
    "mlp": ((1, 28, 28), 128),
    "convnet": ((3, 32, 32), 128),
    "vgg16_bn": ((3, 32, 32), 32),
    "resnet18": ((3, 32, 32), 128),
    "resnet50": ((3, 224, 224), 32),
    "sphereface20": ((3, 112, 96), 32),
}


def host_kind() -> str:
    """A short name for this machine: the GPU's name, else the CPU's and its core count."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def auto_hardware():
    """The `hardware=auto` settings (the GPU path where CUDA is available, else the CPU path)."""
    return resolve_hardware(
        OmegaConf.structured(HardwareConfig(name="auto", device=Device.auto, precision=Precision.auto))
    )


def write_record(prefix: str, hw, fields: dict) -> Path:
    """Write benchmarks/results/<prefix><host>-<date>.json: the machine's description and `fields`."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{prefix}{host_kind()}-{datetime.date.today().isoformat()}.json"
    record = {
        "host": host_kind(),
        "device": str(hw.device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **fields,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    return out


def timed(step, seconds: float, hw) -> tuple[int, float]:
    """Run `step()` (returns images done) for about `seconds` after one warm-up call; return images, seconds."""
    step()
    sync = torch.cuda.synchronize if hw.device.type == "cuda" else (lambda: None)
    sync()
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        images += step()
    sync()
    return images, time.perf_counter() - start


def backbone_train_throughput(name: str, hw, seconds: float) -> dict:
    """Images/s of a full train step (forward, backward, SGD) on random data of the backbone's input shape."""
    shape, batch_size = BACKBONES[name]
    schema = MlpConfig if name == "mlp" else BackboneConfig
    cfg = OmegaConf.merge(OmegaConf.structured(schema), {"name": name})
    model = hw.prepare_model(TaskModel(build_backbone(cfg, shape)))
    model.add_head(10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = hw.to_input(torch.randn(batch_size, *shape, device=hw.device))
    y = torch.randint(0, 10, (batch_size,), device=hw.device)
    model.train()

    def step() -> int:
        with hw.autocast():
            loss = F.cross_entropy(model(x, 0), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return batch_size

    images, elapsed = timed(step, seconds, hw)
    params = sum(p.numel() for p in model.backbone.parameters())
    return {
        "backbone": name,
        "input": list(shape),
        "batch_size": batch_size,
        "params": params,
        "images_per_s": images / elapsed,
    }


class PerSampleCifar(torch.utils.data.Dataset):
    """How most continual-learning code feeds CIFAR: PIL image per sample, torchvision transforms."""

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(CIFAR_MEAN, CIFAR_STD),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def data_path_throughput(hw, n_images: int, batch_size: int, workers: int) -> dict:
    """Images/s of one augmented epoch: clrun's device-resident path vs a DataLoader with per-sample transforms."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n_images)

    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(hw.device)
    y = torch.from_numpy(labels).to(hw.device)

    def clrun_epoch() -> int:
        for xb, _ in iterate((x, y), batch_size, shuffle=True):
            hw.to_input(prepare(xb, CIFAR_VIEW, train=True))
        return n_images

    loader = torch.utils.data.DataLoader(
        PerSampleCifar(images, labels),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        pin_memory=hw.device.type == "cuda",
    )

    def loader_epoch() -> int:
        for xb, _ in loader:
            xb.to(hw.device, non_blocking=True)
        return n_images

    clrun_images, clrun_s = timed(clrun_epoch, 1.0, hw)
    loader_images, loader_s = timed(loader_epoch, 1.0, hw)
    clrun_rate, loader_rate = clrun_images / clrun_s, loader_images / loader_s
    return {
        "n_images": n_images,
        "batch_size": batch_size,
        "loader_workers": workers,
        "clrun_images_per_s": clrun_rate,
        "dataloader_images_per_s": loader_rate,
        "speedup": clrun_rate / loader_rate,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="shorter timings (a smoke run)")
    parser.add_argument("--backbones", nargs="*", default=list(BACKBONES), choices=list(BACKBONES))
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0

    hw = auto_hardware()
    console = Console()
    console.print(f"host: {host_kind()}  device: {hw.device}  autocast: {hw.autocast_dtype}  torch {torch.__version__}")

    backbones = []
    for name in args.backbones:
        backbones.append(backbone_train_throughput(name, hw, seconds))
        console.print(f"  {name}: {backbones[-1]['images_per_s']:.1f} img/s")
    table = Table(title=f"training throughput on {hw.device}")
    for column in ("backbone", "input", "batch", "params (M)", "train img/s"):
        table.add_column(column, justify="right")
    for row in backbones:
        table.add_row(
            row["backbone"],
            "x".join(map(str, row["input"])),
            str(row["batch_size"]),
            f"{row['params'] / 1e6:.2f}",
            f"{row['images_per_s']:.1f}",
        )
    console.print(table)

    workers = 2 if hw.device.type == "cuda" else 0
    data = data_path_throughput(hw, n_images=4096 if args.quick else 16384, batch_size=128, workers=workers)
    table = Table(title="augmented CIFAR-shaped epoch (crop+flip+normalise), batch 128")
    for column in ("path", "img/s"):
        table.add_column(column, justify="right")
    table.add_row("clrun device-resident", f"{data['clrun_images_per_s']:.0f}")
    table.add_row(f"DataLoader, per-sample transforms, {workers} workers", f"{data['dataloader_images_per_s']:.0f}")
    table.add_row("ratio", f"{data['speedup']:.1f}x")
    console.print(table)

    out = write_record("", hw, {"quick": args.quick, "backbones": backbones, "data_path": data})
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
