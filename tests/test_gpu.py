"""The GPU paths (`make gpu-check`): fused optimizers, CUDA graphs, memory_fraction, bf16 autocast, channels_last,
resume of a GPU run.

Marked `gpu`: they run where CUDA is available, and on a CPU under CLRUN_GPU_DRY_RUN=1 (`make gpu-check
ARGS=--dry-run`, which CI runs), where everything but the CUDA calls runs: the same settings on the CPU device.
Elsewhere they are skipped.
"""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import compose_config, matrix, run, run_interrupted_then_resumed, step_with_the_same_gradients

from clrun.hardware import resolve_hardware
from clrun.models.backbones import build_backbone
from clrun.train import make_optimizer

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not ON_CUDA and os.environ.get("CLRUN_GPU_DRY_RUN") != "1",
        reason="needs CUDA (CLRUN_GPU_DRY_RUN=1 runs it on the CPU without the CUDA calls)",
    ),
]

# hardware=gpu's settings (bf16 autocast, channels_last, cudnn.benchmark) on this machine's device
GPU = ["hardware=gpu", f"hardware.device={DEVICE}"]
# a small conv net that learns the synthetic stream well, with test sets large enough for tolerances of a few %
CONV_RUN = [
    *GPU,
    "stream.n_tasks=3",
    "stream.train_per_task=512",
    "stream.test_per_task=256",
    "backbone=convnet",
    "method=finetune",
    "method.train.epochs=3",
    "method.train.batch_size=64",
]
BF16_TOLERANCE = 0.08  # accuracy: bf16 rounding and cuDNN's kernel choice flip a few test images between runs


def gpu_hardware(*overrides: str):
    return resolve_hardware(compose_config(*GPU, *overrides).hardware)


def test_gpu_settings_resolve_to_bf16_autocast_channels_last_and_a_learning_step():
    hw = gpu_hardware()
    assert hw.device.type == DEVICE and hw.autocast_dtype == torch.bfloat16 and hw.channels_last
    cfg = compose_config(*GPU, "backbone=convnet")
    backbone = build_backbone(cfg.backbone, (3, 32, 32))
    features = backbone(torch.zeros(1, 3, 32, 32)).shape[1]
    net = hw.prepare_model(torch.nn.Sequential(backbone, torch.nn.Linear(features, 5)))
    conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = hw.to_input(torch.randn(32, 3, 32, 32, device=hw.device))
    y = torch.randint(0, 5, (32,), device=hw.device)
    assert x.is_contiguous(memory_format=torch.channels_last)
    optimizer = make_optimizer(net.parameters(), cfg.method.train, hw)
    losses = []
    for _ in range(20):
        with hw.autocast():
            logits = net(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
        assert logits.dtype == torch.bfloat16
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]  # it learns one batch by heart in bf16


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_fused_optimizers_step_as_the_unfused_ones(name):
    hw = gpu_hardware()
    cfg = compose_config(*GPU, f"method.train.optimizer={name}", "method.train.weight_decay=1e-3").method.train
    torch.manual_seed(0)
    start = [torch.randn(64, 32, device=hw.device), torch.randn(32, device=hw.device)]
    params = [torch.nn.Parameter(t.clone()) for t in start]
    reference = [torch.nn.Parameter(t.clone()) for t in start]
    fast = make_optimizer(params, cfg, hw)
    assert fast.defaults.get("fused") == (True if ON_CUDA else None)  # fused kernels exactly on CUDA
    slow = make_optimizer(reference, cfg, replace(hw, device=torch.device("cpu")))  # the CPU's choice: unfused
    assert not slow.defaults.get("fused")
    step_with_the_same_gradients([(params, fast), (reference, slow)], steps=5)
    for got, want in zip(params, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        assert not torch.equal(got, start[0] if got.dim() == 2 else start[1])  # the optimizers moved them


def test_memory_fraction_caps_the_process_share_of_gpu_memory():
    hw = gpu_hardware("hardware.memory_fraction=0.25")  # on the CPU: accepted and without effect
    if not ON_CUDA:
        return
    try:
        total = torch.cuda.get_device_properties().total_memory
        with pytest.raises(torch.cuda.OutOfMemoryError):
            torch.empty(int(total * 0.3), dtype=torch.uint8, device=hw.device)
        ok = torch.empty(int(total * 0.1), dtype=torch.uint8, device=hw.device)
        del ok
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()


def test_cuda_graphs_run_matches_the_eager_run(tmp_path):
    """hardware.compile_mode=reduce_overhead (torch.compile with CUDA graphs; on the CPU: compiled, no graphs)
    learns what the eager run learns, within bf16 tolerance."""
    _, eager = run(tmp_path, *CONV_RUN, name="eager")
    compiled_overrides = [*CONV_RUN, "hardware.compile=true", "hardware.compile_mode=reduce_overhead"]
    hw = gpu_hardware("hardware.compile=true", "hardware.compile_mode=reduce_overhead")
    assert hw.compile_mode == "reduce-overhead"
    _, compiled = run(tmp_path, *compiled_overrides, name="graphs")
    eager_matrix, compiled_matrix = matrix(eager), matrix(compiled)
    assert np.nanmean(np.diag(compiled_matrix)) > 0.65  # it learns (chance: 0.5)
    np.testing.assert_allclose(compiled_matrix, eager_matrix, atol=BF16_TOLERANCE)


def test_resumed_gpu_run_equals_the_uninterrupted_one_within_bf16_tolerance(tmp_path):
    _, uninterrupted = run(tmp_path, *CONV_RUN, "stream.augment=true", name="full")
    resumed = run_interrupted_then_resumed(tmp_path, *CONV_RUN, "stream.augment=true", after_tasks=1)
    assert np.nanmean(np.diag(matrix(uninterrupted))) > 0.65  # it learns (chance: 0.5)
    np.testing.assert_allclose(matrix(resumed), matrix(uninterrupted), atol=BF16_TOLERANCE)


def test_tiny_stream_runs_on_the_gpu_settings(tmp_path):
    """A tiny MLP run of EWC (its Fisher pass too) end to end under the GPU settings, each task normalised by its
    own statistics (measured on the device)."""
    tiny = [*GPU, "stream.n_tasks=3", "stream.train_per_task=64", "stream.test_per_task=32", "stream.normalize=task"]
    summary, run_dir = run(tmp_path, *tiny, "backbone=mlp", "method=ewc", "method.train.epochs=1")
    assert np.isfinite(matrix(run_dir)).sum() == 6 and np.isfinite(summary["acc"])
