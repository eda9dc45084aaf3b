"""The CTrL streams (conf/stream/ctrl_*.yaml): each composes and loads from generated files in the official
formats; the composed-stream rules (per-class subsets, relabelling, backgrounds, S_long's stages)."""

import pytest
import torch
from conftest import clrun, compose_config, one_line_error
from fixtures import write_cifar10, write_cifar100, write_mnist

from clrun.data import build_stream

STREAMS = ["ctrl_minus", "ctrl_plus", "ctrl_in", "ctrl_out", "ctrl_pl", "ctrl_long"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_mnist(root, 200, 100)
    write_mnist(root, 200, 100, folder="FashionMNIST")
    write_cifar10(root, 40, 100)
    write_cifar100(root, 400, 200)
    return root


def load(root, *overrides):
    cfg = compose_config("hardware=cpu", f"data.root={root}", *overrides)
    return build_stream(cfg.stream, cfg.data, cfg.seed, "cpu"), cfg


@pytest.mark.parametrize("name", STREAMS)
def test_each_ctrl_stream_composes_and_loads(root, name):
    stream, cfg = load(root, f"stream={name}", *(["stream.n_tasks=30"] if name == "ctrl_long" else []))
    assert stream.input_shape == (3, 32, 32) and len(stream) == cfg.stream.n_tasks
    for task, entry in zip(stream.tasks, cfg.stream.tasks or [None] * len(stream), strict=True):
        assert task.train.x.shape[1:] == (3, 32, 32) and task.train.x.dtype == torch.uint8
        assert set(task.train.y.tolist()) == set(range(task.n_classes)) == set(task.test.y.tolist())
        if entry is not None:  # at most train_per_class of each class (the fixtures have 20 MNIST images a class)
            assert torch.bincount(task.train.y).max() <= entry.train_per_class


def test_ctrl_minus_repeats_the_first_tasks_classes_with_less_data_and_ctrl_out_rotates_the_labels(root):
    minus, _ = load(root, "stream=ctrl_minus", "stream.tasks.0.train_per_class=10", "stream.tasks.5.train_per_class=2")
    assert torch.bincount(minus.tasks[0].train.y).tolist() == [10] * 10
    assert torch.bincount(minus.tasks[5].train.y).tolist() == [2] * 10
    out, _ = load(root, "stream=ctrl_out")
    first, last = out.tasks[0].test, out.tasks[5].test
    assert torch.equal(first.x, last.x) and torch.equal(last.y, (first.y + 1) % 10)  # class 9 is label 0, ...


def test_ctrl_in_recolours_the_background_of_mnist(root):
    stream, _ = load(root, "stream=ctrl_in")
    red, green = stream.tasks[0].test.x.float(), stream.tasks[5].test.x.float()
    assert torch.equal(red[:, 0], torch.full_like(red[:, 0], 255))  # x + (255 - x) * 1 in the red channel
    assert torch.equal(green[:, 1], torch.full_like(green[:, 1], 255))
    assert torch.equal(red[:, 1], green[:, 0])  # the digits are the same images


def test_ctrl_long_draws_sizes_by_stage(root):
    stream, _ = load(
        root, "stream=ctrl_long", "stream.n_tasks=60", "stream.random_tasks.train_per_class=[[3],[3,2],[2]]"
    )
    sizes = [int(torch.bincount(task.train.y).max()) for task in stream.tasks]
    assert set(sizes[:20]) == {3} and set(sizes[20:40]) == {2, 3} and set(sizes[40:]) == {2}
    assert {task.name.rsplit("_", 1)[0] for task in stream.tasks} == {"mnist", "cifar10", "fashion_mnist", "cifar100"}
    assert all(task.n_classes == 5 for task in stream.tasks)
    again, _ = load(
        root, "stream=ctrl_long", "stream.n_tasks=60", "stream.random_tasks.train_per_class=[[3],[3,2],[2]]"
    )
    assert [t.name for t in again.tasks] == [t.name for t in stream.tasks]


def test_bad_task_entries_fail_in_one_line(root):
    one_line_error("stream.tasks.1.colour: not a task key", load, root, "stream=ctrl_pl", "+stream.tasks.1.colour=1")
    one_line_error("stream.tasks.0.dataset=svhn", load, root, "stream=ctrl_pl", "stream.tasks.0.dataset=svhn")
    one_line_error("lists 5 tasks", load, root, "stream=ctrl_pl", "stream.n_tasks=6")


def test_cli_runs_a_ctrl_stream(root, tmp_path):
    tiny = ["stream=ctrl_pl", f"data.root={root}", "hardware=cpu", "stream.n_tasks=2", "stream.test_per_task=20"]
    done = clrun(tmp_path, *tiny, "method=finetune", "backbone=mlp", "method.train.iterations=2")
    assert done.returncode == 0, done.stderr[-2000:]
