"""CPG and PAE: pruning schedule, picking masks, growth, goals, no forgetting, resume."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from conftest import build_method, matrix, run, run_interrupted_then_resumed

from clrun import results
from clrun.data.stream import Split
from clrun.errors import ClrunError
from clrun.methods.cpg import CPG, cubic_sparsity, forced_sparsity
from clrun.methods.parts.goals import load_goals
from clrun.models.shared_net import shared_layers

# a tiny recipe: MLP 3072 -> 100 -> 100, 160 images per task, 1 epoch per phase, two sparsity steps
TINY = [
    "hardware=cpu",
    "hardware.threads=1",  # tiny tensors: one thread is many times faster than two on a busy machine
    "backbone=mlp",
    "backbone.width=0.25",
    "stream.train_per_task=160",
    "stream.test_per_task=80",
    "method.train.epochs=1",
    "method.train.batch_size=32",
    "method.prune_train.epochs=1",
    "method.prune_train.batch_size=32",
    "method.retrain.epochs=2",
    "method.retrain.batch_size=32",
    "method.sparsities=[0.3,0.6]",
    "method.pruning_interval=1",
    "method.pruning_frequency=2",
    "method.min_train_acc=0.0",
]


@pytest.fixture(autouse=True)
def restore_threads():
    """`hardware.threads=1` sets torch's global thread count; give the other test modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def make_method(*overrides: str) -> CPG:
    return build_method(CPG, *TINY, *overrides)[0]


def inputs(method: CPG, task: int) -> torch.Tensor:
    stream = method.stream
    return stream.prepare(stream.tasks[task].test.x[:32], train=False)


@torch.no_grad()
def learn_all(method: CPG) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor]]:
    """Learn every task; return the rows, each task's logits right after it was learned, and at the end."""
    rows, first = [], []
    for task in method.stream.tasks:
        with torch.enable_grad():
            rows.append(method.learn(task))
        first.append(method.predict(inputs(method, task.index), task.index).clone())
    last = [method.predict(inputs(method, j), j) for j in range(len(method.stream))]
    return rows, first, last


def write_goals(tmp_path: Path, goals: dict) -> Path:
    path = tmp_path / "goals.json"
    path.write_text(json.dumps(goals))
    return path


# ---- compacting ---------------------------------------------------------------------------------------------------
def test_cubic_schedule():
    assert cubic_sparsity(0.2, 0.6, 0.0) == pytest.approx(0.2)
    assert cubic_sparsity(0.2, 0.6, 0.5) == pytest.approx(0.6 - 0.4 * 0.125)
    assert cubic_sparsity(0.2, 0.6, 1.0) == pytest.approx(0.6)
    assert cubic_sparsity(0.2, 0.6, 1.7) == pytest.approx(0.6) and cubic_sparsity(0.2, 0.6, -1) == pytest.approx(0.2)
    ramp = [cubic_sparsity(0.0, 0.9, p / 100) for p in range(101)]
    assert all(a < b for a, b in zip(ramp, ramp[1:], strict=False))  # strictly increasing
    assert ramp[10] - ramp[0] > ramp[100] - ramp[90]  # prunes fast first, slowly near the target
    # CPG's least sparsity for a task below its goal at the maximum width
    assert [forced_sparsity(r) for r in (0, 1, 2, 3)] == [0.0, 0.5, 0.7, 0.8]


def test_each_pruning_step_reaches_its_target_in_every_layer():
    method = make_method("method=cpg", "stream.n_tasks=2", "method.goals=0.0", "method.sparsities=[0.3,0.6,0.75]")
    step = method._prune_step
    reached = []

    def checked(task, cfg, initial, target, phase):
        tag = task.index + 1
        owners = [layer.owner.clone() for layer in shared_layers(method.net.backbone).values()]
        out = step(task, cfg, initial, target, phase)
        for before, layer in zip(owners, shared_layers(method.net.backbone).values(), strict=True):
            pool = int(((layer.owner == tag) | (layer.owner == 0)).sum())
            assert int((layer.owner == 0).sum()) == round(target * pool)  # exactly the target share of the pool
            earlier = (before >= 1) & (before < tag)
            assert torch.equal(layer.owner[earlier], before[earlier])  # earlier tasks' weights are never pruned
        reached.append(target)
        return out

    method._prune_step = checked
    rows, _, _ = learn_all(method)
    assert reached == [0.3, 0.6, 0.75, 0.3, 0.6, 0.75]  # goal 0: every step qualifies
    assert [row["sparsity"] for row in rows] == [0.75, 0.75]
    # task 1's pool was task 0's released 75%: it keeps a quarter of it; task 0 keeps a quarter of everything
    share = method.net.owner_counts().double() / method.net.owner_counts().sum()
    assert share[1].item() == pytest.approx(0.25, abs=0.01) and share[2].item() == pytest.approx(0.75 * 0.25, abs=0.01)
    for layer in shared_layers(method.net.backbone).values():
        assert (layer.weight[layer.owner == 0] == 0).all()  # released weights restart from 0


def test_a_step_that_misses_the_goal_is_rolled_back():
    method = make_method("method=pae", "stream.n_tasks=1", "method.sparsities=[0.3,0.9]", "method.goals=0.0")
    step = method._prune_step
    kept = {}

    def second_step_misses(task, cfg, initial, target, phase):
        train_acc, acc = step(task, cfg, initial, target, phase)
        if target == 0.3:
            kept.update(method._state())
            return train_acc, acc
        return train_acc, -1.0  # below any goal

    method._prune_step = second_step_misses
    row = method.learn(method.stream.tasks[0])
    assert row["prune_steps"] == 2 and row["sparsity"] == 0.3
    for layer in shared_layers(method.net.backbone).values():
        assert int((layer.owner == 0).sum()) == round(0.3 * layer.owner.numel())
    state = method.net.state_dict()
    assert all(torch.equal(state[k], v) for k, v in kept.items() if not k.endswith("weight"))
    for name, layer in shared_layers(method.net.backbone).items():  # the 0.3 step's weights (released ones zeroed)
        assert torch.equal(layer.weight, kept[f"backbone.{name}.weight"] * (layer.owner > 0))


@pytest.mark.parametrize(
    "stop_at_first_miss, margin, min_train_acc, kept, steps",
    [
        (False, 0.0, "null", 0.9, 4),
        (True, 0.0, "null", 0.3, 2),
        (False, 0.15, "null", 0.95, 4),
        (False, 0.15, 0.9, 0.9, 4),
    ],
)
def test_the_search_keeps_the_largest_step_that_meets_the_goal(stop_at_first_miss, margin, min_train_acc, kept, steps):
    """CPG's record {0.3: pass, 0.6: miss, 0.9: pass, 0.95: 0.35 at train accuracy 0}, goal 0.4: it keeps 0.9;
    with a 0.15 margin 0.95 meets the goal, unless its train accuracy fails `min_train_acc` (CPG's exit 6)."""
    overrides = [
        "method.sparsities=[0.3,0.6,0.9,0.95]",
        "method.goals=0.4",
        f"method.min_train_acc={min_train_acc}",
        f"method.acc_margin={margin}",
        f"method.stop_at_first_miss={stop_at_first_miss}",
    ]
    method = make_method("method=pae", "stream.n_tasks=1", *overrides)
    train = method._train
    method._train = lambda task, cfg, phase: (train(task, cfg, phase), (1.0, 0.5))[1]  # meets the goal: no growth
    step = method._prune_step
    record = {0.3: (1.0, 0.5), 0.6: (1.0, 0.2), 0.9: (1.0, 0.4), 0.95: (0.0, 0.35)}  # (train acc, acc) per step
    starts, states = [], {}

    def scripted(task, cfg, initial, target, phase):
        step(task, cfg, initial, target, phase)
        starts.append(initial)
        states[target] = method._state()
        return record[target]

    method._prune_step = scripted
    row = method.learn(method.stream.tasks[0])
    assert (row["sparsity"], row["prune_steps"], row["acc_kept"]) == (kept, steps, record[kept][1])
    assert starts == [0.0, 0.3, 0.6, 0.9][:steps]  # each step from the one before, passed or missed
    for name, layer in shared_layers(method.net.backbone).items():  # the kept step's owner map and weights
        assert torch.equal(layer.owner, states[kept][f"backbone.{name}.owner"])
        assert int((layer.owner == 0).sum()) == round(kept * layer.owner.numel())


# ---- per-task recipes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, phases",
    [("cpg", []), ("packnet", ["method.retrain.epochs=1"]), ("piggyback", ["method.mask_train.epochs=1"])],
)
def test_task_overrides_change_only_that_tasks_recipe(name, phases):
    """CPG's per-task learning rates and epochs: `method.task_overrides.<task>` changes that task alone."""
    overrides = [*TINY[:7], *phases] if phases else TINY
    recipe = "train" if name != "piggyback" else "mask_train"  # piggyback's tasks >= 2 train masks
    method = build_method(
        CPG if name == "cpg" else None,
        *overrides,
        f"method={name}",
        "stream.n_tasks=2",
        *(["method.goals=0.0"] if name == "cpg" else []),
        f"+method.task_overrides.2.{recipe}.epochs=3",
    )[0]
    seen = []
    phase = method.train_phase

    def recorded(task, cfg, label, **kw):
        seen.append((task.index, label, cfg.epochs))
        return phase(task, cfg, label, **kw)

    method.train_phase = recorded
    learn_all(method)
    trained = [(task, epochs) for task, label, epochs in seen if label.startswith(("train", "backbone", "masks"))]
    assert trained == [(0, 1), (1, 3)]
    assert method.cfg[recipe].epochs == 1  # the method's own config is unchanged


@pytest.mark.parametrize(
    "override, message",
    [
        ("+method.task_overrides.nine.train.lr=0.1", "method.task_overrides.nine: no task of that name or 1-based"),
        ("+method.task_overrides.3.train.lr=0.1", "method.task_overrides.3: no task of that name or 1-based"),
        ("+method.task_overrides.1.train.lrr=0.1", "method.task_overrides.1.train.lrr"),
        ("+method.task_overrides.1.train.epochs=0", "method.task_overrides.1.train.epochs=0 is invalid"),
        ("+method.task_overrides.1.acc_margin=2", "method.task_overrides.1.acc_margin=2.0 is invalid: it must be in"),
    ],
)
def test_bad_task_overrides_are_one_line_errors_naming_the_key(override, message):
    with pytest.raises(ClrunError, match=message.replace(".", r"\.")) as error:
        make_method("method=cpg", "stream.n_tasks=2", override)
    assert "\n" not in str(error.value)


# ---- CPG's fine-grained and face recipe: best epochs, the pretrained task -------------------------------------------
def test_keep_best_restores_the_epoch_of_best_test_accuracy():
    method = make_method("method=cpg", "stream.n_tasks=1", "method.keep_best=true", "method.train.epochs=4")
    measured, states = [], []
    current = method.current_accuracy

    def recorded(task, split):
        measured.append(current(task, split))
        states.append(method._state())
        return measured[-1]

    method.current_accuracy = recorded
    task = method.stream.tasks[0]
    _, acc = method._train(task, method.cfg, [])
    assert len(measured) == 4 and acc == max(measured)
    best = states[measured.index(acc)]
    assert all(torch.equal(v, best[k]) for k, v in method._state().items())  # that epoch's network, restored
    assert current(task, task.test) == acc


def test_keep_best_in_a_pruning_step_counts_only_epochs_after_the_ramp():
    method = make_method(
        "method=cpg",
        "stream.n_tasks=1",
        "method.keep_best=true",
        "method.prune_train.epochs=3",
        "method.pruning_interval=2",
        "method.goals=0.0",
    )
    scripted = iter([0.9, 0.2, 0.3])  # epoch 1 scores best but is mid-ramp; the ramp ends with epoch 2
    method.current_accuracy = lambda task, split: next(scripted)
    task = method.stream.tasks[0]
    method.net.begin_task(1, picking=False)
    method.add_head(task)
    _, acc = method._prune_step(task, method.cfg, 0.0, 0.3, [])
    assert acc == 0.3


@pytest.mark.parametrize(
    "name, phases", [("cpg", ["prune 0->0.5"]), ("packnet", ["retrain after pruning 0.6"]), ("piggyback", [])]
)
def test_the_pretrained_first_task_is_not_trained(tmp_path, name, phases):
    """`train_first_task: false` (CPG's and Piggyback's ImageNet task): task 1 is the pretrained network with its
    classifier, as it is; CPG and PackNet then prune it."""
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None, num_classes=2).eval()
    torch.save(tv.state_dict(), tmp_path / "resnet18-2.pth")
    pretrained = [
        "backbone=resnet18",
        "backbone.stem=imagenet",
        f"backbone.pretrained={tmp_path / 'resnet18-2.pth'}",
        "backbone.imagenet_head=true",
        "backbone.width=1.0",
    ]
    overrides = [*TINY[:6], "stream.n_tasks=1", "stream.test_per_task=16"]
    if name == "packnet":
        overrides.append("method.retrain.epochs=1")
    if name == "cpg":
        overrides = [*TINY, "stream.n_tasks=1", "method.goals=0.0", "method.sparsities=[0.5]"]
    method = build_method(None, *overrides, f"method={name}", *pretrained, "method.train_first_task=false")[0]
    labels = []
    phase = method.train_phase
    method.train_phase = lambda task, cfg, label, **kw: (labels.append(label), phase(task, cfg, label, **kw))[1]
    task = method.stream.tasks[0]
    x = method.stream.prepare(task.test.x, train=False)
    with torch.no_grad():
        expected = tv(x)
    row = method.learn(task)
    assert labels == phases
    if name == "cpg":
        accuracy = (expected.argmax(1) == task.test.y).float().mean().item()
        assert row["train_phase_epochs"] == 0 and row["growths"] == 0 and row["sparsity"] == 0.5
        assert row["acc_before_prune"] == pytest.approx(accuracy)
    if name == "piggyback":
        method.net.eval()
        with torch.no_grad():
            torch.testing.assert_close(method.predict(x, 0), expected)
    with pytest.raises(ClrunError, match="method.train_first_task=false: task 1 must be a pretrained network"):
        build_method(None, *overrides, f"method={name}", "method.train_first_task=false")


@pytest.mark.parametrize("name", ["cpg", "packnet"])
def test_a_pretrained_task_without_training_images_keeps_every_weight(tmp_path, name):
    """CPG's ImageNet task when imagenet/train is absent: evaluated, not pruned (pruning would need to train)."""
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None, num_classes=2).state_dict(), tmp_path / "r18.pth")
    pretrained = ["backbone=resnet18", "backbone.stem=imagenet", f"backbone.pretrained={tmp_path / 'r18.pth'}"]
    overrides = [*TINY[:6], "stream.n_tasks=1", "backbone.imagenet_head=true", "backbone.width=1.0"]
    method = build_method(None, *overrides, *pretrained, f"method={name}", "method.train_first_task=false")[0]
    task = method.stream.tasks[0]
    empty = dataclasses.replace(task, train=Split(task.train.x[:0], task.train.y[:0]))
    method.train_phase = lambda *args, **kw: pytest.fail("nothing to train on")
    row = method.learn(empty)
    assert row["sparsity"] == 0.0
    assert int(method.net.owner_counts()[0]) == 0  # every weight is the pretrained task's


# ---- no forgetting --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cpg", "pae"])
def test_earlier_tasks_logits_are_bit_identical(name):
    method = make_method(f"method={name}", "stream.n_tasks=3", "method.goals=0.0")
    rows, first, last = learn_all(method)
    for j in range(3):
        assert torch.equal(first[j], last[j]), f"task {j}'s logits changed"
    # the stream really shared and pruned: each task pruned to 0.6 of its pool and later tasks owned weights
    assert [row["sparsity"] for row in rows] == [0.6, 0.6, 0.6]
    counts = method.net.owner_counts()
    assert all(counts[tag] > 0 for tag in (1, 2, 3))
    picks = [record["pick"] for record in method.net.records]
    if name == "cpg":
        assert picks[0] == {} and picks[1] and picks[2]  # task 1 picked among earlier weights
        assert all(row["retrain_phase_epochs"] >= 1 for row in rows[1:]) and rows[0]["retrain_phase_epochs"] == 0
        assert 0 <= rows[1]["picked_share"] <= 1
    else:
        assert all(p == {} for p in picks)  # PAE stores no picking masks
        assert all(row["retrain_phase_epochs"] == 0 for row in rows)
        assert [row["picked_share"] for row in rows[1:]] == [1.0, 1.0]


def test_picks_start_at_mask_init_all_on_and_threshold_binarises():
    method = make_method("method=cpg", "stream.n_tasks=2", "method.goals=0.0")
    method.learn(method.stream.tasks[0])
    net = method.net
    net.begin_task(2, picking=True, mask_init=0.01, threshold=0.005)
    layers = shared_layers(net.backbone).values()
    assert net.picks() and all((pick == 0.01).all() for pick in net.picks())
    for layer in layers:  # mask_init > threshold: every earlier weight is picked
        assert torch.equal(layer.effective_weight(), layer.weight * (layer.owner >= 1))
    for pick in net.picks():
        pick.data.fill_(0.005)  # at the threshold: not picked (picked means strictly above)
    for layer in layers:
        assert torch.equal(layer.effective_weight(), layer.weight * (layer.owner == 2))

    pae = make_method("method=pae", "stream.n_tasks=2", "method.goals=0.0")
    pae.learn(pae.stream.tasks[0])
    pae.net.begin_task(2, picking=pae.cfg.picking)
    assert pae.net.picks() == []


def test_retrain_pass_is_kept_only_when_an_epoch_beats_the_reset_masks():
    method = make_method(
        "method=cpg", "stream.n_tasks=2", "method.goals=0.0", "method.retrain.epochs=4", "method.retrain_patience=2"
    )
    method.learn(method.stream.tasks[0])
    task = method.stream.tasks[1]
    method._train(task, method.cfg, [])
    with torch.no_grad():
        for pick in method.net.picks():
            pick.uniform_(0.0, 0.02)  # picks learned in the training phase, different from mask_init
    before = method._state()

    def scripted(values):
        it = iter(values)
        method.current_accuracy = lambda task, split: next(it)

    scripted([0.5, 0.4, 0.45])  # reset baseline 0.5, then no epoch beats it: patience 2 stops after 2 epochs
    phase = []
    assert method._retrain(task, method.cfg, 0.7, phase) == (False, 0.7)
    assert sum(stats.epochs for stats in phase) == 2
    after = method._state()
    assert all(torch.equal(before[k], after[k]) for k in before)  # everything restored, picks included

    scripted([0.5, 0.6, 0.55, 0.58])  # epoch 1 beats the baseline; patience 2 ends after epoch 3
    phase = []
    assert method._retrain(task, method.cfg, 0.7, phase) == (True, 0.6)
    assert sum(stats.epochs for stats in phase) == 3
    assert not all(torch.equal(before[k], method._state()[k]) for k in before)


# ---- growth ---------------------------------------------------------------------------------------------------------
def test_unreachable_goal_grows_to_max_and_leaves_earlier_tasks_alone(tmp_path):
    goals = write_goals(tmp_path, {"1": "0.0", "2": "1.0", "3": 0.0})
    method = make_method("method=pae", "stream.n_tasks=3", f"method.goals={goals}")  # PAE: up to 2.0 by 0.5
    rows, first, last = learn_all(method)
    assert [row["growths"] for row in rows] == [0, 2, 0]
    assert [row["width_multiplier"] for row in rows] == [1.0, 2.0, 2.0]
    assert [record["multiplier"] for record in method.net.records] == [1.0, 2.0, 2.0]
    hidden = [layer.out_features for layer in shared_layers(method.net.backbone).values()]
    assert hidden == [round(100 * 2**0.5)] * 2  # channels scale by sqrt(multiplier)
    assert method.net.task_view(0).out_features == 100
    for j in range(3):
        assert torch.equal(first[j], last[j]), f"task {j}'s logits changed"
    # task 2 stayed below its goal at the maximum width: pruned anyway, to at least 1 - round(1/(1+1), 1) = 0.5
    assert rows[1]["least_sparsity"] == 0.5 and rows[1]["sparsity"] == 0.6 and rows[1]["prune_steps"] == 2
    assert rows[1]["goal"] == 1.0 and rows[1]["acc_before_prune"] < 1.0
    assert rows[1]["train_phase_epochs"] == 3  # trained at 1.0, 1.5 and 2.0
    # stored: one backbone at 2x parameters (the input layer is not widened: 3072 inputs) plus heads and biases
    assert 1.4 < method.footprint().params / method.footprint().base_params < 2.0


def test_first_task_regrows_from_scratch():
    method = make_method("method=cpg", "stream.n_tasks=1", "method.goals=1.0", "method.min_train_acc=0.9999")
    grow, seen = method._grow, []

    def checked(start, multiplier, first):
        grow(start, multiplier, first)
        old = next(iter(shared_layers(start.backbone).values())).weight
        new = next(iter(shared_layers(method.net.backbone).values())).weight
        seen.append((multiplier, first, new.shape[0], torch.equal(new[: old.shape[0]], old)))

    method._grow = checked
    row = method.learn(method.stream.tasks[0])
    assert seen == [(1.5, True, round(100 * 1.5**0.5), False)]  # a fresh network, not the old one copied in
    assert row["growths"] == 1 and row["width_multiplier"] == 1.5
    assert row["least_sparsity"] == 0.0 and row["sparsity"] == 0.0  # the last task keeps all its weights


# ---- goals ----------------------------------------------------------------------------------------------------------
def test_goals_from_number_json_and_run_folder(tmp_path):
    names = ["aquatic_mammals", "fish", "flowers"]
    assert load_goals(None, names) is None
    assert load_goals("0.8", names) == [0.8, 0.8, 0.8]
    cpg_format = write_goals(tmp_path, {"aquatic_mammals": "0.6580", "2": 0.7, "flowers": "0.5"})
    assert load_goals(str(cpg_format), names) == [0.658, 0.7, 0.5]

    run_dir = tmp_path / "scratch-run"
    run_dir.mkdir()
    rows = [
        {"train_task": i, "eval_task": j, "eval_task_name": names[j], "accuracy": 0.5 + 0.1 * i + 0.01 * j}
        for i in range(3)
        for j in range(i + 1)
    ]
    pd.DataFrame(rows).to_parquet(run_dir / results.ACCURACY_FILE)
    assert load_goals(str(run_dir), names) == pytest.approx([0.5, 0.61, 0.72])  # R[j, j]


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "neither a number"),
        ("{not json", "not a readable JSON"),
        ('["0.5"]', "expected a JSON object"),
        ('{"0": "0.5", "1": "0.5", "2": "0.5"}', "1-based"),
        ('{"1": "0.5", "2": "0.5"}', 'no goal for task 3 ("c")'),
        ('{"1": "0.5", "2": "65.8", "3": "0.5"}', "not a percentage"),
        ('{"1": "0.5", "2": "high", "3": "0.5"}', "not a number"),
    ],
)
def test_bad_goals_are_one_line_errors_naming_the_key(tmp_path, content, message):
    path = tmp_path / "goals.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ClrunError, match="method.goals") as error:
        load_goals(str(path), ["a", "b", "c"])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_goals_from_a_run_on_another_stream_or_too_short_are_refused(tmp_path):
    pd.DataFrame([{"train_task": 0, "eval_task": 0, "eval_task_name": "x", "accuracy": 0.9}]).to_parquet(
        tmp_path / results.ACCURACY_FILE
    )
    with pytest.raises(ClrunError, match="task 0 is x in that run but a here"):
        load_goals(str(tmp_path), ["a"])
    with pytest.raises(ClrunError, match="no accuracy for task 1"):
        load_goals(str(tmp_path), ["x", "y"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ClrunError, match="must hold accuracy.parquet"):
        load_goals(str(tmp_path / "empty"), ["x"])
    with pytest.raises(ClrunError, match="method.sparsities"):
        make_method("method=cpg", "method.sparsities=[0.6,0.3]")
    with pytest.raises(ClrunError, match="method.goals=2"):
        make_method("method=cpg", "method.goals=2")


# ---- end to end -----------------------------------------------------------------------------------------------------


def test_resume_with_grown_widths_gives_the_same_matrix_and_bwt_is_zero(tmp_path, monkeypatch):
    goals = write_goals(tmp_path, {"1": "0.0", "2": "1.0", "3": "0.0"})
    overrides = ["method=cpg", "stream.n_tasks=3", f"method.goals={goals}", "method.train.epochs=2"]
    summary, uninterrupted = run(tmp_path, *TINY, *overrides, name="full")
    assert summary["bwt"] == 0.0 and summary["forgetting"] == 0.0
    tasks = pd.read_parquet(uninterrupted / results.TASKS_FILE)
    assert list(tasks["width_multiplier"]) == [1.0, 1.5, 1.5]
    assert {"sparsity", "owned_share", "free_share", "picked_share", "goal", "growths"} <= set(tasks.columns)

    run_interrupted_then_resumed(tmp_path, *TINY, *overrides)
    np.testing.assert_array_equal(matrix(tmp_path / "resumed"), matrix(uninterrupted))
    resumed_tasks = pd.read_parquet(tmp_path / "resumed" / results.TASKS_FILE)
    assert list(resumed_tasks["sparsity"]) == list(tasks["sparsity"])


def test_pae_end_to_end_never_forgets(tmp_path):
    summary, run_dir = run(tmp_path, *TINY, "method=pae", "stream.n_tasks=3", "method.goals=0.0")
    R = matrix(run_dir)
    for j in range(3):
        assert (R[j:, j] == R[j, j]).all()
    assert summary["bwt"] == 0.0 and summary["forgetting"] == 0.0
