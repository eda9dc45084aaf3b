"""DGR and DGR+distill: the generator trains on its own copy's samples, the copies stay frozen, the replay targets per
scenario, no stored images, resume, the CLI, and class-incremental split MNIST against fine-tuning."""

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    SHARED_DATA,
    TINY_STREAM,
    assert_resume_is_bit_identical,
    build_method,
    clrun,
    needs_shared,
    one_line_error,
    run,
    snapshot,
    state_tensors,
    unchanged,
)

from clrun.methods.dgr import DGR
from clrun.methods.parts.distill import distillation
from clrun.results import count_params, module_bytes

TINY = [
    *TINY_STREAM,
    "method=dgr",
    "backbone=mlp",
    "backbone.width=0.1",
    "method.generator_hidden=[32,32]",
    "method.z_dim=8",
    "method.train.iterations=4",
    "method.train.batch_size=16",
]


def make_dgr(*overrides):
    return build_method(DGR, *TINY, *overrides)[:2]


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_generator_trains_on_its_previous_copys_samples_and_the_copies_stay_frozen(scenario, monkeypatch):
    method, stream = make_dgr(f"stream.scenario={scenario}")
    copies = []
    make_copies = method.frozen_copies

    def watched():
        teacher, old_generator = make_copies()
        state = (snapshot(teacher), snapshot(old_generator))
        samples, seen = [], []
        old_generator.decoder.register_forward_hook(lambda m, i, out: samples.append(torch.sigmoid(out.detach())))
        # what the generator being trained encodes: its training batches
        handle = method.generator.encoder.register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
        copies.append((teacher, old_generator, state, samples, seen, handle))
        return teacher, old_generator

    monkeypatch.setattr(method, "frozen_copies", watched)
    for task in stream.tasks:
        method.learn(task)
        if copies and copies[-1][5] is not None:
            copies[-1][5].remove()
            copies[-1] = (*copies[-1][:5], None)
    assert len(copies) == 2  # before tasks 1 and 2, none before task 0
    for teacher, old_generator, state, samples, seen, _ in copies:
        assert all(not p.requires_grad for m in (teacher, old_generator) for p in m.parameters())
        assert not teacher.training and not old_generator.training
        assert unchanged(teacher, state[0]) and unchanged(old_generator, state[1])
        assert len(samples) == 4  # one replayed batch per step
        # every generated batch is among the batches the trained generator encoded (the replay's VAE loss)
        for batch in samples:
            assert any(s.shape[0] == len(batch) and torch.equal(s.flatten(1), batch) for s in seen)
        assert len(seen) == 8  # each step: the current batch and the replayed one


def test_only_the_current_data_trains_before_any_replay(monkeypatch):
    method, stream = make_dgr()
    sampled = []
    monkeypatch.setattr(type(method.generator), "sample", lambda self, n: sampled.append(n))
    method.learn(stream.tasks[0])
    assert sampled == []


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
@pytest.mark.parametrize("distill", [False, True])
def test_replay_loss_targets_per_scenario(scenario, distill):
    method, stream = make_dgr(f"stream.scenario={scenario}", f"method.distill={distill}", "method.temperature=3")
    method.learn(stream.tasks[0])
    method.learn(stream.tasks[1])
    teacher, _ = method.frozen_copies()
    method.model.add_head(stream.tasks[2].n_classes)
    x = stream.prepare(stream.tasks[2].train.x[:8], train=False)
    with torch.no_grad():
        features, old = method.model.features(x), teacher.features(x)
        got = method.replay_loss(features, old, teacher, 2)
        if scenario == "task":
            pairs = [(method.model.logits(features, k), teacher.logits(old, k)) for k in range(2)]
        elif scenario == "class":
            student = method.model.logits(features, None)
            assert student.shape[1] == 6 and teacher.logits(old, None).shape[1] == 4
            pad = torch.full((8, 2), -torch.inf)
            pairs = [(student, torch.cat([teacher.logits(old, None), pad], 1))]
        else:
            pairs = [(method.model.logits(features, None), teacher.logits(old, None))]
        if distill:
            terms = [-(torch.softmax(t / 3, 1) * torch.log_softmax(s / 3, 1)).sum(1).mean() for s, t in pairs]
            assert distillation(*pairs[0], 3.0).item() == pytest.approx(terms[0].item(), rel=1e-5)
        else:
            terms = [F.cross_entropy(s, t.argmax(1)) for s, t in pairs]
            if scenario == "class":  # a new class is never a hard target
                assert (pairs[0][1].argmax(1) < 4).all()
    assert got.item() == pytest.approx((sum(terms) / len(terms)).item(), rel=1e-5)


def test_no_image_is_stored_and_the_footprint_counts_the_generator():
    method, stream = make_dgr("stream.scenario=class")
    for task in stream.tasks:
        method.learn(task)
    footprint = method.footprint()
    assert footprint.params == count_params(method.model) + count_params(method.generator)
    assert footprint.bytes == module_bytes(method.model) + module_bytes(method.generator)
    state = method.state_dict()
    assert not any(t.dtype == torch.uint8 for t in state_tensors(state))  # images are uint8
    assert set(state) == {"model", "n_tasks", "generator"}


def test_refuses_per_task_normalisation_in_one_line():
    one_line_error("per-task normalisation", make_dgr, "stream.normalize=task")


def test_resume_is_bit_identical(tmp_path):
    assert_resume_is_bit_identical(tmp_path, *TINY, "stream.scenario=class", "method.distill=true")


def test_cli_runs_dgr_distill_in_the_domain_scenario(tmp_path):
    overrides = [o.replace("method=dgr", "method=dgr_distill") for o in TINY]
    done = clrun(tmp_path, *overrides, "stream.scenario=domain")
    assert done.returncode == 0, done.stderr[-2000:]
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    assert run_dir.name.startswith("dgr_distill-synthetic-mlp-")
    summary = pd.read_parquet(run_dir / "summary.parquet")
    assert summary["n_tasks"].item() == 3 and 0 <= summary["acc"].item() <= 1


@needs_shared("MNIST")
def test_dgr_beats_finetune_in_the_class_scenario_on_split_mnist(tmp_path):
    tiny = [
        "hardware=cpu",
        "hardware.threads=1",
        "stream=split_mnist",
        f"data.root={SHARED_DATA}",
        "stream.scenario=class",
        "stream.n_tasks=3",
        "backbone=mlp",
        "backbone.width=0.25",
        "stream.train_per_task=500",
        "stream.test_per_task=200",
        "method.train.iterations=100",
    ]
    generator = ["method.generator_hidden=[200,200]", "method.z_dim=20"]
    dgr, _ = run(tmp_path, *tiny, "method=dgr", *generator, name="dgr")
    finetune, _ = run(tmp_path, *tiny, "method=finetune", name="finetune")
    # measured: DGR 0.86, fine-tuning about 0.33 (it keeps only the last task's two digits)
    assert finetune["acc"] < 0.4
    assert dgr["acc"] > finetune["acc"] + 0.3
