"""`benchmarks/reproduce_table4.py` (`make reproduce-table4`): the Table 4 presets compose to the official face
recipe (cpg.md 3.3), the paper's table and goals, and the smoke pipeline on synthetic faces."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import compose_config

from clrun.config import with_changes

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce_table4 as r4  # noqa: E402  (scripts beside the package, not part of it)

# cpg.md 3.3 (FvGeEm_CPG_face.sh, FvGeEmAg{0-4}_CPG_face.sh): task -> (init lr, batch, acc_margin, prune lr)
RECIPE = {
    "face_verification": (1e-3, 256, 0.005, 5e-4),
    "gender": (5e-4, 128, 0.015, 5e-4),
    "emotion": (5e-4, 128, 0.005, 5e-4),
    "age0": (5e-4, 128, 0.010, 5e-4),
    "age1": (1e-3, 32, 0.005, 1e-4),
    "age2": (1e-3, 32, 0.010, 3e-5),
    "age3": (5e-4, 32, 0.005, 1e-5),
    "age4": (5e-4, 32, 0.005, 1e-4),
}
AFFECTNET = [74874, 134415, 25459, 14090, 6378, 3803, 24882]


def task_config(method, name: str, number: int):
    """The method config task `name` (1-based `number`) trains under: its task_overrides merged in, as
    WeightSharingMethod.task_cfg does."""
    overrides = method.task_overrides
    key = name if name in overrides else str(number)
    return with_changes(method, overrides[key], f"method.task_overrides.{key}") if key in overrides else method


@pytest.mark.parametrize("fold", range(5))
def test_cpg_presets_compose_to_the_official_face_recipe(fold):
    cfg = compose_config(*r4.fold_overrides("cpg", fold, "full"))
    tasks = ["face_verification", "gender", "emotion", f"age{fold}"]
    assert list(cfg.stream.dataset.tasks) == tasks and cfg.stream.n_tasks == 4
    assert (cfg.stream.name, cfg.backbone.name, cfg.backbone.init.value) == ("cpg_faces", "sphereface20", "cpg")
    assert cfg.stream.dataset.lfw_pairs == "face_data/lfw_pairs.txt" and cfg.hardware.precision.value == "fp32"
    method = cfg.method
    assert method.name == "cpg" and method.picking and not method.retrain_pass and method.min_train_acc is None
    assert method.goals == "benchmarks/paper/cpg_goals_faces.json"
    for number, name in enumerate(tasks, 1):
        task = task_config(method, name, number)
        lr, batch, margin, prune_lr = RECIPE[name]
        assert (task.train.lr, task.train.batch_size, task.acc_margin, task.prune_train.lr) == (
            lr,
            batch,
            margin,
            prune_lr,
        ), name
        assert task.prune_train.batch_size == batch  # the scripts pass --batch_size to the prune runs too
        assert (task.train.optimizer.value, task.train.nesterov, task.train.weight_decay) == ("sgd", True, 4e-5)
        assert task.train.epochs == 100 and task.train.schedule.value == "plateau" and task.keep_best
        assert (task.train.patience, task.train.max_decays, task.train.gamma) == (10, 3, 0.1)
        assert (task.mask_train.optimizer.value, task.mask_train.lr) == ("adam", 5e-4)
        assert task.mask_train.schedule.value == "plateau" and list(task.mask_train.gammas) == [0.2]
        assert task.prune_train.schedule.value == "constant"
        assert list(task.sparsities) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
        assert task.pruning_interval == 4
        first = name == "face_verification"
        assert (task.prune_train.epochs, task.pruning_frequency) == ((10, 1000) if first else (20, 100))
        assert task.class_counts == (AFFECTNET if name == "emotion" else None)


@pytest.mark.parametrize("method, start", [("scratch", "scratch"), ("finetune", "first")])
def test_baseline_presets(method, start):
    cfg = compose_config(*r4.fold_overrides(method, 3, "full"))
    assert cfg.method.name == "scratch" and cfg.method.start.value == start
    assert list(cfg.stream.dataset.tasks) == ["face_verification", "gender", "emotion", "age3"]
    train = cfg.method.train
    assert (train.optimizer.value, train.lr, train.batch_size, train.epochs, train.weight_decay) == (
        "sgd",
        1e-3,
        32,
        100,
        4e-5,
    )
    assert (train.schedule.value, train.patience, train.max_decays) == ("plateau", 10, 3)
    assert task_config(cfg.method, "gender", 2).train.lr == 1e-4  # baseline_face.sh
    assert task_config(cfg.method, "emotion", 3).train.lr == 1e-3


def test_paper_table_and_goals():
    paper = r4.load_paper()
    assert list(paper.index) == ["scratch", "finetune", "cpg"]
    assert paper.loc["cpg", "face"] == 99.300 and paper.loc["cpg", "face_std"] == 0.384  # slide/poster, not README
    assert paper.loc["scratch", "face"] == 99.417 and pd.isna(paper.loc["finetune", "face"])
    assert paper.loc["finetune", "age"] == 57.27 and paper.loc["cpg", "red"] == 0.003
    goals = json.loads((r4.t1.PAPER / "cpg_goals_faces.json").read_text())
    assert goals["face_verification"] == "0.9942" and goals["emotion"] == "0.6254"
    ages = [float(goals[f"age{k}"]) for k in range(5)]
    assert sum(ages) / 5 == pytest.approx(0.57274)  # cpg.md 1.5: the Finetune Age of Table 4


def test_folds_row_averages_the_age_folds():
    rows = [
        {**dict.fromkeys(r4.COLUMNS, 1.0), "age": 50.0, "run_id": "a", "precision": "fp32"},
        {**dict.fromkeys(r4.COLUMNS, 3.0), "age": 60.0, "run_id": "b", "precision": "bf16"},
    ]
    row = r4.folds_row(rows)
    assert row["age"] == 55.0 and row["face"] == 2.0 and row["folds"] == 2
    assert row["run_id"] == "a+b" and row["precision"] == "bf16,fp32"


def test_smoke_pipeline(tmp_path):
    out = tmp_path / "table4.csv"
    args = ["--scale", "smoke", "--folds", "1", "--methods", "finetune", "cpg", "--runs-dir", str(tmp_path / "runs")]
    assert r4.main([*args, "--out", str(out), "hardware=cpu", "hardware.threads=1"]) == 0
    table = pd.read_csv(out)
    assert list(table["method"].unique()) == ["Finetune", "CPG"]
    measured = table[table["row"] == "measured"].set_index("method")
    assert measured.loc["CPG", ["face", "gender", "expression", "age"]].between(0, 100).all()
    assert measured.loc["CPG", "face_std"] >= 0 and measured.loc["Finetune", "exp"] == 4
    assert (tmp_path / "runs" / r4.SMOKE_DATA / "face_data" / "lfw_pairs.txt").is_file()


def test_missing_data_is_one_line(tmp_path, capsys):
    assert r4.main(["--data-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]) == 2
    assert "face_data/face_verification/train is missing" in capsys.readouterr().err
