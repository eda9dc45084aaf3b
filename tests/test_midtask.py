"""Checkpoints inside a task (`checkpoint.every_epochs` / `every_minutes`, clrun.midtask): a run stopped in the
middle of a task resumes there, trains no finished epoch again, and ends with the uninterrupted run's matrix."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLRUN, TINY_STREAM, clrun, matrix, run

from clrun import trackers
from clrun.midtask import transplant, transplant_deferred
from clrun.run import CHECKPOINT, MIDTASK, Run

EVERY_EPOCH = [*TINY_STREAM, "backbone=mlp", "checkpoint.every_epochs=1"]
# a method's recipes at two epochs each, so that every phase has an epoch boundary inside it
CASES = {
    "finetune": ["method=finetune", "method.train.epochs=3"],  # one phase a task
    "ewc": ["method=ewc", "method.train.epochs=2"],  # a penalty built from the earlier tasks' state
    "si": ["method=si", "method.train.epochs=2"],  # path integrals summed by an after_step hook during the phase
    "er": ["method=er", "method.train.epochs=2"],  # memory sampling from the RNG
    # train, prune and retrain phases; retrain's after_epoch keeps its best state in closure variables
    "cpg": ["method=cpg", "method.train.epochs=2", "method.prune_train.epochs=2", "method.retrain.epochs=2"],
    # a gate and a module per task, LSTMs among them; stopped inside its second task (values restored in place)
    "gim": ["method=gim", "method.train.iterations=6", "method.gate_train.iterations=6", "method.gate_hidden=32"],
}
STOP_AFTER_SAVES = {"cpg": 4, "gim": 5}  # cpg: inside task 0's pruning, past its training phase; gim: in task 1


def epochs_counted(function):
    """Call `function()` and count the training epochs it ran (the run's trackers hear of each); (result, epochs).
    A KeyboardInterrupt is caught and the result is then None."""
    count = [0]
    epoch = trackers.Trackers.epoch

    def counting(self, end):
        count[0] += 1
        return epoch(self, end)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trackers.Trackers, "epoch", counting)
        try:
            return function(), count[0]
        except KeyboardInterrupt:
            return None, count[0]


def stopped_inside_task(tmp_path: Path, overrides: list[str], after_saves: int) -> int:
    """Run in tmp_path/resumed and stop it (as Ctrl-C would) right after its `after_saves`-th save inside a task;
    return the epochs it trained."""
    write = Run._write_midtask
    saves = [0]

    def write_then_stop(self, state):
        write(self, state)
        saves[0] += 1
        if saves[0] == after_saves:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "_write_midtask", write_then_stop)
        result, epochs = epochs_counted(lambda: run(tmp_path, *overrides, name="resumed"))
    assert result is None, f"the run made {saves[0]} saves inside tasks, fewer than {after_saves}"
    return epochs


@pytest.mark.parametrize("method", CASES)
def test_stopped_inside_a_task_resumes_there_to_the_uninterrupted_matrix(tmp_path, method):
    overrides = [*EVERY_EPOCH, *CASES[method]]
    (_, straight), all_epochs = epochs_counted(lambda: run(tmp_path, *overrides, name="straight"))
    after_saves = STOP_AFTER_SAVES.get(method, 2)
    before = stopped_inside_task(tmp_path, overrides, after_saves)
    assert (tmp_path / "resumed" / MIDTASK).exists()
    (_, resumed), after = epochs_counted(lambda: run(tmp_path, *overrides, name="resumed"))
    assert before + after == all_epochs  # no epoch trained twice: the task went on from where it stopped
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))
    assert not (resumed / MIDTASK).exists()  # removed once the task finished, with its phases' files
    assert not list((resumed / MIDTASK.parent).glob("task-phase-*"))


def test_a_save_of_a_task_that_then_finished_is_ignored_and_resume_false_removes_it(tmp_path):
    overrides = [*EVERY_EPOCH, *CASES["finetune"], "stream.n_tasks=2"]
    stopped_inside_task(tmp_path, overrides, after_saves=1)
    folder = tmp_path / "resumed"
    saved = torch.load(folder / MIDTASK, weights_only=True)
    assert saved["task"] == 0 and saved["running"]["loop"]["epochs_done"] == 1
    run(tmp_path, *overrides, "resume=false", name="resumed")  # starts over: the save inside task 0 is gone
    assert not (folder / MIDTASK).exists() and (folder / CHECKPOINT).exists()


def test_transplant_copies_values_into_the_live_objects():
    class Holder:
        pass

    live, saved = Holder(), Holder()
    weight = torch.nn.Parameter(torch.zeros(3))
    live.weight, live.state, live.steps, live.names = weight, {weight: torch.zeros(3)}, 1, ["a"]
    saved_weight = torch.nn.Parameter(torch.ones(3))
    saved.weight, saved.state, saved.steps, saved.names = saved_weight, {saved_weight: torch.full((3,), 2.0)}, 5, ["b"]
    memo, deferred = {}, []
    assert transplant(live, saved, memo, deferred) is live
    transplant_deferred(deferred, memo)
    assert live.weight is weight and torch.equal(weight, torch.ones(3))  # the same object, the saved values
    assert list(live.state) == [weight] and torch.equal(live.state[weight], torch.full((3,), 2.0))
    assert live.steps == 5 and live.names == ["b"]


def test_transplant_restores_equal_values_each_in_its_place():
    """Small ints (and interned strings) are shared objects: the saved 4 of one attribute must not be taken for
    the saved 4 of another (GIM's resume inside its second task failed in its LSTM on this)."""

    class Holder:
        pass

    live, saved = Holder(), Holder()
    live.layers, live.width, live.name, live.other = 3, 5, "a", "c"
    saved.layers, saved.width, saved.name, saved.other = 4, 4, "b", "b"
    transplant(live, saved, {}, [])
    assert (live.layers, live.width, live.name, live.other) == (4, 4, "b", "b")


def test_a_zero_interval_is_refused_in_one_line(tmp_path):
    result = clrun(tmp_path, *TINY_STREAM, "checkpoint.every_minutes=0")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "clrun: error: checkpoint.every_minutes=0.0 is invalid: it must be null or positive"
    )


def test_stopped_inside_the_first_task_the_cli_keeps_it_and_resumes_there(tmp_path):
    args = [*EVERY_EPOCH, "stream.n_tasks=2", "stream.train_per_task=600", "method.train.epochs=6"]
    full = clrun(tmp_path, *args, "hydra.run.dir=full")
    assert full.returncode == 0, full.stderr
    process = subprocess.Popen(
        [*CLRUN, *args, "hydra.run.dir=stopped"], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    midtask = tmp_path / "stopped" / MIDTASK
    deadline = time.monotonic() + 120
    while not midtask.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)  # as `kill` or a scheduler's time limit would
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, "the run finished before it could be stopped"
    assert not (tmp_path / "stopped" / CHECKPOINT).exists()  # stopped inside task 0: only the save inside it
    assert midtask.exists()
    assert stderr.decode().splitlines()[-1] == (
        f"clrun: interrupted; what was learned is saved in {tmp_path / 'stopped'}; run the same command again to resume"
    )
    resumed = clrun(tmp_path, *args, "hydra.run.dir=stopped")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming inside task 0" in resumed.stdout
    np.testing.assert_array_equal(matrix(tmp_path / "stopped"), matrix(tmp_path / "full"))


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None, reason="root without setpriv")
def test_an_output_folder_this_user_cannot_write_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    env = {**os.environ, "HOME": str(tmp_path), "MPLCONFIGDIR": str(tmp_path)}
    command = list(CLRUN)
    if os.geteuid() == 0:  # root writes anywhere: run as nobody, in a folder root owns
        tmp_path.chmod(0o755)
        command = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", *command]
    else:
        locked.chmod(0o555)
    result = subprocess.run([*command, *TINY_STREAM], cwd=locked, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"clrun: error: the runs folder outputs/runs/: this user cannot write in {locked}; run clrun from a folder "
        "you can write to, or set hydra.run.dir=<a writable folder>"
    )
    assert not (locked / "outputs").exists()
