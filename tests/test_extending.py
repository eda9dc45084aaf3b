"""A user's own method and dataset, from outside the package, run through the `clrun` command as README's
"Adding a method" and "Adding a dataset" describe: config files in their own config dir, code on PYTHONPATH."""

import os
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import clrun, run_tables
from fixtures import write_image

from clrun import results

TINY = [
    "hardware=cpu",
    "hardware.threads=1",
    "backbone=mlp",
    "backbone.width=0.25",
    "stream.n_tasks=2",
    "stream.train_per_task=64",
    "stream.test_per_task=32",
]

SMOOTH_METHOD = '''
"""Fine-tuning with label smoothing: a method of the user's, outside clrun."""

from dataclasses import dataclass

import torch.nn.functional as F

from clrun.config import FRACTION, checked
from clrun.methods import MethodConfig, SharedModelMethod


@dataclass
class SmoothConfig(MethodConfig):
    smoothing: float = checked(FRACTION, 0.1)  # label smoothing of the cross-entropy
    report_smoothing: bool = True  # a key with a default the YAML leaves out


class SmoothFinetune(SharedModelMethod):
    config_class = SmoothConfig

    def learn(self, task):
        head = self.model.add_head(task.n_classes)

        def loss(x, y, step):
            return F.cross_entropy(self.model(x, head), y, label_smoothing=self.cfg.smoothing)

        return self.fit(task, self.model, self.model.trainable(head), loss).row()

    def summary(self):
        return {"smoothing": self.cfg.smoothing} if self.cfg.report_smoothing else {}
'''

LETTERS_READER = '''
"""A dataset of the user's: images and labels in one .npz file."""

from pathlib import Path

import numpy as np


def read(root: str, train: bool, file: str):
    data = np.load(Path(root) / file)
    split = "train" if train else "test"
    return data[f"x_{split}"], data[f"y_{split}"]
'''

PHOTOS_READER = '''
"""A dataset of the user's: image files listed by a folder per class under photos/{train,test}/."""

from pathlib import Path

from clrun.data.image_files import ImageFiles, ImageList, class_folders


def read(root: str):
    base = Path(root) / "photos"
    splits = []
    for split in ("train", "test"):
        classes = class_folders(base / split, "photos/{train,test}/<class>/*.png", root)
        files = [(p, label) for label, name in enumerate(classes) for p in sorted((base / split / name).iterdir())]
        splits.append(ImageList(tuple(p for p, _ in files), tuple(label for _, label in files)))
    return ImageFiles(*splits, classes=tuple(classes))
'''


@pytest.fixture
def user(tmp_path) -> dict:
    """A user's folder: code under code/mylab, configs under conf/, data under data/; `run` calls clrun there."""
    code = tmp_path / "code" / "mylab"
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "smooth.py").write_text(SMOOTH_METHOD)
    (code / "letters.py").write_text(LETTERS_READER)
    (code / "photos.py").write_text(PHOTOS_READER)
    conf = tmp_path / "conf"
    (conf / "method").mkdir(parents=True)
    (conf / "method" / "smooth.yaml").write_text(
        textwrap.dedent("""\
            # smooth: fine-tuning with label smoothing (mylab)
            _target_: mylab.smooth.SmoothFinetune
            name: smooth
            smoothing: 0.2
            train:
              iterations: 10
            """)
    )
    (conf / "stream").mkdir()
    (conf / "stream" / "letters.yaml").write_text(
        textwrap.dedent("""\
            # letters: two tasks of two classes from mylab's reader
            defaults:
              - /stream_schema@_here_
              - _self_

            name: letters
            dataset:
              _target_: mylab.letters.read
              file: letters.npz  # under data.root
            n_tasks: 2
            classes_per_task: 2
            """)
    )
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    data.mkdir()
    labels = {split: np.arange(n) % 4 for split, n in (("train", 200), ("test", 80))}
    images = {
        split: (rng.integers(0, 60, (len(y), 12, 12)) + 60 * y[:, None, None]).astype(np.uint8)
        for split, y in labels.items()
    }
    np.savez(data / "letters.npz", **{f"x_{s}": images[s] for s in images}, **{f"y_{s}": labels[s] for s in labels})
    for split, n in (("train", 6), ("test", 2)):
        for k in range(4 * n):
            write_image(data / "photos" / split / f"c{k % 4}" / f"{k}.png", 60 * (k % 4))
    work = tmp_path / "work"  # an empty folder: the user's working directory
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(code.parent)}

    def run(*args: str):
        return clrun(work, "--config-dir", str(conf), f"data.root={data}", *args, env=env)

    return {"run": run, "work": work, "code": code}


def one_line_error(result) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("clrun: error: "), result.stderr
    return lines[0]


def finished_runs(work: Path) -> list[Path]:
    return sorted(p.parent for p in (work / "outputs" / "runs").rglob(results.SUMMARY_FILE))


def test_a_users_method_with_its_own_keys_runs_like_a_built_in_one(user):
    result = user["run"]("method=smooth", *TINY)
    assert result.returncode == 0, result.stderr
    (run_dir,) = finished_runs(user["work"])
    assert run_dir.name.startswith("smooth-synthetic-mlp-seed0-")
    summary = pd.read_parquet(run_dir / results.SUMMARY_FILE).iloc[0]
    assert summary["method"] == "smooth" and summary["smoothing"] == 0.2  # its own key, from its YAML
    tasks = pd.read_parquet(run_dir / results.TASKS_FILE)
    assert tasks["epochs"].tolist() == [10, 10]  # train.iterations=10 over 64 images: 10 epochs of one batch
    accuracy = pd.read_parquet(run_dir / results.ACCURACY_FILE)
    assert len(accuracy) == 3 and accuracy["accuracy"].between(0, 1).all()
    # command-line overrides of its own keys: one its YAML lists, and (with `+`) one only its dataclass has
    result = user["run"]("method=smooth", *TINY, "method.smoothing=0.0", "+method.report_smoothing=false")
    assert result.returncode == 0, result.stderr
    newest = max(finished_runs(user["work"]), key=lambda p: p.stat().st_mtime)
    assert "smoothing" not in pd.read_parquet(newest / results.SUMMARY_FILE)


@pytest.mark.parametrize(
    "override,message",
    [
        ("+method.smoothness=0.3", "method.smoothness"),  # not a key of SmoothConfig
        ("method.smoothing=1.5", "method.smoothing=1.5 is invalid: it must be in [0, 1)"),  # its own range rule
        ("method._target_=mylab.nowhere.Method", "ModuleNotFoundError: No module named 'mylab.nowhere'"),
        ("method._target_=mylab.smooth.Missing", "has no attribute 'Missing'"),
        ("method._target_=mylab.letters.read", "is not a subclass of clrun.methods.Method"),
    ],
)
def test_a_users_bad_method_config_is_one_line_naming_it(user, override, message):
    line = one_line_error(user["run"]("method=smooth", *TINY, override))
    assert message in line
    if "_target_" in override and "Method" not in message:
        assert "PYTHONPATH" in line
    assert not finished_runs(user["work"])


def test_a_users_dataset_reader_makes_a_stream(user):
    result = user["run"](
        "stream=letters", "method=finetune", *TINY, "stream.train_per_task=null", "stream.test_per_task=null"
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = finished_runs(user["work"])
    accuracy = pd.read_parquet(run_dir / results.ACCURACY_FILE)
    assert accuracy["n_samples"].tolist() == [40, 40, 40]  # 80 test images, 2 classes of 4 per task
    assert accuracy["eval_task_name"].tolist() == ["0-1", "0-1", "2-3"]
    tasks = pd.read_parquet(run_dir / results.TASKS_FILE)
    assert tasks["n_train"].tolist() == [100, 100]


def test_a_users_bad_dataset_is_one_line_naming_it(user):
    line = one_line_error(user["run"]("stream=letters", *TINY, "stream.dataset._target_=mylab.gone.read"))
    assert "stream.dataset._target_=mylab.gone.read" in line and "ModuleNotFoundError" in line and "PYTHONPATH" in line
    line = one_line_error(user["run"]("stream=letters", *TINY, "stream.dataset.file=missing.npz"))
    assert "stream.dataset._target_=mylab.letters.read failed: FileNotFoundError" in line
    line = one_line_error(user["run"](*TINY, "stream.dataset=svhn"))
    assert "stream.dataset=svhn is not a dataset" in line and "fashion_mnist" in line
    assert not finished_runs(user["work"])


def test_a_users_image_file_reader_goes_through_the_cache(user):
    photos = ["stream=synthetic", "stream.dataset={_target_:mylab.photos.read}", "stream.split=contiguous"]
    photos += ["stream.image_size=[12,16]", "stream.resize=stretch", "data.cache=cache", "method=finetune"]
    result = user["run"](*photos, *TINY)
    assert result.returncode == 0, result.stderr
    tasks, accuracy = run_tables(user["work"])
    assert tasks.n_train.tolist() == [12, 12] and accuracy.n_samples.tolist() == [4, 4, 4]
    (cached,) = (user["work"] / "cache").glob("synthetic-train-*/images.npy")
    assert np.load(cached).shape == (24, 3, 12, 16)
