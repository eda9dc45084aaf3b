"""GIM: the gates pick the right module on separable tasks, earlier tasks' outputs bit-identical, the selection
rule, resume, the lstm backbone's row reading, the CLI, split MNIST read row by row."""

import pandas as pd
import torch
from conftest import (
    SHARED_DATA,
    TINY_STREAM,
    assert_resume_is_bit_identical,
    build_method,
    clrun,
    needs_shared,
    one_line_error,
    run,
    task_inputs,
)

from clrun.models.backbones import RowLSTM, rows

# small modules and gates, trained fast enough to learn from 64 images
SMALL = ["method=gim", "method.gate_hidden=32", "method.train.lr=0.01"]
SMALL += ["method.gate_train.lr=0.01", "method.gate_train.epochs=8"]
TINY = [*TINY_STREAM, "backbone=lstm", "backbone.hidden=16", *SMALL]
SEPARABLE = ["stream.dataset={_target_:test_gim.separable}", "stream.train_per_task=null", "stream.test_per_task=null"]


def separable(root, train: bool, per_class: int = 48):
    """Three tasks of two classes, 1x28x28 noise: task k's images are bright in rows 8k..8k+7, its two classes
    lighter in the left or the right half."""
    g = torch.Generator().manual_seed(int(train))
    labels = torch.arange(6).repeat_interleave(per_class)
    images = torch.randint(0, 40, (len(labels), 1, 28, 28), generator=g, dtype=torch.uint8)
    for i, label in enumerate(labels.tolist()):
        task, side = divmod(label, 2)
        images[i, 0, 8 * task : 8 * task + 8] += 150
        images[i, 0, :, 14 * side : 14 * side + 14] += 60
    return images, labels


def test_row_lstm_reads_images_row_by_row():
    lstm = RowLSTM((3, 4, 5), 8)
    x = torch.randn(2, 3, 4, 5)
    assert rows(x).shape == (2, 4, 15) and torch.equal(rows(x)[:, 1, 5:10], x[:, 1, 1])
    assert torch.equal(lstm(x), lstm.lstm(rows(x))[0][:, -1]) and lstm(x).shape == (2, 8)


def test_methods_that_mask_or_gate_layers_refuse_the_lstm_backbone():
    lstm = [*TINY_STREAM, "backbone=lstm"]
    one_line_error("backbone.name=lstm: weight sharing", build_method, None, *lstm, "method=packnet")
    one_line_error("method hat gates the hidden units of chain backbones only", build_method, None, *lstm, "method=hat")


def test_gates_pick_the_right_module_on_separable_tasks(tmp_path):
    summary, run_dir = run(tmp_path, *TINY, *SEPARABLE, "stream.scenario=class", "method.train.epochs=10")
    assert summary["task_id_acc"] == 1.0  # every test image of every task went to its own module
    assert summary["acc"] > 0.9
    tasks = pd.read_parquet(run_dir / "tasks.parquet")
    assert (tasks["train_selection"] == 1.0).all() and tasks["gate_loss"].notna().all()


def test_each_image_or_each_group_picks_its_module():
    method, stream, _ = build_method(None, *TINY, "method.selection_batch=2")
    method.gate_errors = lambda x: torch.tensor([[1.0, 5.0, 1.0, 1.0, 0.0], [2.0, 0.0, 0.5, 3.0, 1.0]])
    assert method.infer_task(None, [None, None]).tolist() == [1, 1, 0, 0, 0]  # pairs (0, 1), (2, 3), (4,)
    method.cfg.selection_batch = 1
    assert method.infer_task(None, [None, None]).tolist() == [0, 1, 1, 0, 0]
    assert method.infer_task(None, [None]).tolist() == [0] * 5  # only the gates of the tasks learned so far


def test_earlier_outputs_stay_bit_identical_for_lstm_and_mlp_modules():
    for backbone in (["backbone=lstm", "backbone.hidden=16"], ["backbone=mlp", "backbone.hidden=[16]"]):
        method, stream, _ = build_method(None, *TINY_STREAM, *backbone, *SMALL)
        outputs = []
        for task in stream.tasks:
            method.learn(task)
            for j, (logits, errors) in enumerate(outputs):
                x = task_inputs(stream, j)
                assert torch.equal(method.predict(x, j), logits), (backbone, j, task.index)
                assert torch.equal(method.gate_errors(x)[: len(errors)], errors)
            x = task_inputs(stream, task.index)
            outputs.append((method.predict(x, task.index).clone(), method.gate_errors(x).clone()))
        # module k reads the input and module k-1's output; the footprint counts every module, head and gate
        assert method.columns[1].out_features == 16
        assert sum(p.numel() for p in method.columns[1].parameters()) > sum(
            p.numel() for p in method.columns[0].parameters()
        )
        assert method.footprint().params == sum(
            sum(p.numel() for p in part.parameters()) for part in (method.columns, method.heads, method.gates)
        )


def test_other_backbones_are_refused():
    one_line_error("gim: backbone.name=convnet", build_method, None, *TINY_STREAM, "backbone=convnet", *SMALL)


def test_resume_equals_uninterrupted(tmp_path):
    overrides = [*TINY, "stream.train_per_task=32", "stream.test_per_task=16", "stream.scenario=class"]
    assert_resume_is_bit_identical(tmp_path, *overrides)  # weights, masks, buffers


def test_cli_runs_gim_in_the_class_scenario(tmp_path):
    done = clrun(tmp_path, *TINY, "stream.scenario=class", "method.train.epochs=1")
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert run_dir.name.startswith("gim-synthetic-lstm-")
    summary = pd.read_parquet(run_dir / "summary.parquet")
    assert 0 <= summary["task_id_acc"].item() <= 1
    assert "train_selection" in pd.read_parquet(run_dir / "tasks.parquet")


@needs_shared("MNIST")
def test_learns_split_mnist_rows_and_infers_the_task(tmp_path):
    summary, _ = run(
        tmp_path,
        *TINY_STREAM,
        "backbone=lstm",
        "method=gim",
        "stream=split_mnist",
        "stream.scenario=class",
        f"data.root={SHARED_DATA}",
        "stream.train_per_task=1024",
        "stream.test_per_task=200",
        "method.train.lr=0.003",
        "method.train.epochs=3",
        "method.gate_hidden=64",
        "method.gate_train.lr=0.003",
        "method.gate_train.epochs=3",
    )
    assert summary["task_aware_acc"] > 0.9  # the modules learn their digit pairs
    assert summary["task_id_acc"] > 0.6 and summary["acc"] > 0.6  # and the gates mostly find them (chance: 1/3)
    assert summary["task_aware_bwt"] == 0
