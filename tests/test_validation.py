"""Validation splits (`stream.val_fraction`) and Optuna searches on them (conf/hparams_search/), through the CLI."""

import shlex

import pandas as pd
import pytest
import torch
from conftest import TINY_STREAM, clrun, compose_config

from clrun import results
from clrun.data import build_stream
from clrun.run import identity

TINY = [*TINY_STREAM, "stream.n_tasks=2", "stream.train_per_task=48", "stream.test_per_task=16"]


def _stream(*overrides: str):
    cfg = compose_config(*TINY_STREAM, *overrides)
    return build_stream(cfg.stream, cfg.data, cfg.seed, "cpu")


def _images(split) -> list[bytes]:
    return sorted(bytes(image.numpy().tobytes()) for image in split.x)


def test_the_split_is_stratified_disjoint_from_training_and_seeded():
    plain = _stream()
    held = _stream("stream.val_fraction=0.25")
    for before, task in zip(plain.tasks, held.tasks, strict=True):
        assert before.val is None
        # the training images are split in two: nothing lost, nothing in both
        assert len(task.val) and len(task.train) + len(task.val) == len(before.train)
        assert sorted(_images(task.train) + _images(task.val)) == _images(before.train)
        assert not set(_images(task.train)) & set(_images(task.val))
        for label in before.train.y.unique():  # a quarter of each class, rounded
            n = int((before.train.y == label).sum())
            assert int((task.val.y == label).sum()) == int(0.25 * n + 0.5)
        assert _images(task.test) == _images(before.test)  # the test split as without validation
    again, other = _stream("stream.val_fraction=0.25"), _stream("stream.val_fraction=0.25", "seed=1")
    assert all(torch.equal(a.val.x, b.val.x) for a, b in zip(held.tasks, again.tasks, strict=True))
    assert not torch.equal(held.tasks[0].val.x, other.tasks[0].val.x)


def test_a_run_writes_its_validation_rows_and_val_acc(tmp_path):
    assert "val_fraction" not in identity(compose_config(*TINY))["stream"]  # runs without it keep their folders
    done = clrun(tmp_path, *TINY, "stream.val_fraction=0.25", "method.train.epochs=1")
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    val = pd.read_parquet(run_dir / results.VAL_ACCURACY_FILE)
    test = pd.read_parquet(run_dir / results.ACCURACY_FILE)
    tasks = pd.read_parquet(run_dir / results.TASKS_FILE)
    summary = pd.read_parquet(run_dir / results.SUMMARY_FILE).iloc[0]
    assert val[["train_task", "eval_task"]].values.tolist() == test[["train_task", "eval_task"]].values.tolist()
    assert (val["n_samples"] == 12).all() and (test["n_samples"] == 16).all()
    assert (tasks["n_train"] == 36).all()  # the held-out images are not trained on
    final = val[val["train_task"] == 1]["accuracy"].mean()
    assert summary["val_acc"] == pytest.approx(final)
    assert summary["acc"] == pytest.approx(test[test["train_task"] == 1]["accuracy"].mean())


def test_an_optuna_search_stores_its_study_resumes_it_and_prints_the_best_run(tmp_path):
    optuna = pytest.importorskip("optuna", reason="the optuna extra: pip install 'clrun[optuna]'")
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra: pip install 'clrun[optuna]'")
    search = ["-m", "hparams_search=ewc_lambda", *TINY, "method.train.epochs=1", "method.fisher_samples=8"]
    runs = tmp_path / "outputs" / "runs"
    counts = []
    for trials in (2, 1):  # the second search resumes the study
        done = clrun(tmp_path, *search, f"hydra.sweeper.n_trials={trials}")
        assert done.returncode == 0, done.stderr
        (study_name,) = optuna.get_all_study_summaries(f"sqlite:///{runs / 'optuna.db'}")
        study = optuna.load_study(study_name=study_name.study_name, storage=f"sqlite:///{runs / 'optuna.db'}")
        counts.append(len(study.trials))
    assert counts == [2, 3]
    summaries = pd.concat(pd.read_parquet(p) for p in runs.glob("ewc-*/summary.parquet"))
    # the objective is the validation accuracy, never the test accuracy
    assert sorted({t.value for t in study.trials}) == sorted(set(summaries["val_acc"]))
    assert study.best_value == summaries["val_acc"].max()
    command = done.stdout.strip().splitlines()[-1]
    assert command.startswith("clrun hparams_search=ewc_lambda ") and "n_trials" not in command
    assert f"method.ewc_lambda={study.best_params['method.ewc_lambda']}" in command
    best = clrun(tmp_path, *shlex.split(command)[1:])  # the best trial's run, found finished
    printed = "".join(best.stdout.split())
    assert best.returncode == 0 and "finishedearlier,nothingtotrain" in printed
    (run_dir,) = (p for p in runs.glob("ewc-*") if p.name in printed)
    assert pd.read_parquet(run_dir / results.SUMMARY_FILE)["val_acc"][0] == study.best_value
