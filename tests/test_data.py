import gzip
import logging
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
from conftest import SHARED_DATA, clrun, needs_shared, one_line_error, run_tables
from fixtures import CIFAR100_COARSE_OF_FINE, CIFAR100_FINE_NAMES, write_cifar10, write_cifar100, write_idx, write_mnist
from omegaconf import OmegaConf
from torch import nn

from clrun.config import DataConfig, Normalization, Scenario, SplitRule, StreamConfig
from clrun.data import batches, build_stream, iterate, prepare
from clrun.data.batches import InputView
from clrun.data.readers import read_cifar10, read_cifar100, read_cifar100_names, read_fashion_mnist, read_mnist
from clrun.data.synthetic import make_synthetic
from clrun.errors import ClrunError

# images per class in the official MNIST files
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def stream_cfg(**fields):
    return OmegaConf.structured(StreamConfig(**{"name": "test", **fields}))


def build(root, seed=0, **fields):
    data = OmegaConf.structured(DataConfig(root=str(root), cache=str(Path(root) / "cache")))
    return build_stream(stream_cfg(**fields), data, seed=seed, device="cpu")


# readers


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("read,folder", [(read_mnist, "MNIST"), (read_fashion_mnist, "FashionMNIST")])
def test_read_mnist(tmp_path, gz, read, folder):
    written = write_mnist(tmp_path, 30, 20, gz=gz, folder=folder)
    for train, split in ((True, "train"), (False, "test")):
        x, y = read(tmp_path, train)
        assert x.dtype == torch.uint8 and x.shape == (len(written[split][0]), 1, 28, 28)
        assert y.dtype == torch.int64
        assert np.array_equal(x[:, 0].numpy(), written[split][0])
        assert np.array_equal(y.numpy(), written[split][1])


def test_read_cifar10(tmp_path):
    written = write_cifar10(tmp_path, 7, 5)
    x, y = read_cifar10(tmp_path, True)
    assert x.shape == (35, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert np.array_equal(x.reshape(35, -1).numpy(), written["train"][0])
    assert np.array_equal(y.numpy(), written["train"][1])
    assert x[0, 1, 0, 0] == written["train"][0][0, 1024]  # rows are 1024 R, then 1024 G, then 1024 B
    x, y = read_cifar10(tmp_path, False)
    assert np.array_equal(x.reshape(5, -1).numpy(), written["test"][0])


def test_read_cifar100(tmp_path):
    written = write_cifar100(tmp_path, 120, 100)
    x, fine, coarse = read_cifar100(tmp_path, True)
    assert x.shape == (120, 3, 32, 32)
    data, fine_written, coarse_written = written["train"]
    assert np.array_equal(x.reshape(120, -1).numpy(), data)
    assert np.array_equal(fine.numpy(), fine_written) and np.array_equal(coarse.numpy(), coarse_written)
    fine_names, coarse_names = read_cifar100_names(tmp_path)
    assert fine_names == CIFAR100_FINE_NAMES and len(coarse_names) == 20 and coarse_names[0] == "aquatic_mammals"


def test_missing_file_names_path_and_remedies(tmp_path):
    message = one_line_error("not found", read_mnist, tmp_path, True)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in message
    assert "data.root=" in message and "data.download=true" in message
    message = one_line_error("not found", read_cifar10, tmp_path, False)
    assert str(tmp_path / "cifar-10-batches-py" / "test_batch") in message
    message = one_line_error("not found", read_cifar100_names, tmp_path)
    assert str(tmp_path / "cifar-100-python" / "meta") in message


def test_truncated_idx_file(tmp_path):
    write_mnist(tmp_path, 30, 20, gz=False)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    assert str(path) in one_line_error("truncated", read_mnist, tmp_path, True)


def test_truncated_gzip_file(tmp_path):
    write_mnist(tmp_path, 30, 20)
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    assert str(path) in one_line_error("cannot read", read_mnist, tmp_path, False)


def test_bad_magic(tmp_path):
    write_mnist(tmp_path, 30, 20)
    path = tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x03" + gzip.decompress(path.read_bytes())[4:]))
    assert str(path) in one_line_error("magic", read_mnist, tmp_path, True)


def test_wrong_mnist_dims_and_labels(tmp_path):
    write_mnist(tmp_path, 30, 20)
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw / "t10k-labels-idx1-ubyte", np.full(20, 10, np.uint8))
    assert "t10k-labels" in one_line_error("outside 0..9", read_mnist, tmp_path, False)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(19, np.uint8))
    assert "t10k-labels" in one_line_error("19 labels for 20 images", read_mnist, tmp_path, False)
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((30, 32, 32), np.uint8))
    assert "train-images" in one_line_error("expected 28x28", read_mnist, tmp_path, True)


def test_bad_cifar_pickles(tmp_path):
    write_cifar100(tmp_path, 120, 100)
    train = tmp_path / "cifar-100-python" / "train"
    train.write_bytes(train.read_bytes()[:5000])
    assert str(train) in one_line_error("not a readable CIFAR pickle", read_cifar100, tmp_path, True)

    test = tmp_path / "cifar-100-python" / "test"
    batch = {b"data": np.zeros((3, 3072), np.uint8), b"fine_labels": [0, 5, 100], b"coarse_labels": [0, 1, 2]}
    test.write_bytes(pickle.dumps(batch))
    assert str(test) in one_line_error("fine_labels outside 0..99", read_cifar100, tmp_path, False)

    write_cifar10(tmp_path, 7, 5)
    path = tmp_path / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(pickle.dumps({b"data": np.zeros((5, 3000), np.uint8), b"labels": [0] * 5}))
    assert str(path) in one_line_error("N x 3072", read_cifar10, tmp_path, False)


def test_partial_copy_warns(tmp_path, caplog):
    write_cifar10(tmp_path, 7, 5)
    with caplog.at_level(logging.WARNING, logger="clrun"):
        read_cifar10(tmp_path, True)
    assert "35 of the official 50000" in caplog.text and "partial copy" in caplog.text


def test_download_fetches_missing_files_with_torchvision(tmp_path, monkeypatch):
    calls = []

    def fake_mnist(root, download):
        calls.append((root, download))
        write_mnist(Path(root), 30, 20)

    monkeypatch.setattr(torchvision.datasets, "MNIST", fake_mnist)
    x, _ = read_mnist(tmp_path, True, download=True)
    assert calls == [(str(tmp_path), True)] and len(x) == 30
    read_mnist(tmp_path, True, download=True)  # present now: no second download
    assert len(calls) == 1


def test_download_failure_is_a_clrun_error(tmp_path, monkeypatch):
    def offline(root, download):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", offline)
    assert "no route to host" in one_line_error("could not download CIFAR-100", read_cifar100, tmp_path, True, True)


# streams


def test_cifar100_superclass_split(tmp_path):
    write_cifar100(tmp_path, 300, 200)
    stream = build(tmp_path, dataset="cifar100", split=SplitRule.superclass, n_tasks=20, classes_per_task=5)
    assert len(stream) == 20 and stream.input_shape == (3, 32, 32)
    assert stream.view.mean == (0.5071, 0.4865, 0.4409)
    names = [[CIFAR100_FINE_NAMES[c] for c in task.classes] for task in stream.tasks]
    assert names[0] == ["beaver", "dolphin", "otter", "seal", "whale"]
    assert names[19] == ["lawn_mower", "rocket", "streetcar", "tank", "tractor"]
    assert stream.tasks[0].name == "aquatic_mammals" and stream.tasks[19].name == "vehicles_2"
    assert sorted(c for task in stream.tasks for c in task.classes) == list(range(100))
    x_all, fine_all, _ = read_cifar100(tmp_path, True)
    for k, task in enumerate(stream.tasks):
        assert names[k] == sorted(names[k])
        assert (CIFAR100_COARSE_OF_FINE[task.classes] == k).all()
        keep = torch.isin(fine_all, torch.tensor(task.classes))
        assert torch.equal(task.train.x, x_all[keep])  # all of the task's images, in file order
        assert torch.equal(torch.tensor(task.classes)[task.train.y], fine_all[keep])  # local label i is classes[i]
    assert stream.tasks[0].train.y.unique().tolist() == [0, 1, 2, 3, 4]

    first = build(tmp_path, dataset="cifar100", split=SplitRule.superclass, n_tasks=3)
    assert [t.name for t in first.tasks] == ["aquatic_mammals", "fish", "flowers"]
    with pytest.raises(ClrunError, match="needs dataset cifar100"):
        build(tmp_path, dataset="synthetic", split=SplitRule.superclass)


@needs_shared("CIFAR-100-subset")
def test_cifar100_superclass_on_real_subset():
    root = SHARED_DATA / "CIFAR-100-subset"
    _, fine, coarse = read_cifar100(root, True)
    assert (torch.from_numpy(CIFAR100_COARSE_OF_FINE)[fine] == coarse).all()  # the fixture's table is the real one
    assert read_cifar100_names(root)[0] == CIFAR100_FINE_NAMES
    stream = build(root, dataset="cifar100", split=SplitRule.superclass, n_tasks=20)
    assert sum(len(t.train) for t in stream.tasks) == len(fine)


@needs_shared("MNIST", "raw")
def test_split_mnist_on_real_data(caplog):
    with caplog.at_level(logging.WARNING, logger="clrun"):
        stream = build(SHARED_DATA, dataset="mnist", n_tasks=5, classes_per_task=2)
    assert "partial" not in caplog.text
    assert len(stream) == 5 and stream.input_shape == (1, 28, 28)
    assert stream.view.mean == (0.1307,) and stream.view.std == (0.3081,)
    for k, task in enumerate(stream.tasks):
        assert task.classes == [2 * k, 2 * k + 1] and task.name == f"{2 * k}-{2 * k + 1}"
        assert task.train.x.dtype == torch.uint8 and task.train.y.dtype == torch.int64
        assert task.train.y.bincount().tolist() == MNIST_TRAIN_COUNTS[2 * k : 2 * k + 2]
        assert task.test.y.bincount().tolist() == MNIST_TEST_COUNTS[2 * k : 2 * k + 2]


def test_permutation_split(tmp_path):
    write_mnist(tmp_path, 50, 20)
    original, _ = read_mnist(tmp_path, True)
    position = torch.arange(28 * 28)
    original[0, 0], original[1, 0] = (position % 256).view(28, 28), (position // 256).view(28, 28)
    write_idx(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", original[:, 0].numpy())  # images 0, 1 tag pixels
    stream = build(tmp_path, dataset="mnist", split=SplitRule.permutation, n_tasks=3, split_seed=4)
    assert [t.name for t in stream.tasks] == ["perm0", "perm1", "perm2"]
    assert all(t.classes == list(range(10)) and len(t.train) == 50 for t in stream.tasks)
    task0, task1, task2 = (t.train.x.flatten(1) for t in stream.tasks)
    assert torch.equal(task0, original.flatten(1))
    assert not torch.equal(task1, task0) and not torch.equal(task1, task2)
    assert torch.equal(task1.sort(1).values, task0.sort(1).values)  # same pixels, moved
    source = task1[0].long() + 256 * task1[1].long()  # where each pixel of task 1 comes from
    assert sorted(source.tolist()) == list(range(28 * 28))
    assert torch.equal(task1, task0[:, source])  # one permutation for every image

    again = build(tmp_path, dataset="mnist", split=SplitRule.permutation, n_tasks=3, split_seed=4)
    other = build(tmp_path, dataset="mnist", split=SplitRule.permutation, n_tasks=3, split_seed=5)
    assert torch.equal(again.tasks[1].train.x, stream.tasks[1].train.x)
    assert not torch.equal(other.tasks[1].train.x, stream.tasks[1].train.x)
    assert torch.equal(stream.tasks[1].train.y, stream.tasks[0].train.y)


def test_rotation_split(tmp_path):
    write_mnist(tmp_path, 20, 10)
    stream = build(tmp_path, dataset="mnist", split=SplitRule.rotation, n_tasks=4, max_rotation=360.0)
    assert [t.name for t in stream.tasks] == ["rot0_0deg", "rot1_90deg", "rot2_180deg", "rot3_270deg"]
    base = stream.tasks[0].test.x
    for k, task in enumerate(stream.tasks):
        assert torch.equal(task.test.x, torch.rot90(base, k, (2, 3)))  # counter-clockwise by k * 90 degrees
    quarter = build(tmp_path, dataset="mnist", split=SplitRule.rotation, n_tasks=2, max_rotation=90.0)
    assert quarter.tasks[1].name == "rot1_45deg"


def test_random_split_depends_on_seed(tmp_path):
    write_mnist(tmp_path, 40, 20)
    orders = {}
    for seed in (0, 1, 2):
        stream = build(tmp_path, seed=seed, dataset="mnist", split=SplitRule.random, n_tasks=5, classes_per_task=2)
        orders[seed] = [c for t in stream.tasks for c in t.classes]
        assert sorted(orders[seed]) == list(range(10))
        assert all(task.name == "-".join(map(str, task.classes)) for task in stream.tasks)
    assert len({tuple(o) for o in orders.values()}) == 3
    pinned = build(tmp_path, seed=2, dataset="mnist", split=SplitRule.random, split_seed=0)
    assert [c for t in pinned.tasks for c in t.classes] == orders[0]


def test_random_split_labels_follow_classes(tmp_path):
    written = write_mnist(tmp_path, 40, 20)
    stream = build(tmp_path, seed=3, dataset="mnist", split=SplitRule.random, n_tasks=5, classes_per_task=2)
    images, labels = (torch.from_numpy(a) for a in written["train"])
    for task in stream.tasks:
        for i, c in enumerate(task.classes):
            assert torch.equal(task.train.x[task.train.y == i, 0], images[labels == c])


def test_per_task_subsets(tmp_path):
    write_mnist(tmp_path, 200, 100)
    full = build(tmp_path, dataset="mnist", n_tasks=5)
    small = build(tmp_path, dataset="mnist", n_tasks=5, train_per_task=15, test_per_task=7)
    again = build(tmp_path, dataset="mnist", n_tasks=5, train_per_task=15, test_per_task=7)
    other = build(tmp_path, seed=1, dataset="mnist", n_tasks=5, train_per_task=15, test_per_task=7)
    for task, whole in zip(small.tasks, full.tasks, strict=True):
        assert len(task.train) == 15 and len(task.test) == 7 and len(whole.train) == 40
        rows = {bytes(img.numpy()) for img in whole.train.x}
        assert all(bytes(img.numpy()) in rows for img in task.train.x)
    assert torch.equal(small.tasks[2].train.x, again.tasks[2].train.x)
    assert not torch.equal(small.tasks[2].train.x, other.tasks[2].train.x)


def test_too_many_classes_and_unknown_dataset(tmp_path):
    """An unknown dataset is refused in one line, naming the valid ones."""
    write_mnist(tmp_path, 20, 10)
    with pytest.raises(ClrunError, match="need 12 classes, mnist has 10"):
        build(tmp_path, dataset="mnist", n_tasks=6, classes_per_task=2)
    with pytest.raises(
        ClrunError, match="stream.dataset=svhn is not a dataset.*synthetic, mnist, fashion_mnist, cifar10"
    ):
        build(tmp_path, dataset="svhn")


def test_root_expands_home(tmp_path, monkeypatch):
    write_cifar10(tmp_path / "data", 4, 10)
    monkeypatch.setenv("HOME", str(tmp_path))
    stream = build("~/data", dataset="cifar10", n_tasks=5, augment=True)
    assert [t.name for t in stream.tasks] == ["0-1", "2-3", "4-5", "6-7", "8-9"]
    assert stream.view.augment and stream.view.std == (0.2470, 0.2435, 0.2616)
    assert sum(len(t.train) for t in stream.tasks) == 20


def test_synthetic_data():
    a = make_synthetic(4, 30, 10, seed=0)
    b = make_synthetic(4, 30, 10, seed=0)
    c = make_synthetic(4, 30, 10, seed=1)
    x_train, y_train, x_test, y_test = a
    assert x_train.shape == (120, 3, 32, 32) and x_test.shape == (40, 3, 32, 32) and x_train.dtype == torch.uint8
    assert y_train.bincount().tolist() == [30] * 4 and y_test.bincount().tolist() == [10] * 4
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])
    assert x_train.float().std() > 30  # not flat images


def test_synthetic_stream(tmp_path):
    stream = build(tmp_path, dataset="synthetic", n_tasks=3, classes_per_task=2)
    assert [t.name for t in stream.tasks] == ["0-1", "2-3", "4-5"]
    assert all(len(t.train) == 1000 and len(t.test) == 400 for t in stream.tasks)
    pixels = torch.cat([t.train.x for t in stream.tasks]).float() / 255
    assert torch.allclose(torch.tensor(stream.view.mean), pixels.mean((0, 2, 3)), atol=1e-4)
    assert torch.allclose(torch.tensor(stream.view.std), pixels.std((0, 2, 3)), atol=1e-4)
    odd = build(tmp_path, dataset="synthetic", n_tasks=2, classes_per_task=3, train_per_task=100, test_per_task=10)
    assert [(len(t.train), len(t.test)) for t in odd.tasks] == [(100, 10), (100, 10)]
    rotated = build(tmp_path, dataset="synthetic", split=SplitRule.rotation, n_tasks=2, classes_per_task=4)
    assert rotated.tasks[1].classes == [0, 1, 2, 3]


def test_synthetic_task_is_learnable_but_not_trivial():
    torch.manual_seed(0)
    x_train, y_train, x_test, y_test = make_synthetic(2, 500, 200, seed=0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 8 * 8, 2),
    )  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    for x, y in iterate((x_train, y_train), 32, shuffle=True):  # one epoch
        loss = nn.functional.cross_entropy(model(prepare(x, InputView(mean, std), train=False)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        accuracy = (model(prepare(x_test, InputView(mean, std), train=False)).argmax(1) == y_test).float().mean().item()
    assert 0.7 < accuracy < 0.99


# batches


def test_prepare_without_augmentation_is_normalisation():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    out = prepare(x, InputView((0.1, 0.2, 0.3), (0.5, 0.25, 2.0), augment=True), train=False)
    assert out.dtype == torch.float32 and out.shape == x.shape
    expected = (x.float() / 255 - torch.tensor([0.1, 0.2, 0.3])[:, None, None]) / torch.tensor([0.5, 0.25, 2.0])[
        :, None, None
    ]
    assert torch.allclose(out, expected, atol=1e-6)
    assert x.dtype == torch.uint8  # input untouched


def test_prepare_with_augmentation_crops_and_flips():
    x = torch.randint(1, 256, (128, 3, 12, 10), dtype=torch.uint8)  # no zeros: padding is recognisable
    torch.manual_seed(7)
    out = prepare(x, InputView((0.0,) * 3, (1.0,) * 3, augment=True), train=True)
    torch.manual_seed(7)
    assert torch.equal(out, prepare(x, InputView((0.0,) * 3, (1.0,) * 3, augment=True), train=True))
    assert out.shape == x.shape
    images = (out * 255).round().to(torch.uint8)
    padded = nn.functional.pad(x, (4, 4, 4, 4))
    seen = set()
    for i in range(len(x)):
        matches = [key for key, crop in crops_and_flips(padded[i], 12, 10).items() if torch.equal(images[i], crop)]
        assert len(matches) == 1, f"sample {i} is not one crop/flip of its padded original"
        seen.add(matches[0])
    assert [sorted({m[k] for m in seen}) for k in range(3)] == [list(range(9)), list(range(9)), [0, 1]]  # all offsets


def crops_and_flips(padded, h, w):
    """Every (dy, dx, flipped) window of an image padded by 4."""
    windows = {(dy, dx): padded[:, dy : dy + h, dx : dx + w] for dy in range(9) for dx in range(9)}
    return {(*key, flip): window.flip(2) if flip else window for key, window in windows.items() for flip in (0, 1)}


def test_iterate_covers_every_index_once():
    index = torch.arange(103)
    labels = index * 10
    batches = list(iterate((index, labels), 25, shuffle=True))
    assert [len(b[0]) for b in batches] == [25, 25, 25, 25, 3]
    seen = torch.cat([b[0] for b in batches])
    assert sorted(seen.tolist()) == list(range(103)) and not torch.equal(seen, index)
    assert all(torch.equal(i * 10, y) for i, y in batches)
    assert torch.equal(torch.cat([b[0] for b in iterate((index,), 25, shuffle=False)]), index)
    torch.manual_seed(3)
    first = torch.cat([b[0] for b in iterate((index,), 10, shuffle=True)])
    torch.manual_seed(3)
    assert torch.equal(first, torch.cat([b[0] for b in iterate((index,), 10, shuffle=True)]))


def test_fashion_mnist_is_not_read_from_mnist_files(tmp_path):
    write_mnist(tmp_path, 30, 20)  # MNIST/raw only
    message = one_line_error("Fashion-MNIST file not found", read_fashion_mnist, tmp_path, True)
    assert str(tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte") in message


@needs_shared("FashionMNIST-subset", "FashionMNIST", "raw")
def test_split_fashion_mnist_on_the_real_subset_through_the_cli(tmp_path):
    root = SHARED_DATA / "FashionMNIST-subset"
    result = clrun(
        tmp_path,
        "stream=split_fashion_mnist",
        "backbone=mlp",
        "hardware=cpu",
        "stream.n_tasks=2",
        "method.train.iterations=30",
        f"data.root={root}",
    )
    assert result.returncode == 0, result.stderr
    # the partial copy is announced to the user, not swallowed by the logging config
    output = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert "train-images-idx3-ubyte: 8226 of the official 60000 training images" in output
    (run_dir,) = (p.parent for p in (tmp_path / "outputs" / "runs").rglob("summary.parquet"))
    accuracy = pd.read_parquet(run_dir / "accuracy.parquet")
    assert accuracy["eval_task_name"].tolist() == ["0-1", "0-1", "2-3"]
    assert (accuracy["accuracy"] > 0.8).all()  # t-shirt vs trouser and pullover vs dress are easy
    log = " ".join((run_dir / "run.log").read_text().split())  # the warning and the run's messages, in order
    warning = log.index("8226 of the official 60000 training images")
    assert warning < log.index("task 1/2 (0-1) done in") < log.index("task 2/2 (2-3) done in") < log.index("results:")


def batches_of(batched) -> list[torch.Tensor]:
    """Each batch's tensors on the CPU, concatenated along the last dimension (flattened) for comparison."""
    return [torch.cat([t.cpu().flatten(1) if t.dim() > 1 else t.cpu()[:, None] for t in batch], 1) for batch in batched]


@pytest.mark.parametrize("shuffle", [False, True])
def test_chunks_of_a_memory_map_give_the_in_memory_batches(tmp_path, monkeypatch, shuffle):
    monkeypatch.setattr(batches, "CHUNK_BATCHES", 3)  # 103 rows in batches of 10: chunks of 30, the last partial
    images = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8, shape=(103, 3, 4, 4))
    images[:] = np.random.default_rng(0).integers(0, 256, images.shape)
    mapped, labels = torch.from_numpy(images), torch.arange(103)
    torch.manual_seed(5)
    expected = batches_of(iterate((mapped.clone(), labels), 10, shuffle))
    torch.manual_seed(5)
    order = torch.randperm(103) if shuffle else None
    chunked = batches_of(batches._chunked((mapped, labels), 10, order, torch.device("cpu")))
    assert [len(b) for b in chunked] == [10] * 10 + [3]
    assert all(torch.equal(got, want) for got, want in zip(chunked, expected, strict=True))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: host images copied to the device in chunks")
def test_host_images_reach_cuda_in_the_batches_of_device_resident_ones(monkeypatch):
    images, labels = torch.randint(0, 256, (1000, 3, 8, 8), dtype=torch.uint8), torch.arange(1000)
    torch.manual_seed(2)
    resident = batches_of(iterate((images.cuda(), labels.cuda()), 32, shuffle=True, device="cuda"))
    torch.manual_seed(2)
    streamed = batches_of(iterate((images, labels), 32, shuffle=True, device="cuda"))
    assert all(torch.equal(got, want) for got, want in zip(streamed, resident, strict=True))
    monkeypatch.setattr(batches, "_chunked", None)  # device-resident tensors named by `cuda` are not chunked
    assert len(list(iterate((images.cuda(), labels.cuda()), 32, shuffle=True, device="cuda"))) == 32


def test_label_permutation_split(tmp_path):
    write_mnist(tmp_path, 50, 20)
    stream = build(tmp_path, dataset="mnist", split=SplitRule.label_permutation, n_tasks=3, split_seed=4)
    first = stream.tasks[0]
    assert [t.name for t in stream.tasks] == ["labels0", "labels1", "labels2"] and first.classes == list(range(10))
    for task in stream.tasks:  # the same images; task k's label of digit d is the position of d in its classes
        assert sorted(task.classes) == list(range(10)) and torch.equal(task.train.x, first.train.x)
        for split, digits in ((task.train, first.train.y), (task.test, first.test.y)):
            assert torch.equal(split.y, torch.tensor([task.classes.index(d) for d in digits.tolist()]))
    assert len({tuple(t.classes) for t in stream.tasks}) == 3
    again = build(tmp_path, dataset="mnist", split=SplitRule.label_permutation, n_tasks=3, split_seed=4)
    assert [t.classes for t in again.tasks] == [t.classes for t in stream.tasks]


def test_label_permuted_mnist_through_the_cli(tmp_path):
    write_mnist(tmp_path / "data", 40, 20)
    tiny = ["stream.n_tasks=2", "method=finetune", "method.train.iterations=2", "hardware=cpu", "backbone=mlp"]
    done = clrun(tmp_path, "stream=label_permuted_mnist", f"data.root={tmp_path / 'data'}", *tiny)
    assert done.returncode == 0, done.stderr
    tasks, accuracy = run_tables(tmp_path)
    assert tasks.name.tolist() == ["labels0", "labels1"] and tasks.n_train.tolist() == [40, 40]
    assert set(accuracy.eval_mode) == {"task_agnostic"} and set(accuracy.n_samples) == {20}


def test_per_task_normalisation_uses_each_tasks_own_statistics(tmp_path):
    write_cifar100(tmp_path, 300, 200)
    fields = {"dataset": "cifar100", "split": SplitRule.superclass, "n_tasks": 3, "normalize": Normalization.task}
    stream = build(tmp_path, classes_per_task=5, **fields)
    assert len(stream.view.task_stats) == 3
    for task, (mean, std) in zip(stream.tasks, stream.view.task_stats, strict=True):
        pixels = task.train.x.double() / 255  # the task's training pixels, per channel
        assert mean == pytest.approx(pixels.mean((0, 2, 3)).tolist(), abs=1e-9)
        assert std == pytest.approx(pixels.std((0, 2, 3)).tolist(), abs=1e-9)
    assert stream.view.task_stats[0] != stream.view.task_stats[1]
    x = stream.tasks[1].test.x[:4]
    mean, std = (torch.tensor(v, dtype=torch.float32)[:, None, None] for v in stream.view.task_stats[1])
    torch.testing.assert_close(stream.prepare(x, train=False, task=1), (x.float() / 255 - mean) / std)
    mixed = torch.cat([stream.tasks[0].test.x[:2], x[:2]])  # per image: the first two of task 0, then task 1
    per_image = stream.prepare(mixed, train=False, task=torch.tensor([0, 0, 1, 1]))
    torch.testing.assert_close(per_image[2:], stream.prepare(x[:2], train=False, task=1))
    torch.testing.assert_close(per_image[:2], stream.prepare(mixed[:2], train=False, task=0))
    with pytest.raises(ClrunError, match="stream.normalize=task needs the task of every image"):
        stream.prepare(x, train=False)
    scenario = Scenario["class"]
    one_line_error("stream.normalize=task .* stream.scenario=task only", build, tmp_path, **fields, scenario=scenario)


def test_per_task_normalisation_through_the_cli(tmp_path):
    tiny = ["stream.normalize=task", "stream.n_tasks=2", "hardware=cpu", "backbone=mlp", "method.train.iterations=2"]
    done = clrun(tmp_path, "method=finetune", *tiny)
    assert done.returncode == 0, done.stderr
    refused = clrun(tmp_path, "method=joint", *tiny)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "stream.normalize=task needs the task of every image" in refused.stderr


@needs_shared("MNIST")
def test_the_official_mnist_passes_its_md5_and_an_altered_copy_is_warned_of_through_the_cli(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="clrun"):
        read_mnist(SHARED_DATA, True)
        read_mnist(SHARED_DATA, False)
    assert "MD5" not in caplog.text  # the genuine .gz files
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for source in (SHARED_DATA / "MNIST" / "raw").iterdir():
        content = gzip.decompress(source.read_bytes())
        if source.name.startswith("train-images"):
            images = np.frombuffer(content, np.uint8, offset=16).reshape(60000, 28, 28).copy()
            images[:500] = 255 - images[:500]  # 500 images inverted, the size unchanged
            content = content[:16] + images.tobytes()
        (raw / source.name.removesuffix(".gz")).write_bytes(content)  # uncompressed: the content's MD5 is checked
    args = ["stream=split_mnist", "backbone=mlp", "hardware=cpu", "stream.n_tasks=1", "stream.train_per_task=64"]
    done = clrun(tmp_path, *args, "method.train.iterations=2", f"data.root={tmp_path}")
    assert done.returncode == 0, done.stderr
    output = "".join((done.stdout + done.stderr).split())  # rich wraps long lines, paths included, anywhere
    assert "train-images-idx3-ubyte:MD5" in output and "thefilewasalteredordamaged" in output
    assert output.count("nottheofficialfile's") == 1  # the labels and the test files are genuine
