"""Learn to Grow: the search picks new for a new input permutation and reuse for a copied task, earlier logits stay
bit-identical, state round trip, the refused backbone, the CLI."""

import pytest
import torch
from conftest import (
    SHARED_DATA,
    TINY_STREAM,
    build_method,
    clrun,
    needs_shared,
    one_line_error,
    run_tables,
    snapshot,
    task_inputs,
    unchanged,
)

from clrun.data.stream import Task

TINY = [*TINY_STREAM, "method=learn_to_grow", "backbone=mlp", "backbone.width=0.25"]


def make(*overrides):
    return build_method(None, *TINY, *overrides)


@pytest.mark.parametrize(
    "overrides",
    [[], ["backbone=convnet", "method.retrain_from=scratch", "method.size_penalty=0", "method.alpha.lr=0.5"]],
    ids=["mlp", "convnet-scratch"],
)
def test_earlier_logits_and_modules_stay_bit_identical(overrides):
    method, stream, _ = make(*overrides)
    logits, kinds = [], set()
    for task in stream.tasks:
        before = snapshot(method.net)
        row = method.learn(task)
        kinds |= {row[f"layer{i}"] for i in range(len(method.net.copies))}
        after = method.net.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items()), f"an earlier module moved in task {task.index}"
        for j, old in enumerate(logits):
            assert torch.equal(method.predict(task_inputs(stream, j), j), old), f"task {j} after task {task.index}"
        logits.append(method.predict(task_inputs(stream, task.index), task.index).clone())
        assert row["n_new"] + row["n_reuse"] + row["n_adapt"] == len(method.net.copies)
    assert kinds - {"new"}  # later tasks reused or adapted something
    # the state round trip predicts the same
    copy, _, _ = make(*overrides)
    copy.load_state_dict(method.state_dict())
    assert unchanged(copy.net, snapshot(method.net))
    assert torch.equal(copy.predict(task_inputs(stream, 1), 1), logits[1])


@needs_shared("MNIST")
def test_search_grows_the_input_layer_for_a_new_permutation_and_reuses_it_for_a_copied_task():
    method, stream, _ = build_method(
        None,
        *TINY_STREAM,
        "method=learn_to_grow",
        "backbone=mlp",
        "stream=permuted_mnist",
        f"data.root={SHARED_DATA}",
        "stream.n_tasks=2",
        "stream.train_per_task=2048",
        "stream.test_per_task=200",
        "method.train.epochs=3",
        "method.search.epochs=5",
        "method.search.batch_size=64",
        "method.size_penalty=0.3",
        "method.alpha.lr=0.03",
    )
    first, permuted = stream.tasks
    copied = Task(1, "copy", first.classes, first.train, first.test)
    method.learn(first)
    state = method.state_dict()
    assert method.learn(copied)["layer0"] == "reuse"  # its input layer is exactly right already
    method.load_state_dict(state)
    row = method.learn(permuted)
    assert row["layer0"] == "new" and row["layer0_weight"] > 0.5  # the old input layer sees shuffled pixels


def test_residual_backbones_are_refused():
    one_line_error("plain feed-forward backbones only", make, "backbone=resnet18", "backbone.width=0.125")


def test_cli_run_records_the_choices_and_refuses_the_class_scenario_without_task_id(tmp_path):
    done = clrun(tmp_path, *TINY, "stream.n_tasks=2")
    assert done.returncode == 0, done.stderr[-2000:]
    tasks, accuracy = run_tables(tmp_path)
    assert list(tasks["layer0"])[0] == "new" and set(tasks["layer1"]) <= {"new", "reuse", "adapt"}
    assert tasks["n_new"].iloc[0] == 2 and tasks["size_penalty"].iloc[1] >= 0 and len(accuracy) == 3
    refused = clrun(tmp_path, *TINY, "stream.scenario=class")
    assert refused.returncode != 0 and "learn_to_grow" in refused.stderr + refused.stdout
