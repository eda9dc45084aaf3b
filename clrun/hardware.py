"""Where and how a run computes: device, autocast precision, memory format."""

import contextlib
import os
from dataclasses import dataclass

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode

from clrun.errors import ClrunError
from clrun.models.backbones import BACKBONE_TYPES


@dataclass(frozen=True)
class Hardware:
    """The resolved hardware settings a method trains and evaluates with."""

    device: torch.device
    autocast_dtype: torch.dtype | None  # None: plain fp32
    channels_last: bool
    compile_mode: str | None = None  # torch.compile mode for backbones; None: eager

    def autocast(self):
        """Autocast context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        """Lay out a float image batch for this hardware."""
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """Move a model to the device in the chosen memory format."""
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def compile(self, module: torch.nn.Module) -> None:
        """Compile in place, with `compile_mode`, every backbone inside `module` not compiled yet (no-op when eager).

        Methods whose networks are not backbones (e.g. functional weights, hypernetworks) stay eager."""
        if self.compile_mode is None:
            return
        for sub in module.modules():
            if isinstance(sub, BACKBONE_TYPES) and sub._compiled_call_impl is None:
                sub.compile(mode=self.compile_mode, dynamic=False)


def default_threads() -> int:
    """The CPU threads a run may use when `hardware.threads` is null: OMP_NUM_THREADS when set, else SLURM's CPUs
    per task, else the cores of the process's CPU affinity (not every core of the machine, which torch would take).
    In a job of the `parallel` launcher, at most its share: those cores // n_jobs, at least 1 (joblib passes a
    parent's OMP_NUM_THREADS on to every worker unchanged, which would oversubscribe)."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    cores = int(slurm) if slurm.isdigit() and int(slurm) > 0 else len(os.sched_getaffinity(0))
    omp = os.environ.get("OMP_NUM_THREADS", "")
    threads = int(omp) if omp.isdigit() and int(omp) > 0 else cores
    jobs = _parallel_jobs(cores)
    return threads if jobs == 1 else min(threads, max(1, cores // jobs))


def _parallel_jobs(cores: int) -> int:
    """The jobs the `parallel` (joblib) launcher runs at once when this process is one of them, else 1."""
    if not HydraConfig.initialized():
        return 1
    launcher = HydraConfig.get().launcher
    if not str(launcher.get("_target_", "")).endswith("JoblibLauncher") or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 1
    n_jobs = launcher.get("n_jobs") or 1
    return n_jobs if n_jobs > 0 else max(1, cores + 1 + n_jobs)  # joblib's -1: every core, -2: all but one, ...


def resolve_hardware(cfg) -> Hardware:
    """Turn a `hardware` config (auto, cpu, gpu) into concrete settings."""
    device_name = cfg.device.value
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name == "cuda" and not torch.cuda.is_available():
        raise ClrunError("hardware.device=cuda but no CUDA device is visible; use hardware=cpu or hardware=auto")
    device = torch.device(device_name)
    on_cuda = device.type == "cuda"

    precision = cfg.precision.value
    if precision == "auto":  # bf16 where the GPU has it natively (Ampere and later), else fp32
        precision = "bf16" if on_cuda and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    channels_last = on_cuda if cfg.channels_last is None else cfg.channels_last
    if on_cuda:
        torch.backends.cudnn.benchmark = True if cfg.cudnn_benchmark is None else cfg.cudnn_benchmark
    torch.set_num_threads(cfg.threads or default_threads())
    if cfg.memory_fraction is not None and on_cuda:  # several jobs of a multirun sharing one GPU
        torch.cuda.set_per_process_memory_fraction(cfg.memory_fraction)  # the current device ("cuda" has no index)
    compile_mode = cfg.compile_mode.value if cfg.compile else None
    return Hardware(device, autocast_dtype, channels_last, compile_mode)
