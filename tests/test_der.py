"""DER: frozen earlier extractors, the rebuilt classifier, pruned channel gates, footprint, resume, real MNIST."""

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA, build_method, matrix, needs_shared, run, run_interrupted_then_resumed, task_inputs

from clrun.methods.der import DER

TINY = [
    "method=der",
    "hardware=cpu",
    "hardware.threads=1",
    "stream.n_tasks=3",
    "stream.train_per_task=64",
    "stream.test_per_task=32",
    "method.train.iterations=4",
    "method.train.batch_size=32",
    "method.replay.budget=24",
]
MLP = ["backbone=mlp", "backbone.hidden=[16,12]"]
CONVNET = ["backbone=convnet", "backbone.width=0.125"]


def make(*overrides):
    return build_method(DER, *TINY, *overrides)[:2]


@pytest.mark.parametrize("backbone", [MLP, CONVNET])
@pytest.mark.parametrize("scenario", ["class", "task"])
def test_earlier_extractors_are_frozen_and_their_features_bit_identical(backbone, scenario):
    method, stream = make(*backbone, f"stream.scenario={scenario}")
    x, features, logits = task_inputs(stream, 0), [], []
    for task in stream.tasks:
        method.learn(task, None)
        method.extractors.eval()
        for j in range(task.index):
            with torch.no_grad():
                assert torch.equal(method.extractors(x, j + 1)[:, -features[j].shape[1] :], features[j])
            if scenario == "task":
                assert torch.equal(method.predict(x, j), logits[j])  # head j reads extractors 0..j only
        with torch.no_grad():
            features.append(method.extractors(x, task.index + 1)[:, -method.extractors.nets[task.index].out_features :])
        logits.append(method.predict(x, task.index).clone())
    method.extractors.train()
    assert [net.training for net in method.extractors.nets] == [False, False, False]  # all frozen after learning


def test_class_classifier_grows_over_all_features_keeping_old_weights():
    method, stream = make(*MLP, "stream.scenario=class")
    method.learn(stream.tasks[0], None)
    old = method.heads[0]
    method.add_task(stream.tasks[1])
    new = method.heads[0]
    assert (new.in_features, new.out_features) == (24, 4) and len(method.heads) == 1
    assert torch.equal(new.weight[:2, :12], old.weight) and torch.equal(new.bias[:2], old.bias)
    x = task_inputs(stream, 0)
    logits = method.predict(x, 1)
    torch.testing.assert_close(logits, method.predict_agnostic(x, 2)[0][:, 2:4])


def test_channel_gates_are_pruned_to_zero_or_one_and_masked_channels_vanish():
    method, stream = make(
        *MLP, "stream.scenario=class", "method.sparsity_weight=50", "method.train.iterations=20", "method.train.lr=0.05"
    )
    row = method.learn(stream.tasks[0], None)
    masks = method.extractors.masks[0]
    values = torch.cat(masks)
    assert set(values.unique().tolist()) <= {0.0, 1.0} and [len(m) for m in masks] == [16, 12]
    assert row["pruned"] == method.summary()["pruned"] == pytest.approx(1 - values.mean().item())
    assert row["pruned"] > 0
    with torch.no_grad():
        features = method.extractors(task_inputs(stream, 0), 1)
    assert (features[:, masks[1] == 0] == 0).all()  # mlp: the last gated layer is the feature output


def test_footprint_counts_every_extractor_its_masks_the_classifier_and_the_memory():
    method, stream = make(*MLP, "stream.scenario=class")
    extractor = 3072 * 16 + 16 + 16 * 12 + 12
    for task in stream.tasks:
        method.learn(task, None)
        n = task.index + 1
        classifier = (12 * n + 1) * 2 * n
        memory = 24 * (3 * 32 * 32 + 8 + 8)  # uint8 images, int64 labels and tasks
        footprint = method.footprint()
        assert footprint.params == n * extractor + classifier
        assert footprint.bytes == 4 * (n * extractor + classifier) + 4 * 28 * n + memory
        assert footprint.base_params == extractor + 12 * 2 + 2


def test_resume_after_task_2_equals_uninterrupted(tmp_path):
    overrides = [*TINY, *MLP, "stream.scenario=class"]
    _, straight = run(tmp_path, *overrides, name="straight")
    resumed = run_interrupted_then_resumed(tmp_path, *overrides, after_tasks=2)
    np.testing.assert_array_equal(matrix(resumed), matrix(straight))


@needs_shared("MNIST", "raw")
def test_learns_real_split_mnist_class_incrementally(tmp_path):
    summary, run_dir = run(
        tmp_path,
        *TINY,
        *MLP,
        "stream=split_mnist",
        "stream.scenario=class",
        f"data.root={SHARED_DATA}",
        "stream.n_tasks=5",
        "stream.train_per_task=256",
        "stream.test_per_task=100",
        "method.train.iterations=40",
        "method.replay.budget=200",
    )
    final = matrix(run_dir)[-1]
    print(summary, final)
    assert final.mean() > 0.4 and final.min() > 0.1  # chance: 0.1; finetune keeps only the last task (about 0.2)
