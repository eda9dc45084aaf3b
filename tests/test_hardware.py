"""The optimised paths (channels_last, torch.compile, bf16 autocast) against plain fp32, and parallel multiruns."""

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_method, compose_config, matrix, run, task_inputs

from clrun.config import check_config
from clrun.errors import ClrunError
from clrun.hardware import default_threads, resolve_hardware

SMALL = [
    "method.train.epochs=1",
    "stream.n_tasks=1",
    "stream.train_per_task=96",
    "stream.test_per_task=64",
    "backbone.width=0.5",
]
OPTIMISED = ["hardware.channels_last=true", "hardware.compile=true"]


def learned(*overrides: str):
    """PackNet (train, prune, retrain) on task 0 of the synthetic stream: the method and its test logits (one
    retraining epoch: each phase compiles once, then repeats what it compiled)."""
    method, stream, _ = build_method(
        None, "method=packnet", "hardware=cpu", *SMALL, "method.retrain.epochs=1", *overrides
    )
    method.learn(stream.tasks[0])
    with torch.inference_mode():
        return method, method.predict(task_inputs(stream, 0), 0)


def test_compiled_channels_last_path_matches_plain_fp32_on_cpu():
    _, logits = learned()
    method, fast_logits = learned(*OPTIMISED)
    assert method.net.backbone._compiled_call_impl is not None  # the masked backbone really trained compiled
    torch.testing.assert_close(fast_logits, logits, rtol=1e-3, atol=1e-3)
    assert not torch.equal(fast_logits, logits)  # a different kernel path, not the same computation


def test_bf16_autocast_stays_close_to_fp32():
    method, stream, _ = build_method(None, "hardware=cpu", *SMALL)
    method.learn(stream.tasks[0])
    x = task_inputs(stream, 0)
    with torch.inference_mode():
        fp32 = method.predict(x, 0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = method.predict(x, 0).float()
    assert not torch.equal(bf16, fp32)  # autocast really ran in bf16
    assert (bf16 - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_memory_fraction_out_of_range_fails_in_one_line():
    with pytest.raises(ClrunError, match=r"hardware.memory_fraction.*\(0, 1\]"):
        check_config(compose_config("hardware.memory_fraction=1.5"))


TINY = ["hardware=cpu", "hardware.threads=1", "stream.n_tasks=2", "stream.train_per_task=96", "stream.test_per_task=48"]


def test_parallel_launcher_runs_the_jobs_of_a_multirun_as_one_at_a_time(tmp_path):
    command = [sys.executable, "-c", "from clrun.cli import main; main()", "-m", "seed=0,1", *TINY]
    command += ["hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    parallel = {p.parent.name: matrix(p.parent) for p in (tmp_path / "outputs" / "runs").glob("*/summary.parquet")}
    assert len(parallel) == 2
    for seed in (0, 1):
        _, run_dir = run(tmp_path, *TINY, f"seed={seed}", name=f"seed{seed}")
        folder = next(name for name in parallel if f"-seed{seed}-" in name)
        np.testing.assert_array_equal(parallel[folder], matrix(run_dir))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_parallel_jobs_default_to_their_share_of_the_cores(tmp_path):
    # two cores, and an OMP_NUM_THREADS=2 that joblib passes on unchanged to both workers of n_jobs=2
    two_cores = ",".join(map(str, sorted(os.sched_getaffinity(0))[:2]))
    env = {k: v for k, v in os.environ.items() if k != "SLURM_CPUS_PER_TASK"} | {"OMP_NUM_THREADS": "2"}
    command = ["taskset", "-c", two_cores, sys.executable, "-c", "from clrun.cli import main; main()", "-m", "seed=0,1"]
    overrides = [*TINY, "hardware.threads=null", "hydra/launcher=parallel", "hydra.launcher.n_jobs=2"]
    result = subprocess.run(command + overrides, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    summaries = {p.parent.name: pd.read_parquet(p) for p in (tmp_path / "outputs" / "runs").glob("*/summary.parquet")}
    threads = {int(row["seed"].iloc[0]): int(row["threads"].iloc[0]) for row in summaries.values()}
    assert threads == {0: 1, 1: 1}  # 2 cores // 2 jobs each


def test_null_threads_take_the_process_share_not_every_core(monkeypatch):
    before = torch.get_num_threads()
    for variable in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})  # e.g. `taskset -c 0,3,5`
    assert default_threads() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert default_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the parallel launcher's share of each worker
    assert default_threads() == 1
    try:
        resolve_hardware(compose_config("hardware=cpu", "hardware.threads=null").hardware)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
