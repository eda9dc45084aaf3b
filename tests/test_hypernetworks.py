"""hn and pah: hypernetworks that generate each task's network or head (clrun.methods.hn, clrun.methods.pah)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import SHARED_DATA, build_method, matrix, needs_shared, run, run_interrupted_then_resumed

from clrun.data.stream import Split
from clrun.errors import ClrunError
from clrun.methods.hn import HN
from clrun.methods.pah import PAH, distillation
from clrun.methods.parts.hypernet_reg import candidate_step
from clrun.models.hypernetwork import HyperNetwork
from clrun.results import count_params
from clrun.train import accuracy, make_optimizer

# three split-MNIST tasks of 300 training images, MLP 784 -> 100 -> 100
MNIST = [
    f"data.root={SHARED_DATA}",
    "stream=split_mnist",
    "stream.n_tasks=3",
    "stream.train_per_task=300",
    "stream.test_per_task=200",
    "backbone=mlp",
    "backbone.hidden=[100,100]",
    "hardware=cpu",
    "hardware.threads=1",  # tiny tensors: one thread is many times faster than two on a busy machine
]
HN_SMALL = ["method=hn", "method.chunk_size=10000"]  # 9 chunks of the 88,802 target weights
SYNTHETIC_CONVNET = [  # batch norm in the target network
    "stream=synthetic",
    "stream.n_tasks=2",
    "stream.train_per_task=64",
    "stream.test_per_task=32",
    "backbone=convnet",
    "backbone.width=0.25",
    "hardware=cpu",
    "hardware.threads=1",
]
needs_mnist = needs_shared("MNIST")


@pytest.fixture(autouse=True)
def restore_threads():
    """`hardware.threads=1` sets torch's global thread count; give the other test modules theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def task_accuracy(method, stream, task: int) -> float:
    return accuracy(lambda x: method.predict(x, task), stream.tasks[task].test, stream, method.hw, 1000)


@pytest.mark.parametrize(
    "optimizer, options",
    [
        (torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ],
)
def test_candidate_step_is_the_step_the_optimizer_then_takes(optimizer, options):
    param = torch.nn.Parameter(torch.randn(5))
    opt = optimizer([param], **options)
    for _ in range(3):  # the step depends on the optimizer's state (moments, momentum)
        param.grad = torch.randn(5)
        before = param.detach().clone()
        delta = candidate_step(opt, param)
        opt.step()
        torch.testing.assert_close(before + delta, param.detach(), rtol=1e-5, atol=1e-7)


def test_chunked_hypernetwork_makes_every_weight_chunk_by_chunk():
    shapes = {"a": torch.Size([3, 5]), "b": torch.Size([7])}
    hypernet = HyperNetwork(4, [6], shapes, chunk_size=4, chunk_embedding_dim=2)
    assert hypernet.chunk_embeddings.shape == (math.ceil(22 / 4), 2)
    embedding = torch.randn(4)
    flat = hypernet(embedding)
    assert flat.shape == (22,)
    third_chunk = hypernet.mlp(torch.cat([embedding, hypernet.chunk_embeddings[2]]))
    torch.testing.assert_close(flat[8:12], third_chunk)
    tensors = hypernet.split(flat)
    assert {name: t.shape for name, t in tensors.items()} == shapes
    assert torch.equal(tensors["b"], flat[15:])
    flat.sum().backward()
    assert hypernet.chunk_embeddings.grad.abs().sum(1).gt(0).all()  # every chunk embedding is trained


@needs_mnist
def test_hn_regulariser_keeps_earlier_networks_and_accuracy():
    drift, bwt, final = {}, {}, {}
    for beta in (0.01, 0.0):
        method, stream, _ = build_method(HN, *MNIST, *HN_SMALL, "method.train.iterations=150", f"method.beta={beta}")
        learned = []
        for task in stream.tasks:
            method.learn(task)
            learned.append(task_accuracy(method, stream, task.index))
            if task.index == 0:
                with torch.no_grad():
                    first = method.model.hypernet(method.model.embeddings[0])
        with torch.no_grad():
            drift[beta] = ((method.model.hypernet(method.model.embeddings[0]) - first).norm() / first.norm()).item()
        final[beta] = [task_accuracy(method, stream, j) for j in range(3)]
        bwt[beta] = np.mean([final[beta][j] - learned[j] for j in range(2)])
    assert min(final[0.01]) > 0.8  # chance: 0.5
    assert drift[0.01] < 0.05 and drift[0.0] > 0.15  # task 0's generated weights, relative change
    assert bwt[0.01] > -0.05 and bwt[0.0] < -0.15


def test_hn_keeps_batch_norm_statistics_per_task():
    method, stream, _ = build_method(
        HN, *SYNTHETIC_CONVNET, "method=hn", "method.chunk_size=2000", "method.train.iterations=4"
    )
    norms = [name for name, m in method.target.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(f"{name}.weight" in method.model.hypernet.shapes for name in norms)  # generated affine
    method.learn(stream.tasks[0])
    first = {name: b.clone() for name, b in method.buffers[0].items()}
    means = [name for name in first if name.endswith("running_mean")]
    assert means and all(first[name].abs().sum() > 0 for name in means)  # training updated task 0's statistics
    method.learn(stream.tasks[1])
    assert all(torch.equal(first[name], method.buffers[0][name]) for name in first)
    assert not torch.equal(first[means[0]], method.buffers[1][means[0]])
    assert method.footprint().params == count_params(method.model.hypernet) + 2 * method.cfg.embedding_dim


def test_hn_heads_target_generates_heads_on_a_trained_shared_backbone():
    overrides = ("method=hn", "method.target=heads", "method.chunk_size=0", "method.train.iterations=4")
    method, stream, _ = build_method(HN, *SYNTHETIC_CONVNET, *overrides)
    backbone = method.model.backbone
    d = backbone.out_features
    assert method.model.hypernet.shapes == {"weight": (2, d), "bias": (2,)}
    before = [p.detach().clone() for p in backbone.parameters()]
    for task in stream.tasks:
        method.learn(task)
    assert any(not torch.equal(b, p) for b, p in zip(before, backbone.parameters(), strict=True))
    footprint = method.footprint()
    assert footprint.params == count_params(backbone) + count_params(method.model.hypernet) + 2 * 96
    assert footprint.base_params == count_params(backbone) + (d + 1) * 2


@needs_mnist
def test_pah_learns_and_forgets_less_than_finetune(tmp_path):
    pah, _ = run(tmp_path, *MNIST, "method=pah", "method.train.iterations=150", name="pah")
    finetune, _ = run(tmp_path, *MNIST, "method=finetune", "method.train.iterations=150", name="finetune")
    assert pah["acc"] > 0.9 and pah["bwt"] > finetune["bwt"] + 0.01
    # stored: backbone, hypernetwork 200 -> 16 -> 16 -> 200 without biases, 3 tasks x 2 prototypes of 10 x 10
    backbone = 784 * 100 + 100 + 100 * 100 + 100
    assert pah["params"] == backbone + 200 * 16 + 16 * 16 + 16 * 200 + 3 * 200


def test_distillation_forms():
    students, teachers = [torch.randn(4, 3) for _ in range(2)], [torch.randn(4, 3) for _ in range(2)]
    t = 2.0

    def kl(p_logits, q_logits):  # KL(p || q) of temperature softmaxes, mean over the batch
        return F.kl_div(
            F.log_softmax(q_logits / t, 1), F.log_softmax(p_logits / t, 1), reduction="batchmean", log_target=True
        )

    paper = (kl(teachers[0], students[0]) + kl(teachers[1], students[1])) / 2
    code = (kl(students[0], teachers[0]) + kl(students[1], teachers[1])) * t**2
    torch.testing.assert_close(distillation(students, teachers, t, "paper"), paper)
    torch.testing.assert_close(distillation(students, teachers, t, "code"), code)


@needs_mnist
def test_pah_semantic_init_is_the_centre_crop_of_a_training_image_left_out(monkeypatch):
    method, stream, _ = build_method(PAH, *MNIST, "method=pah", "method.train.iterations=2", "method.val_fraction=0")
    seen = {}

    fit = method.trainer.fit

    def spy(module, recipe, params, loss, data, *args, **kwargs):
        seen["x"], seen["prototypes"] = data[0], method.model.prototypes[0].detach().clone()
        return fit(module, recipe, params, loss, data, *args, **kwargs)

    monkeypatch.setattr(method.trainer, "fit", spy)
    task = stream.tasks[0]
    method.learn(task)
    sources = method.sources[0]
    assert task.train.y[sources].tolist() == [0, 1]  # one image per class
    images = stream.prepare(task.train.x[sources], train=False)
    assert torch.equal(seen["prototypes"], images[:, :, 9:19, 9:19].mean(1, keepdim=True))  # 10 x 10 centre of 28
    keep = torch.ones(len(task.train), dtype=torch.bool)
    keep[sources] = False
    assert torch.equal(seen["x"], task.train.x[keep])


@needs_mnist
def test_pah_holds_out_a_tenth_of_the_training_images_as_the_released_code(monkeypatch):
    method, stream, _ = build_method(PAH, *MNIST, "method=pah", "method.train.iterations=2")
    seen = {}
    fit = method.trainer.fit

    def spy(module, recipe, params, loss, data, *args, **kwargs):
        seen["x"] = data[0]
        return fit(module, recipe, params, loss, data, *args, **kwargs)

    monkeypatch.setattr(method.trainer, "fit", spy)
    task = stream.tasks[0]
    torch.manual_seed(0)
    held = method._held_out(task)
    torch.manual_seed(0)
    row = method.learn(task)
    assert int(held.sum()) == 30 and not held[method.sources[0]].any()  # 10% of 300; prototypes from the rest
    trained = torch.ones(len(task.train), dtype=torch.bool)
    trained[held] = False
    trained[method.sources[0]] = False
    assert torch.equal(seen["x"], task.train.x[trained])  # neither held out nor a prototype's image
    val = Split(task.train.x[held], task.train.y[held])
    expected = accuracy(lambda x: method.predict(x, 0), val, stream, method.hw, 1000, 0)
    assert row["val_acc"] == expected


def test_pah_train_mode_eval_normalises_each_test_batch_by_its_own_statistics():
    """The released code never calls eval(): a test image's logits then depend on its batch, and test passes move
    the running statistics; in eval mode neither."""
    tiny = ["stream.train_per_task=64", "stream.test_per_task=32", "hardware=cpu", "backbone=convnet", "method=pah"]
    for code in (False, True):
        method, stream, _ = build_method(PAH, *tiny, "method.train.epochs=1", f"method.train_mode_eval={code}")
        method.learn(stream.tasks[0])
        x = stream.prepare(stream.tasks[0].test.x, train=False)
        bn = next(m for m in method.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm))
        before = bn.running_mean.clone()
        with torch.no_grad():
            whole, half = method.predict(x, 0), method.predict(x[:16], 0)
        assert torch.allclose(whole[:16], half, atol=1e-5) is not code
        assert torch.equal(bn.running_mean, before) is not code


@needs_mnist
def test_pah_prototype_step_moves_only_earlier_prototypes():
    method, stream, _ = build_method(PAH, *MNIST, "method=pah", "method.train.iterations=20")
    method.learn(stream.tasks[0])
    method._add_prototypes(stream.tasks[1], method._held_out(stream.tasks[1]))
    teacher = method._teacher(1)
    model = method.model
    with torch.no_grad():  # as after a main step: the student no longer matches the teacher
        for p in model.backbone.parameters():
            p.add_(0.05 * torch.randn_like(p))
    optimizer = make_optimizer(model.prototypes[:1], method._lr(method.cfg.prototype_lr), method.hw)
    fixed = [p.detach().clone() for p in [*model.backbone.parameters(), *model.hypernet.parameters()]]
    earlier, current = (p.detach().clone() for p in model.prototypes)
    method._prototype_step(1, teacher, optimizer)
    after = [*model.backbone.parameters(), *model.hypernet.parameters()]
    assert all(torch.equal(b, a) for b, a in zip(fixed, after, strict=True))
    assert torch.equal(current, model.prototypes[1]) and not torch.equal(earlier, model.prototypes[0])


@needs_mnist
@pytest.mark.parametrize("method", [HN_SMALL, ["method=pah"]], ids=["hn", "pah"])
def test_class_scenario_with_entropy_task_identification(tmp_path, method):
    with pytest.raises(ClrunError, match="task_id=confidence"):
        run(tmp_path, *MNIST, *method, "stream.scenario=class", name="no_task_id")
    overrides = ("stream.scenario=class", "method.task_id=entropy", "method.train.iterations=60")
    summary, _ = run(tmp_path, *MNIST, *method, *overrides)
    assert summary["task_id_acc"] > 0.4 and summary["acc"] > 0.4  # chance: 1/3 and 1/6


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param([*MNIST, "method=pah", "method.train.iterations=30"], marks=needs_mnist, id="pah"),
        pytest.param(
            [
                *SYNTHETIC_CONVNET,
                "stream.n_tasks=3",
                "method=hn",
                "method.chunk_size=2000",
                "method.train.iterations=4",
            ],
            id="hn-batch-norm",
        ),
    ],
)
def test_resume_after_task_2_equals_uninterrupted(tmp_path, overrides):
    _, straight = run(tmp_path, *overrides, name="straight")
    resumed = run_interrupted_then_resumed(tmp_path, *overrides, after_tasks=2)
    np.testing.assert_array_equal(matrix(straight), matrix(resumed))
    states = [torch.load(d / "checkpoints" / "last.pt", weights_only=True)["method"] for d in (straight, resumed)]
    assert states[0]["model"].keys() == states[1]["model"].keys()
    assert all(torch.equal(states[0]["model"][k], states[1]["model"][k]) for k in states[0]["model"])


def test_hn_generating_the_whole_network_refuses_a_pretrained_backbone():
    with pytest.raises(ClrunError, match="backbone.pretrained has no use"):
        build_method(HN, "hardware=cpu", "method=hn", "backbone=mlp", "backbone.pretrained=/some/weights.pt")
