"""clrun-import-cpg: a checkpoint written in ivclab/CPG's format becomes a finished clrun CPG run whose every task
predicts exactly as CPG's own inference computes it from the checkpoint's tensors."""

import io
import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import build_method, matrix, one_line_error, run
from fixtures import CPG_VGG16, cpg_vgg_layers, write_cifar100, write_cpg_checkpoint
from rich.console import Console

from clrun import results
from clrun.import_cpg import import_checkpoint

TASKS = ["aquatic_mammals", "fish", "flowers"]  # CPG's first three CIFAR-100 tasks
MULTIPLIERS = [1.0, 1.5, 1.5]  # the second task grew the network (CPG's 1.5x)
BASE = 0.25  # channels: a quarter of CPG's, to keep the test quick
PRESET = "experiment=table1_cpg"
OVERRIDES = ["stream.n_tasks=3", f"backbone.width={BASE}", "hardware=cpu", "hardware.threads=1"]
IMPORT = [sys.executable, "-c", "from clrun.import_cpg import main; main()"]  # the `clrun-import-cpg` command


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar100(root, n_train=500, n_test=500)  # 25 training and 25 test images per task
    return root


def checkpoint_file(tmp_path, **changes) -> tuple:
    path = tmp_path / "checkpoint-100.pth.tar"
    return path, write_cpg_checkpoint(path, TASKS, MULTIPLIERS, base=BASE, **changes)


def reference_logits(checkpoint: dict, task: int, x: torch.Tensor) -> torch.Tensor:
    """Task `task`'s logits as CPG's inference computes them: the network at the task's width, the widest
    weights and masks sliced to it, weights of later tasks and free ones zeroed (`apply_mask`), the rest times
    binarize(piggymask, 5e-3) from the second task on; the task's batch norm, biases and head."""
    state, masks = checkpoint["model_state_dict"], checkpoint["masks"]
    info = checkpoint["shared_layer_info"][TASKS[task]]
    shapes = {name: shape for name, _, shape in cpg_vgg_layers(BASE * info["network_width_multiplier"])}

    def weight(name: str) -> torch.Tensor:
        block = tuple(slice(0, n) for n in shapes[name])
        owner = masks[f"module.{name}"][block]
        w = state[f"{name}.weight"][block] * ((owner > 0) & (owner <= task + 1))
        return w * (info["piggymask"][name] > 5e-3) if task > 0 else w

    def batch_norm(x: torch.Tensor, name: str) -> torch.Tensor:
        stats = [info[f"bn_layer_{field}"][name] for field in ("running_mean", "running_var", "weight", "bias")]
        return F.batch_norm(x, *stats, training=False, eps=1e-5)

    with torch.no_grad():
        i = 0
        for v in CPG_VGG16:
            if v == "M":
                x, i = F.max_pool2d(x, 2), i + 1
            else:
                x, i = F.relu(batch_norm(F.conv2d(x, weight(f"features.{i}"), padding=1), f"features.{i + 1}")), i + 3
        x = x.flatten(1)
        for name in (f"features.{i + 1}", f"features.{i + 3}"):
            x = F.relu(F.linear(x, weight(name), info["bias"][name]))
        return F.linear(x, state[f"classifiers.{task}.weight"], state[f"classifiers.{task}.bias"])


def test_imported_run_predicts_as_cpg_and_reports_the_final_row(tmp_path, cifar):
    path, checkpoint = checkpoint_file(tmp_path)
    overrides = [f"data.root={cifar}", *OVERRIDES]
    output = io.StringIO()
    summary, run_dir = import_checkpoint(path, overrides, tmp_path / "run", Console(file=output, width=200))

    method, stream, _ = build_method(None, PRESET, *overrides)
    method.load_state_dict(torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["method"])
    accuracies = []
    for task in stream.tasks:
        x = stream.prepare(task.test.x, train=False, task=task.index)
        expected = reference_logits(checkpoint, task.index, x)
        assert expected.std() > 0.1  # the reference is far from degenerate
        with torch.no_grad():
            torch.testing.assert_close(method.predict(x, task.index), expected, rtol=1e-4, atol=1e-4)
        accuracies.append((expected.argmax(1) == task.test.y).float().mean().item())

    R = matrix(run_dir)
    assert np.isnan(R[:2]).all()  # CPG saves the network after its last task only
    np.testing.assert_allclose(R[2], accuracies)
    assert summary["acc"] == pytest.approx(np.mean(accuracies))
    assert math.isnan(summary["bwt"]) and summary["width_multiplier"] == 1.5
    tasks = pd.read_parquet(run_dir / results.TASKS_FILE)
    assert tasks["width_multiplier"].tolist() == MULTIPLIERS
    printed = output.getvalue()
    assert all(f"{a * 100:.1f}" in printed for a in accuracies)
    assert "row 2 (every task's accuracy after task 2) is measured" in printed
    assert f"clrun {PRESET} data.root={cifar}" in printed and f"hydra.run.dir={run_dir}" in printed

    # clrun with the same overrides finds the run finished: the same results, nothing trained
    again, _ = run(tmp_path, PRESET, *overrides, name="run")
    assert again["acc"] == summary["acc"]
    np.testing.assert_array_equal(matrix(run_dir), R)


def test_the_command_writes_the_run_folder_clrun_uses_and_refuses_to_overwrite_it(tmp_path, cifar):
    path, _ = checkpoint_file(tmp_path)
    command = [*IMPORT, str(path), f"data.root={cifar}", *OVERRIDES]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert run_dir.name.startswith("cpg-cifar100_20-vgg16_bn-seed0-")
    assert {"summary.parquet", "accuracy.parquet", ".hydra"} <= {p.name for p in run_dir.iterdir()}
    assert "is measured" in done.stdout and f"clrun {PRESET} data.root={cifar}" in done.stdout

    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2
    error = again.stderr.splitlines()[-1]  # after the partial-dataset warning
    assert error.startswith("clrun-import-cpg: error: ") and "already holds a run" in error


def test_one_line_errors_leave_no_folder(tmp_path, cifar):
    overrides = [f"data.root={cifar}", *OVERRIDES]
    out = tmp_path / "run"
    one_line_error("file not found", import_checkpoint, tmp_path / "missing.pth.tar", overrides, out)
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    one_line_error("not a checkpoint of ivclab/CPG", import_checkpoint, tmp_path / "other.pth", overrides, out)

    path, checkpoint = checkpoint_file(tmp_path)
    checkpoint["model_state_dict"]["features.0.bias"] = torch.zeros(16)  # a biased conv: PackNet's vgg, not CPG's
    torch.save(checkpoint, path)
    one_line_error("features.0.bias has no place", import_checkpoint, path, overrides, out, Console(quiet=True))
    path, _ = checkpoint_file(tmp_path)
    at_full_width = [f"data.root={cifar}", "stream.n_tasks=3", "hardware=cpu"]
    one_line_error(r"features.0.weight is \(19, 3, 3, 3\)", import_checkpoint, path, at_full_width, out)
    assert not out.exists()
