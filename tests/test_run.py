"""End-to-end runs: result files, resume after SIGKILL, errors, sweeps, real MNIST."""

import errno
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CLRUN, SHARED_DATA, clrun, matrix, needs_shared, run, run_interrupted_then_resumed
from fixtures import write_idx, write_mnist

from clrun import report, results
from clrun.errors import ClrunError
from clrun.run import CHECKPOINT

TINY = [
    "hardware=cpu",
    "stream.train_per_task=160",
    "stream.test_per_task=80",
    "backbone.width=0.5",
    "method.train.epochs=1",
    "method.train.batch_size=32",
]


def test_tiny_run_writes_results(tmp_path):
    summary, run_dir = run(tmp_path, *TINY, "stream.n_tasks=3")
    accuracy = pd.read_parquet(run_dir / results.ACCURACY_FILE)
    assert len(accuracy) == 6  # lower triangle of 3 x 3
    assert {
        "run_id",
        "method",
        "stream",
        "backbone",
        "seed",
        "train_task",
        "eval_task",
        "accuracy",
        "n_samples",
    } <= set(accuracy.columns)
    assert (accuracy["n_samples"] == 80).all()
    assert sorted(zip(accuracy.train_task, accuracy.eval_task, strict=True)) == [
        (0, 0),
        (1, 0),
        (1, 1),
        (2, 0),
        (2, 1),
        (2, 2),
    ]
    R = results.accuracy_matrix(accuracy, 3)
    assert np.isnan(R[0, 1]) and np.isnan(R[1, 2])

    table = pd.read_parquet(run_dir / results.SUMMARY_FILE)
    assert len(table) == 1
    row = table.iloc[0]
    assert row["acc"] == pytest.approx(R[2].mean())
    assert row["bwt"] == pytest.approx(((R[2, 0] - R[0, 0]) + (R[2, 1] - R[1, 1])) / 2)
    assert np.isnan(row["fwt"])
    assert row["wall_s"] > 0 and row["params"] > 0
    # finetune stores one backbone plus three heads: a little over one backbone with one head
    assert 1.0 < row["expansion"] < 1.1

    tasks = pd.read_parquet(run_dir / results.TASKS_FILE)
    assert list(tasks["task"]) == [0, 1, 2]
    assert {"wall_s", "epochs", "images_per_s", "params"} <= set(tasks.columns)
    assert (tasks["epochs"] == 1).all() and (tasks["images_per_s"] > 0).all()
    for plot in (results.MATRIX_PLOT, results.CURVES_PLOT):
        assert (run_dir / plot).read_bytes()[:4] == b"\x89PNG"
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".") and p.name != ".hydra"]  # no temporary files
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / ".hydra" / "overrides.yaml").is_file()


def test_scratch_never_forgets_and_expands_per_task(tmp_path):
    summary, run_dir = run(tmp_path, *TINY, "method=scratch", "stream.n_tasks=3")
    R = matrix(run_dir)
    for j in range(3):
        assert (R[j:, j] == R[j, j]).all()  # bit-identical: other tasks never touch task j's model
    assert summary["bwt"] == 0.0 and summary["forgetting"] == 0.0
    assert summary["expansion"] == pytest.approx(3.0)


@pytest.mark.parametrize("method", ["finetune", "scratch", "joint"])
def test_interrupted_run_resumes_to_the_same_matrix(tmp_path, monkeypatch, method):
    overrides = [*TINY, f"method={method}", "stream.n_tasks=3", "stream.augment=true", "method.train.epochs=2"]
    if method == "joint":
        overrides.append("method.reinit=false")  # state carries over between tasks
    _, uninterrupted = run(tmp_path, *overrides, name="full")

    run_interrupted_then_resumed(tmp_path, *overrides)
    np.testing.assert_array_equal(matrix(tmp_path / "resumed"), matrix(uninterrupted))


def test_weight_sharing_summary_has_redundancy_and_width(tmp_path):
    recipe = [f"method.{phase}.{key}" for phase in ("train", "retrain") for key in ("epochs=1", "batch_size=32")]
    summary, run_dir = run(tmp_path, *TINY, "method=packnet", "stream.n_tasks=2", *recipe)
    table = pd.read_parquet(run_dir / results.SUMMARY_FILE).iloc[0]
    assert table["width_multiplier"] == 1.0
    assert table["redundancy"] == pytest.approx(0.6 * 0.6, abs=0.01)  # task 2 releases 0.6 of the 0.6 task 1 freed
    assert table["bwt"] == 0.0


def test_cpu_run_is_reproducible(tmp_path):
    _, first = run(tmp_path, *TINY, "stream.n_tasks=2", name="a")
    _, second = run(tmp_path, *TINY, "stream.n_tasks=2", name="b")
    np.testing.assert_array_equal(matrix(first), matrix(second))


def test_finished_run_is_not_retrained_and_resume_false_restarts(tmp_path):
    _, run_dir = run(tmp_path, *TINY, "stream.n_tasks=2")
    before = (run_dir / CHECKPOINT).stat().st_mtime_ns
    run(tmp_path, *TINY, "stream.n_tasks=2")
    assert (run_dir / CHECKPOINT).stat().st_mtime_ns == before
    run(tmp_path, *TINY, "stream.n_tasks=2", "resume=false")
    assert (run_dir / CHECKPOINT).stat().st_mtime_ns != before


def test_checkpoint_of_another_config_is_refused(tmp_path):
    run(tmp_path, *TINY, "stream.n_tasks=2")
    with pytest.raises(ClrunError, match="another config"):
        run(tmp_path, *TINY, "stream.n_tasks=2", "method.train.lr=0.5")


def test_sigkill_during_task_3_then_rerun_equals_uninterrupted(tmp_path):
    args = [*TINY, "stream.n_tasks=4", "stream.train_per_task=600"]
    full = clrun(tmp_path, *args, "hydra.run.dir=full")
    assert full.returncode == 0, full.stderr

    process = subprocess.Popen(
        [*CLRUN, *args, "hydra.run.dir=killed"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_for_tasks(process, tmp_path / "killed", 2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert 2 <= len(torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=True)["tasks"]) < 4
    assert not (tmp_path / "killed" / results.SUMMARY_FILE).exists()

    resumed = clrun(tmp_path, *args, "hydra.run.dir=killed")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    np.testing.assert_array_equal(matrix(tmp_path / "killed"), matrix(tmp_path / "full"))


def wait_for_tasks(process: subprocess.Popen, run_dir: Path, n_tasks: int) -> None:
    """Poll until the run has checkpointed at least `n_tasks` tasks (or has exited): a poll may come after the
    next task's checkpoint already, on a loaded machine.

    The checkpoint, not tasks.parquet: the tables are written just before it, so a
    signal sent when they appear could land before the checkpoint is saved.
    """
    checkpoint = run_dir / CHECKPOINT
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists() and len(torch.load(checkpoint, weights_only=True)["tasks"]) >= n_tasks:
            return
        time.sleep(0.02)


def test_ctrl_c_saves_finished_tasks_and_exits_cleanly(tmp_path):
    # 10 tasks of 5 epochs: the run must still be going when the test sees task 0's checkpoint, also when the
    # polling worker waits seconds for a core (at 1 epoch a quiet machine ran the 9 tasks after it in 4 s)
    args = [*TINY, "stream.n_tasks=10", "stream.train_per_task=600", "method.train.epochs=5", "hydra.run.dir=run"]
    process = subprocess.Popen([*CLRUN, *args], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_tasks(process, tmp_path / "run", 1)
    assert process.poll() is None, "the run finished before the test saw its first checkpoint"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert 1 <= len(torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["tasks"]) < 10
    assert not [p for p in (tmp_path / "run").rglob(".*") if p.name != ".hydra" and ".hydra" not in p.parts]

    resumed = clrun(tmp_path, *args)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    assert len(pd.read_parquet(tmp_path / "run" / results.ACCURACY_FILE)) == 55  # 1 + 2 + ... + 10 rows


@pytest.mark.parametrize(
    "override,message",
    [
        ("+method.foo=1", "unknown config key method.foo"),
        ("method.train.batch_size=0", "method.train.batch_size=0 is invalid"),
        ("method._target_=nope.Nope", "method._target_=nope.Nope cannot be imported"),
    ],
)
def test_invalid_run_config_is_one_line_exit_2_and_no_files(tmp_path, override, message):
    result = clrun(tmp_path, override)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clrun: error: ") and message in lines[0]
    assert not any((tmp_path / "outputs").rglob("*.*")) and not any((tmp_path / "outputs").rglob("lock"))


def test_bad_config_fails_before_any_work(tmp_path):
    result = clrun(tmp_path, "method.train.epochs=many")
    assert result.returncode != 0
    assert "method.train.epochs" in result.stderr
    assert not (tmp_path / "outputs").exists()


def test_missing_dataset_is_one_clear_line_and_no_files(tmp_path):
    result = clrun(tmp_path, "stream=split_mnist", f"data.root={tmp_path / 'nowhere'}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert str(tmp_path / "nowhere") in lines[0] and "data.download=true" in lines[0]
    assert not any((tmp_path / "outputs").rglob("*.*"))


def test_multirun_gives_one_folder_per_job(tmp_path):
    result = clrun(tmp_path, "-m", "method=finetune,scratch", "seed=0,1", *TINY, "stream.n_tasks=2")
    assert result.returncode == 0, result.stderr
    folders = sorted(p.parent.name for p in (tmp_path / "outputs" / "runs").glob("*/summary.parquet"))
    assert len(folders) == 4
    assert {name.split("-seed")[0] for name in folders} == {"finetune-synthetic-convnet", "scratch-synthetic-convnet"}


@needs_shared("MNIST", "raw")
def test_real_split_mnist_finetune_forgets_scratch_does_not(tmp_path):
    common = ["hardware=cpu", "hardware.threads=1", "stream=split_mnist", "backbone=mlp", f"data.root={SHARED_DATA}"]
    common += ["method.train.epochs=1"]
    finetune, _ = run(tmp_path, *common, "method=finetune", name="finetune")
    scratch, _ = run(tmp_path, *common, "method=scratch", name="scratch")
    assert scratch["acc"] > 0.95  # chance is 0.5
    assert scratch["bwt"] == 0.0
    assert finetune["acc"] > 0.6
    assert finetune["bwt"] < -0.02


def test_survey_metrics_count_every_mac_a_task_spends(tmp_path, capsys):
    """CE's MACs (torch.utils.flop_counter): an MLP's training step per image is 2 x in x out per layer (forward and
    weight gradient) plus in x out for the input gradient of every layer but the first; finetune trains once (CE
    1), PackNet's 30 retraining epochs after 1 training epoch make its CE 1/31."""
    mlp = [*TINY, "stream.n_tasks=3", "backbone=mlp"]  # 3x32x32 synthetic images, hidden 200, 200, heads of 2
    layers = [(3072, 200), (200, 200), (200, 2)]
    per_image = sum(2 * i * o for i, o in layers) + sum(i * o for i, o in layers[1:])
    summaries = {}
    for method in ("finetune", "packnet"):
        summaries[method], run_dir = run(tmp_path, *mlp, f"method={method}", name=method)
        tasks = pd.read_parquet(run_dir / results.TASKS_FILE)
        assert (tasks["macs_per_image"] == per_image).all()
        assert (tasks["train_macs"] == per_image * 160 * tasks["epochs"]).all()
        assert (tasks["plain_macs"] == per_image * 160).all()  # the `train` recipe's one epoch
    assert summaries["finetune"]["compute_efficiency"] == 1.0
    assert summaries["packnet"]["compute_efficiency"] == pytest.approx(1 / 31)
    for summary in summaries.values():
        R = matrix(tmp_path / summary["method"])
        assert summary["acc_all_steps"] == pytest.approx(np.nanmean(R[np.tril_indices(3)]))
        assert summary["bwt_all_steps"] == pytest.approx(
            np.mean([R[i, j] - R[j, j] for i in range(3) for j in range(i)])
        )
        assert 0.99 < summary["memory_efficiency"] < 1.0  # only the heads grow
    assert summaries["packnet"]["bwt_all_steps"] == 0.0
    report.main([str(tmp_path)])
    assert "CE" in capsys.readouterr().out


FINISHED = [*TINY, "stream.n_tasks=2", "hydra.run.dir=run"]  # the run folder `finished` holds


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A folder holding `run/`, the finished run of `clrun FINISHED` (made once; tests work on copies)."""
    folder = tmp_path_factory.mktemp("finished")
    result = clrun(folder, *FINISHED)
    assert result.returncode == 0, result.stderr
    return folder / "run"


@pytest.fixture
def finished(tmp_path, finished_run) -> Path:
    """`tmp_path` holding a copy of the finished run `clrun FINISHED` wrote there (in `run/`)."""
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_damaged_checkpoint_is_one_line_naming_it(finished, damage):
    checkpoint = finished / "run" / CHECKPOINT
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
    done = clrun(finished, *FINISHED)
    assert done.returncode == 2 and done.stderr.startswith(f"clrun: error: {checkpoint} is damaged (")
    assert "resume=false" in done.stderr and len(done.stderr.splitlines()) == 1
    if damage == "empty":  # the way out the line names (the same line for both)
        assert clrun(finished, *FINISHED, "resume=false").returncode == 0


def test_resume_removes_what_a_kill_during_a_write_left_behind(finished):
    left = [finished / "run" / CHECKPOINT.parent / ".last.pt.x1y2", finished / "run" / ".accuracy.parquet.a1b2.parquet"]
    for path in left:
        path.write_bytes(b"half a file")
    assert clrun(finished, *FINISHED).returncode == 0
    assert not any(path.exists() for path in left)


def test_resuming_on_other_data_is_refused(tmp_path):
    written = write_mnist(tmp_path / "data", 200, 100)
    args = ["hardware=cpu", "stream=split_mnist", "backbone=mlp", "stream.n_tasks=2", "method.train.epochs=1"]
    args += [f"data.root={tmp_path / 'data'}", "hydra.run.dir=run"]
    first = clrun(tmp_path, *args)
    assert first.returncode == 0, first.stderr
    images = written["train"][0].copy()
    images[:20] = 255 - images[:20]  # 20 images inverted, every size the same
    write_idx(tmp_path / "data" / "MNIST" / "raw" / "train-images-idx3-ubyte", images)
    done = clrun(tmp_path, *args)
    assert done.returncode == 2 and "was made on other data than data.root=" in " ".join(done.stderr.split())


def test_an_unreadable_checkpoint_says_so_not_damaged(tmp_path, monkeypatch):
    _, run_dir = run(tmp_path, *TINY, "stream.n_tasks=2")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(torch, "load", refuse)  # as root here, a chmod would not stop the read
    with pytest.raises(ClrunError, match=r"last.pt cannot be read \(permission denied\)"):
        run(tmp_path, *TINY, "stream.n_tasks=2")


def test_a_refused_resume_keeps_the_folders_config(finished):
    saved = (finished / "run" / ".hydra" / "config.yaml").read_text()
    assert "lr: 0.5" not in saved and (finished / "run" / ".hydra" / "overrides.yaml").exists()
    refused = clrun(finished, *FINISHED, "method.train.lr=0.5")
    assert refused.returncode == 2 and "belongs to a run with another config" in refused.stderr
    assert (finished / "run" / ".hydra" / "config.yaml").read_text() == saved


def test_a_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    save, calls = torch.save, []

    def save_until_the_disk_is_full(obj, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:  # torch's zip writer on a full disk
            raise RuntimeError(
                "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/7: "
                "file write failed"
            )
        save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_is_full)
    with pytest.raises(ClrunError, match=r"^cannot write .*last\.pt \(.*file write failed\): free space on its disk"):
        run(tmp_path, *TINY, "stream.n_tasks=3")
    run_dir = tmp_path / "run"
    assert len(torch.load(run_dir / CHECKPOINT, weights_only=True)["tasks"]) == 1  # the task before is kept
    assert not [p for p in run_dir.rglob(".*") if ".hydra" not in p.parts]  # no temporary file left


def test_an_unwritable_or_full_folder_is_one_line_and_the_file_keeps_its_content(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_text("earlier")

    def no_space(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(ClrunError, match=r"^cannot write .*table\.parquet \(\[Errno 28\] No space left on device\)"):
        results.atomic_write(target, no_space)
    assert target.read_text() == "earlier" and [p.name for p in tmp_path.iterdir()] == ["table.parquet"]
