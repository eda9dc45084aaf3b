"""Cluster launchers through the CLI: a submitit job survives SIGTERM and, preempted, is requeued and resumes; a
sweep on a running Ray cluster."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CLRUN, TINY_STREAM, clrun, matrix, run

# five small tasks: time to signal the job between them
FIVE_TASKS = [*TINY_STREAM, "method=finetune", "stream.n_tasks=5", "stream.train_per_task=64"]


def wait_for(predicate, what: str, process: subprocess.Popen, timeout: float = 120):
    """Poll `predicate` until it returns a true value (returned), failing if `process` ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        assert process.poll() is None, f"the sweep ended before {what}: {process.communicate()}"
        time.sleep(0.05)
    raise AssertionError(f"no {what} within {timeout} s")


def job_log(tmp_path: Path) -> str:
    """What the submitit_local job printed so far (stdout and stderr, requeued runs appended), whitespace-normalised."""
    return " ".join(" ".join(p.read_text() for p in tmp_path.glob("outputs/runs/.submitit/*/*_0_log.*")).split())


def job_pid(tmp_path: Path) -> int | None:
    """The pid of the process running the job: the child of submitit's local controller (the job id)."""
    ids = [int(p.name) for p in tmp_path.glob("outputs/runs/.submitit/*") if p.name.isdigit()]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) in ids:
                return int(stat.parent.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


def test_a_preempted_submitit_job_is_requeued_and_resumes(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs pip install 'clrun[slurm]'")
    sweep = subprocess.Popen(
        [*CLRUN, "-m", "hydra/launcher=submitit_local", *FIVE_TASKS],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: "task 1/5 (" in job_log(tmp_path), "task 1 done", sweep)
        pid = wait_for(lambda: job_pid(tmp_path), "the job's process", sweep)
        os.kill(pid, signal.SIGTERM)  # submitit logs it and the job goes on
        wait_for(lambda: "task 2/5 (" in job_log(tmp_path), "task 2 done", sweep)
        os.kill(pid, signal.SIGUSR2)  # submitit's preemption signal: checkpoint the submission, requeue, exit
        output, _ = sweep.communicate(timeout=120)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output
    log = job_log(tmp_path)
    assert "Bypassing signal SIGTERM" in log and "Requeued job" in log
    assert "clrun: preempted and requeued; it resumes after the last finished task" in log
    assert "resuming after task" in log  # the requeued job went on from the checkpoint, not from the start
    (run_dir,) = (p.parent for p in (tmp_path / "outputs" / "runs").glob("*/summary.parquet"))
    assert "resuming after task" in (run_dir / "run.log").read_text()
    _, straight = run(tmp_path, *FIVE_TASKS)
    np.testing.assert_array_equal(matrix(run_dir), matrix(straight))
    (status,) = (tmp_path / "outputs" / "runs").glob("sweeps/*/status.csv")
    assert pd.read_csv(status)["status"].tolist() == ["finished"]


def test_ray_cluster_runs_a_sweep_on_a_running_cluster(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_ray_launcher", reason="needs pip install 'clrun[ray]'")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    ray_bin = Path(sys.executable).parent / "ray"
    head = [str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"]
    cluster = subprocess.Popen(head, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: "block forever" in cluster.stdout.readline(), "the Ray cluster", cluster)
        tiny = [*TINY_STREAM, "stream.scenario=class", "stream.n_tasks=2", "stream.train_per_task=32"]
        on_cluster = ["hydra.launcher.ray.remote.num_gpus=0", "hydra.launcher.ray.remote.num_cpus=1"]  # address: auto
        done = clrun(tmp_path, "-m", "hydra/launcher=ray_cluster", *on_cluster, "method=pnn,finetune", *tiny)
    finally:
        cluster.terminate()  # `ray start --block` stops the cluster's processes
        cluster.wait(timeout=60)
    assert done.returncode == 1, done.stderr  # pnn does not support the class scenario: recorded, the sweep went on
    assert "sweep: 2 jobs: 1 finished, 0 reused, 1 failed" in " ".join(done.stderr.split()), done.stderr[-3000:]
    (status,) = (tmp_path / "outputs" / "runs").glob("sweeps/*/status.csv")
    table = pd.read_csv(status)
    assert table["status"].tolist() == ["failed", "finished"]
    _, straight = run(tmp_path, *tiny, "method=finetune")
    np.testing.assert_array_equal(matrix(Path(table["run_dir"][1])), matrix(straight))
