"""PackNet and Piggyback: frozen earlier tasks, pruning schedule, mask threshold, storage, resume."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build_method, compose_config, matrix, run, run_interrupted_then_resumed
from omegaconf import OmegaConf

from clrun import results
from clrun.errors import ClrunError
from clrun.methods.packnet import prune_fraction
from clrun.models.shared_net import shared_layers
from clrun.run import CHECKPOINT

TINY = [
    "hardware=cpu",
    "hardware.threads=1",  # tiny nets: one thread is fastest, and immune to other processes on the cores
    "stream.n_tasks=3",
    "stream.train_per_task=160",
    "stream.test_per_task=80",
    "backbone.width=0.5",
]
# short phases with Adam, so that a tiny net learns something in a second
PACKNET = [
    "method=packnet",
    *(
        f"method.{phase}.{key}"
        for phase in ("train", "retrain")
        for key in ("epochs=2", "batch_size=32", "optimizer=adam", "lr=0.001", "milestones=[]")
    ),
]
PIGGYBACK = [
    "method=piggyback",
    *(
        f"method.{phase}.{key}"
        for phase in ("train", "mask_train")
        for key in ("epochs=2", "batch_size=32", "optimizer=adam", "milestones=[]")
    ),
    "method.train.lr=0.001",
    "method.mask_train.lr=0.002",  # large enough that masks cross the threshold within two tiny epochs
]
RECIPES = {"packnet": PACKNET, "piggyback": PIGGYBACK}


@pytest.fixture(autouse=True)
def restore_threads():
    """`hardware.threads=1` sets torch's thread count for the process: give other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def build(*overrides: str):
    """The method and stream `clrun <overrides>` would run, before any task is learned."""
    return build_method(None, *overrides)[:2]


def probe(stream) -> list[torch.Tensor]:
    """A fixed batch of prepared test images per task."""
    return [stream.prepare(task.test.x[:32], train=False) for task in stream.tasks]


# ---- both methods ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides",
    [PACKNET, PIGGYBACK, [*PIGGYBACK, "method.train_bn=true"]],
    ids=["packnet", "piggyback", "piggyback-train_bn"],
)
def test_earlier_tasks_logits_stay_bit_identical(overrides):
    method, stream = build(*TINY, *overrides)
    inputs = probe(stream)
    learned = []
    for task in stream.tasks:
        method.learn(task)
        with torch.no_grad():
            learned.append(method.predict(inputs[task.index], task.index))
            for j in range(task.index + 1):
                assert torch.equal(method.predict(inputs[j], j), learned[j]), (task.index, j)


@pytest.mark.parametrize("name", ["packnet", "piggyback"])
def test_run_learns_with_zero_bwt(tmp_path, name):
    summary, run_dir = run(tmp_path, *TINY, *RECIPES[name], "backbone=mlp")  # learns faster than the convnet
    R = matrix(run_dir)
    for j in range(3):
        assert (R[j:, j] == R[j, j]).all()  # nothing learned later changes an earlier task's predictions
    assert summary["bwt"] == 0.0 and summary["forgetting"] == 0.0
    assert np.diag(R).min() > 0.6 and summary["acc"] > 0.7  # two classes per task: chance is 0.5
    assert 1.0 < summary["expansion"] < 1.1  # one backbone, three heads, per-task biases / batch norm
    tasks = pd.read_parquet(run_dir / results.TASKS_FILE)
    assert {"owned_share", "free_share", "width_multiplier", "epochs", "params", "model_mb"} <= set(tasks.columns)
    if name == "packnet":
        assert list(tasks["epochs"]) == [4, 4, 4]  # train + retrain
        np.testing.assert_allclose(tasks["sparsity"], 0.6, atol=1e-3)
        np.testing.assert_allclose(tasks["owned_share"], [0.4, 0.24, 0.144], atol=1e-3)
    else:
        assert math.isnan(tasks["picked_share"][0]) and (tasks["picked_share"][1:] > 0.5).all()
        assert list(tasks["owned_share"]) == [1.0, 0.0, 0.0] and (tasks["free_share"] == 0).all()


@pytest.mark.parametrize("name", ["packnet", "piggyback"])
def test_interrupted_run_resumes_to_the_same_matrix(tmp_path, monkeypatch, name):
    overrides = [*TINY, *RECIPES[name], "stream.augment=true"]
    _, uninterrupted = run(tmp_path, *overrides, name="full")
    run_interrupted_then_resumed(tmp_path, *overrides)
    np.testing.assert_array_equal(matrix(tmp_path / "resumed"), matrix(uninterrupted))
    figures = ["sparsity" if name == "packnet" else "picked_share", "owned_share", "free_share", "params", "model_mb"]
    resumed, full = (pd.read_parquet(d / results.TASKS_FILE)[figures] for d in (tmp_path / "resumed", uninterrupted))
    pd.testing.assert_frame_equal(resumed, full)
    resumed, full = (
        torch.load(d / CHECKPOINT, weights_only=True)["method"]["net"] for d in (tmp_path / "resumed", uninterrupted)
    )
    assert resumed.keys() == full.keys() and all(torch.equal(resumed[k], full[k]) for k in full)  # bit for bit


# MLP 3072 -> 8 -> 6 (biases) with a 2-class head per task; ConvNet width 0.25: 3 -> 8 -> 16 -> 32 channels,
# 3x3 convs without bias, each with batch norm (2 affine parameters per channel; running mean and var in fp32,
# num_batches_tracked in int64), 2-class heads on 32 features. Three tasks.
MLP_WEIGHTS, MLP_PRIVATE, MLP_HEADS = 3072 * 8 + 8 * 6, 8 + 6, 3 * (6 * 2 + 2)
MLP_PICK_BYTES = math.ceil(3072 * 8 / 8) + math.ceil(8 * 6 / 8)
CONV_WEIGHTS, CONV_AFFINE, CONV_HEADS = 3 * 8 * 9 + 8 * 16 * 9 + 16 * 32 * 9, 2 * (8 + 16 + 32), 3 * (32 * 2 + 2)
CONV_PRIVATE_BYTES = 2 * (8 + 16 + 32) * 4 + 2 * (8 + 16 + 32) * 4 + 3 * 8
CONV_PICK_BYTES = math.ceil(3 * 8 * 9 / 8) + math.ceil(8 * 16 * 9 / 8) + math.ceil(16 * 32 * 9 / 8)


@pytest.mark.parametrize(
    "name,backbone,params,size",
    [
        (
            "packnet",
            "mlp",
            MLP_WEIGHTS + MLP_HEADS + 3 * MLP_PRIVATE,
            MLP_WEIGHTS * 4 + MLP_WEIGHTS + MLP_HEADS * 4 + 3 * MLP_PRIVATE * 4,
        ),
        (
            "piggyback",
            "mlp",
            MLP_WEIGHTS + MLP_HEADS + 3 * MLP_PRIVATE,
            MLP_WEIGHTS * 4 + MLP_WEIGHTS + MLP_HEADS * 4 + 3 * MLP_PRIVATE * 4 + 2 * MLP_PICK_BYTES,
        ),
        (
            "piggyback",
            "convnet",
            CONV_WEIGHTS + CONV_HEADS + 3 * CONV_AFFINE,
            CONV_WEIGHTS * 5 + CONV_HEADS * 4 + 3 * CONV_PRIVATE_BYTES + 2 * CONV_PICK_BYTES,
        ),
    ],
)
def test_footprint_counts_weights_owner_map_pick_bits_private_tensors_and_heads(name, backbone, params, size):
    width = ["backbone.hidden=[8,6]", "backbone.width=1.0"] if backbone == "mlp" else ["backbone.width=0.25"]
    method, stream = build(*TINY, *RECIPES[name], f"backbone={backbone}", *width, "stream.train_per_task=32")
    for task in stream.tasks:
        method.learn(task)
    footprint = method.footprint()
    assert (footprint.params, footprint.bytes) == (params, size)
    first = (MLP_WEIGHTS + MLP_PRIVATE + 14) if backbone == "mlp" else (CONV_WEIGHTS + CONV_AFFINE + 66)
    assert footprint.base_params == first  # one backbone with one head


# ---- PackNet -----------------------------------------------------------------------------------
def test_prune_fraction_schedules():
    def cfg(**fields):
        return OmegaConf.merge(compose_config("method=packnet").method, fields)

    assert [prune_fraction(cfg(), k, 4) for k in range(4)] == [0.6] * 4
    assert [prune_fraction(cfg(prune=0.5, prune_last=False), k, 4) for k in range(4)] == [0.5, 0.5, 0.5, 0.0]
    equal = [prune_fraction(cfg(prune_schedule="equal_share"), k, 4) for k in range(4)]
    np.testing.assert_allclose(equal, [3 / 4, 2 / 3, 1 / 2, 0.0])  # keeps 1/4, 1/3, 1/2, all of its pool
    with pytest.raises(ClrunError, match="method.prune=1.0"):
        build(*TINY, "method=packnet", "method.prune=1.0")


def test_packnet_task_keeps_its_share_of_what_it_claimed_and_released_weights_are_zero():
    method, stream = build(*TINY, *PACKNET, "method.prune=0.7")
    layers = shared_layers(method.net.backbone)
    for task in stream.tasks:
        tag = task.index + 1
        free = {name: int((layer.owner == 0).sum()) for name, layer in layers.items()}
        older = {name: (layer.owner.clone(), layer.weight.detach().clone()) for name, layer in layers.items()}
        row = method.learn(task)
        for name, layer in layers.items():
            owned = int((layer.owner == tag).sum())
            assert owned == free[name] - round(0.7 * free[name]), (tag, name)
            assert (layer.weight[layer.owner == 0] == 0).all()  # released weights are zero
            owner, weight = older[name]
            kept = (owner >= 1) & (owner < tag)
            assert torch.equal(layer.owner[kept], owner[kept])  # earlier tasks keep their weights ...
            assert torch.equal(layer.weight.detach()[kept], weight[kept])  # ... bit for bit
        counts = method.net.owner_counts()
        assert row["owned_share"] == pytest.approx(float(counts[tag] / counts.sum()))
        assert row["sparsity"] == pytest.approx(0.7, abs=1e-3)


def test_packnet_equal_share_gives_every_task_the_same_share():
    method, stream = build(*TINY, *PACKNET, "method.prune_schedule=equal_share")
    rows = [method.learn(task) for task in stream.tasks]
    n_layers = len(shared_layers(method.net.backbone))
    counts = method.net.owner_counts()[:4]
    assert counts[0] == 0  # the last task keeps its whole pool: nothing left free
    assert counts[1:].max() - counts[1:].min() <= n_layers  # rounding: at most one weight per layer
    np.testing.assert_allclose([row["owned_share"] for row in rows], 1 / 3, atol=1e-3)
    assert [row["epochs"] for row in rows] == [4, 4, 2]  # the unpruned last task is not retrained
    assert method.summary()["redundancy"] == 0.0


# ---- Piggyback ---------------------------------------------------------------------------------
@pytest.mark.parametrize("train_bn", [False, True])
def test_piggyback_batch_norm_stays_at_task_1_unless_train_bn(train_bn):
    method, stream = build(*TINY, *PIGGYBACK, f"method.train_bn={str(train_bn).lower()}")
    for task in stream.tasks:
        method.learn(task)
    first = method.net.records[0]["private"]
    assert any(".running_mean" in key for key in first)
    for record in method.net.records[1:]:
        same = {key: torch.equal(tensor, first[key]) for key, tensor in record["private"].items()}
        if train_bn:  # per-task batch norm: affine parameters and running statistics moved ...
            assert not any(same.values())
            for key, tensor in record["private"].items():  # ... each task's from task 1's, not the previous one's
                if key.endswith("num_batches_tracked"):
                    assert tensor == first[key] + 10  # 160 images, batch 32, 2 epochs
        else:  # affine, running mean / var and the batch counter exactly task 1's
            assert all(same.values()), [key for key, equal in same.items() if not equal]


@pytest.mark.parametrize("side,picked", [(-1, True), (1, False)])
def test_piggyback_mask_is_on_exactly_above_the_threshold(side, picked):
    # masks that never move (lr 0) stay at mask_init: a threshold just below keeps every old weight,
    # just above drops every one
    threshold = 0.01 * (1 + side * 1e-4)
    overrides = ["method.mask_train.lr=0.0", "method.mask_init=0.01", f"method.threshold={threshold}"]
    method, stream = build(*TINY, *PIGGYBACK, *overrides, "stream.n_tasks=2", "stream.train_per_task=32")
    rows = [method.learn(task) for task in stream.tasks]
    record = method.net.records[1]
    assert set(record["pick"]) == set(shared_layers(method.net.backbone))
    assert all(bool((pick == picked).all()) for pick in record["pick"].values())
    assert rows[1]["picked_share"] == (1.0 if picked else 0.0)
    x = probe(stream)[1]
    with torch.no_grad():
        features = method.net.task_view(1)(x)
        if picked:  # task 2 sees task 1's backbone unchanged
            assert torch.equal(features, method.net.task_view(0)(x))
        else:  # no weight: every input gives the same features
            assert torch.equal(features, features[:1].expand_as(features))
