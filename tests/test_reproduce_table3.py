"""`benchmarks/reproduce_table3.py` (`make reproduce-table3`): the presets against CPG's official recipe, the
comparison, and the smoke pipeline."""

import json
import math
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import compose_config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce_table3 as r3  # noqa: E402  (a script beside the package, not part of it)


def test_paper_table_and_goals():
    paper = r3.load_paper()
    assert list(paper.index) == ["scratch", "finetune", "prognet", "packnet", "piggyback", "cpg"]
    assert paper.loc["cpg"].tolist() == [75.81, 83.59, 92.80, 96.62, 77.15, 80.33, 121.0]
    assert math.isnan(paper.loc["finetune", "task1"])
    goals = json.loads(r3.GOALS.read_text())
    assert list(goals) == list(r3.DATASETS)
    # the official README's goals are the paper's Finetune column (cpg.md §3.2), ImageNet's the pretrained 76.16
    assert [100 * float(v) for v in goals.values()] == pytest.approx([76.16, *paper.loc["finetune"].iloc[1:6]])


def test_cpg_preset_is_the_official_recipe():
    """cpg.md §3.2 (ivclab/CPG experiment2/CPG_imagenet.sh and CPG_imagenet_main.py)."""
    cfg = compose_config("experiment=table3_cpg")
    method, stream, backbone = cfg.method, cfg.stream, cfg.backbone
    assert (backbone.name, backbone.stem.value, backbone.pretrained, backbone.imagenet_head) == (
        "resnet50",
        "imagenet",
        "imagenet",
        True,
    )
    assert list(stream.dataset.datasets) == list(r3.DATASETS) and stream.normalize.value == "imagenet"
    assert (stream.image_size[0], stream.input_size[0], stream.crop.value, stream.cutout) == (256, 224, "resized", 16)
    assert not method.train_first_task and method.keep_best and method.min_train_acc is None
    assert (method.acc_margin, method.retrain_pass, method.max_multiplier, method.grow_step) == (0.005, False, 1.5, 0.5)
    train = method.train
    assert (train.epochs, train.batch_size, train.lr, train.optimizer.value, train.nesterov) == (
        300,
        32,
        1e-3,
        "sgd",
        True,
    )
    assert (train.weight_decay, train.schedule.value, train.patience, train.max_decays, train.gamma) == (
        4e-5,
        "plateau",
        5,
        3,
        0.1,
    )
    masks = method.mask_train
    assert (masks.optimizer.value, masks.lr, masks.schedule.value, list(masks.gammas)) == (
        "adam",
        1e-4,
        "plateau",
        [0.2],
    )
    prune = method.prune_train
    assert (prune.epochs, prune.lr, prune.schedule.value, method.pruning_frequency, method.pruning_interval) == (
        20,
        1e-3,
        "constant",
        50,
        4,
    )
    assert list(method.sparsities) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    imagenet = method.task_overrides.imagenet
    assert (imagenet.prune_train.epochs, imagenet.prune_train.lr, imagenet.pruning_frequency) == (10, 3e-4, 1000)
    assert method.task_overrides.stanford_cars_cropped.train.lr == 1e-2
    assert set(method.task_overrides) == {"imagenet", "stanford_cars_cropped"}  # the other tasks: 1e-3
    assert cfg.hardware.precision.value == "fp32"


@pytest.mark.parametrize("name", ["finetune", "scratch"])
def test_baseline_presets_are_the_official_baseline(name):
    """experiment2/baseline_imagenet.sh: packnet_imagenet_main.py, 100 epochs, plateau patience 10, per-task lr."""
    cfg = compose_config(f"experiment=table3_{name}")
    train = cfg.method.train
    assert (cfg.method.name, cfg.stream.n_tasks, list(cfg.stream.dataset.datasets)) == (
        "scratch",
        5,
        list(r3.DATASETS[1:]),
    )
    assert (train.epochs, train.lr, train.schedule.value, train.patience, train.weight_decay) == (
        100,
        1e-3,
        "plateau",
        10,
        4e-5,
    )
    assert cfg.method.task_overrides.stanford_cars_cropped.train.lr == 1e-2
    assert cfg.backbone.pretrained == ("imagenet" if name == "finetune" else None)


@pytest.mark.parametrize("method", r3.METHODS)
def test_smoke_presets_keep_the_full_recipe_but_its_scale(method):
    full, smoke = compose_config(f"experiment=table3_{method}"), compose_config(f"experiment=table3_smoke_{method}")
    assert smoke.method.name == full.method.name and smoke.backbone.name == full.backbone.name
    assert smoke.stream.n_tasks == (2 if method in r3.WITHOUT_IMAGENET else 3)
    assert smoke.method.get("train_first_task") == full.method.get("train_first_task")
    assert smoke.method.train.schedule == full.method.train.schedule


def test_baseline_rows_move_to_table3s_columns():
    row = {"task1": 50.0, "task2": 60.0, "std_task1": 1.0, "n_tasks": 2, "size_mb": 180.0, "run_id": "a"}
    scratch = r3.as_table3_row(row, "scratch", imagenet=33.3)
    assert (scratch["task1"], scratch["task2"], scratch["task3"], scratch["n_tasks"]) == (33.3, 50.0, 60.0, 3)
    assert scratch["std_task2"] == 1.0 and "std_task1" not in scratch and scratch["size_mb"] == 180.0
    assert math.isnan(r3.as_table3_row(row, "finetune", imagenet=33.3)["task1"])


def test_missing_data_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "imagenet").mkdir()
    assert r3.main(["--data-root", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'cubs_cropped'} not found" in err


@pytest.mark.slow
def test_smoke_pipeline_end_to_end(tmp_path, capsys):
    """CPG (ImageNet evaluated, pruned; CUBS and Cars trained, grown towards the paper's goals) and Scratch on the
    generated copy; the printed table is the paper's beside the measured."""
    out = tmp_path / "table3.csv"
    argv = ["--scale", "smoke", "--runs-dir", str(tmp_path), "--methods", "cpg", "scratch", "--out", str(out)]
    argv.append("method.train.epochs=1")  # CPG still grows once on CUBS; the suite's time (60 -> 45 s alone)
    assert r3.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "CPG Table 3" in printed and "ProgNet" in printed
    table = pd.read_csv(out)
    assert table["method"].unique().tolist() == ["Scratch", "CPG"]
    paper = table[table["row"] == "paper"].set_index("method")
    measured = table[table["row"] == "measured"].set_index("method")
    assert paper.loc["CPG", ["task1", "task2", "task3", "size_mb"]].tolist() == [75.81, 83.59, 92.80, 121.0]
    tasks = pd.read_parquet(next(tmp_path.glob("cpg-*")) / "tasks.parquet")
    assert tasks["train_phase_epochs"].iloc[0] == 0 and tasks["prune_steps"].iloc[0] == 1  # ImageNet: not trained
    # Scratch's ImageNet cell: the pretrained network as the CPG run measured it
    assert measured.loc["Scratch", "task1"] == pytest.approx(100 * tasks["acc_before_prune"].iloc[0], abs=1e-3)
    assert measured[["task1", "task2", "task3", "size_mb"]].notna().all().all()
