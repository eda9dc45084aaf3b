"""Sweeps through the CLI: a failing job is recorded and the sweep goes on; presets, run.log, a busy folder."""

import fcntl

import pandas as pd
from conftest import TINY_STREAM, clrun

from clrun import report
from clrun.run import LOCK

TINY = [
    *TINY_STREAM,
    "stream.n_tasks=2",
    "stream.train_per_task=32",
    "stream.test_per_task=16",
    "method.train.epochs=1",
]


def test_a_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path, capsys):
    sweep = ["-m", "method=pnn,finetune", "stream.scenario=class", *TINY]
    done = clrun(tmp_path, *sweep)
    assert done.returncode == 1  # a job failed
    runs = tmp_path / "outputs" / "runs"
    assert [p.parent.name.split("-")[0] for p in runs.glob("*/summary.parquet")] == ["finetune"]
    output = " ".join(done.stderr.split())
    assert "method pnn does not support stream.scenario=class" in output
    assert "sweep: 2 jobs: 1 finished, 0 reused, 1 failed" in output
    (status_file,) = runs.glob("sweeps/*/status.csv")
    status = pd.read_csv(status_file, keep_default_na=False)
    assert status["status"].tolist() == ["failed", "finished"]
    assert status["overrides"][0].startswith("method=pnn stream.scenario=class")
    assert status["error"][0].startswith("method pnn does not support stream.scenario=class")
    (finetune,) = runs.glob("finetune-*")
    assert status["run_dir"][1] == str(finetune)

    again = clrun(tmp_path, *sweep)  # the finished job is reused, the failing one fails again
    assert again.returncode == 1 and "sweep: 2 jobs: 0 finished, 1 reused, 1 failed" in " ".join(again.stderr.split())

    stopped = runs / "stopped-run"  # a run stopped after a task: a checkpoint, no summary
    (stopped / "checkpoints").mkdir(parents=True)
    (stopped / "checkpoints" / "last.pt").write_bytes(b"")
    report.main([str(runs)])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"unfinished (no summary.parquet; the same command resumes it): {stopped}" in shown
    assert "failed in a sweep: method=pnn stream.scenario=class" in shown and "finetune" in shown


def test_a_sweep_without_failures_exits_0_and_a_single_run_still_exits_2(tmp_path):
    assert clrun(tmp_path, "-m", "method=finetune", "seed=0,1", *TINY).returncode == 0
    single = clrun(tmp_path, "method=pnn", "stream.scenario=class", *TINY)
    assert single.returncode == 2 and single.stderr.startswith("clrun: error: method pnn does not support")


def test_a_misspelt_preset_is_an_error_listing_the_presets(tmp_path):
    done = clrun(tmp_path, "experiment=vdv_split_mnist", *TINY)
    assert done.returncode == 1 and not (tmp_path / "outputs").exists()
    assert "Could not find 'experiment/vdv_split_mnist'" in done.stderr and "vdv_split_mnist_class" in done.stderr


def test_a_refused_process_leaves_the_running_ones_folder_alone(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / LOCK).parent.mkdir(parents=True)
    (run_dir / "run.log").write_text("the first process's log\n")
    with open(run_dir / LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another process is running in the folder
        done = clrun(tmp_path, f"hydra.run.dir={run_dir}", *TINY)
    assert done.returncode == 2 and "another clrun process is running in" in done.stderr
    assert (run_dir / LOCK).exists() and not (run_dir / ".hydra").exists()  # nothing written, nothing removed
    assert (run_dir / "run.log").read_text() == "the first process's log\n"


def test_a_run_folder_that_is_a_file_or_below_one_is_one_line(tmp_path):
    (tmp_path / "afile").write_text("not a folder")
    for folder in ("afile", "afile/run"):
        done = clrun(tmp_path, f"hydra.run.dir={folder}", *TINY)
        assert (
            done.returncode == 2
            and done.stderr
            == f"clrun: error: hydra.run.dir={folder}: afile is a file, not a folder; choose another hydra.run.dir\n"
        )
