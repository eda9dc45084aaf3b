"""`benchmarks/reproduce_table2.py` (`make reproduce-table2`): fine-Avg / fine-Max / top, goal files, the presets,
the smoke pipeline; and `benchmarks/reproduce_fig2.py` (`make reproduce-fig2`), which builds on its runs."""

import json
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import SHARED_DATA, compose_config, needs_shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce_fig2 as f2  # noqa: E402  (scripts beside the package, not part of it)
import reproduce_table2 as r2  # noqa: E402


def test_fine_rows_by_hand():
    rounds = [
        {"task1": 60.0, "task2": 80.0, "exp": 2.0, "run_id": "a", "precision": "fp32"},
        {"task1": 70.0, "task2": 70.0, "exp": 2.0, "run_id": "b", "precision": "fp32"},
        {"task1": 65.0, "task2": 90.0, "exp": 2.0, "run_id": "c", "precision": "fp32"},
    ]
    rows = r2.fine_rows(rounds, margin=0.5)
    assert (rows["fine_avg"]["task1"], rows["fine_avg"]["task2"]) == pytest.approx((65.0, 80.0))
    assert (rows["fine_max"]["task1"], rows["fine_max"]["task2"]) == (70.0, 90.0)
    assert (rows["top"]["task1"], rows["top"]["task2"]) == (70.5, 90.5)  # max(avg, max) + margin
    assert rows["fine_avg"]["avg"] == pytest.approx(72.5) and rows["fine_max"]["avg"] == 80.0
    assert rows["fine_max"]["run_id"] == "a+b+c" and rows["fine_max"]["n_tasks"] == 2


def test_goal_files_are_cpgs_format(tmp_path):
    path = r2.write_goals({"task1": 65.25, "task2": 80.0, "task10": 51.0, "avg": 1.0}, tmp_path / "g.json")
    assert json.loads(path.read_text()) == {"1": "0.6525", "2": "0.8000", "10": "0.5100"}
    cfg = compose_config("method=cpg", f"method.goals={path}", "stream=cifar100_20")
    assert cfg.method.goals == str(path)


@pytest.mark.parametrize("scale, epochs, tasks", [("full", 100, 20), ("smoke", 2, 4)])
def test_finetune_presets_compose_to_cpgs_script(scale, epochs, tasks):
    cfg = compose_config(f"experiment={r2.finetune_preset(scale)}")
    method = cfg.method
    assert (method.name, method.start.value, method.finetune_lr, method.train.lr) == (
        "scratch", "random_earlier", 5e-3, 1e-2,
    )  # fmt: skip
    assert (method.train.epochs, cfg.stream.n_tasks, cfg.backbone.init.value) == (epochs, tasks, "cpg")


def test_paper_rows():
    paper = r2.load_paper()
    assert list(paper.index) == list(r2.ROWS) and paper.loc["cpg_top", "avg"] == 81.7


@needs_shared("CIFAR-100-subset")
def test_smoke_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "table2.csv"
    tiny = ["stream.n_tasks=2", "stream.train_per_task=8", "stream.test_per_task=8", "backbone.width=0.0625"]
    argv = ["--scale", "smoke", "--data-root", str(SHARED_DATA / "CIFAR-100-subset"), "--runs-dir", str(tmp_path)]
    code = r2.main([*argv, "--rounds", "2", "--out", str(out), *tiny, "hardware.threads=1"])
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out)
    assert table["method"].unique().tolist() == [r2.LABELS[key] for key in r2.ROWS]
    measured = table[table["row"] == "measured"].set_index("method")
    assert measured[["task1", "task2", "avg"]].notna().all().all()
    fine = [
        p
        for p in tmp_path.iterdir()
        if p.name.startswith(("scratch-cifar100_20-vgg16_bn-seed1000-", "scratch-cifar100_20-vgg16_bn-seed2000-"))
    ]
    assert len(fine) == 2  # the two rounds
    sources = [pd.read_parquet(p / "tasks.parquet")["source_task"].tolist() for p in fine]
    assert all(s == [-1, 0] for s in sources)  # task 2 can only start from task 1
    (goals,) = tmp_path.glob("table2-goals-*")
    top = json.loads((goals / "top.json").read_text())
    assert float(top["1"]) == pytest.approx(measured.loc["fine-Max", "task1"] / 100 + 0.005, abs=1e-4)
    assert "measured in fp32" in " ".join(capsys.readouterr().out.split())

    # Fig. 2 on the same runs: only DEN is new
    png = tmp_path / "fig2.png"
    code = f2.main([*argv, "--rounds", "2", "--out", str(png), *tiny, "hardware.threads=1"])
    assert code == 0, capsys.readouterr().err
    fig = pd.read_csv(png.with_suffix(".csv"))
    assert set(fig["line"]) == {"DEN", "CPG", "Finetune Avg"} and fig["task"].unique().tolist() == [1]
    assert png.stat().st_size > 10_000 and len(list(tmp_path.glob("den-*"))) == 1
    flat = fig[fig["line"] == "Finetune Avg"]["accuracy"]
    assert flat.tolist() == pytest.approx([measured.loc["fine-Avg", "task1"]] * 2, abs=0.01)
    assert "paper about 1.09x" in capsys.readouterr().out


def test_fig2_lines_by_hand():
    den = [[70, 0, 0, 0, 0], [50, 80, 0, 0, 0], [30, 60, 90, 0, 0], [25, 40, 70, 75, 0], [20, 30, 60, 70, 81]]
    cpg = [[65, 0, 0, 0, 0], [65, 77, 0, 0, 0], [65, 77, 80, 0, 0], [65, 77, 80, 82, 0], [65, 77, 80, 82, 86]]
    frame = f2.lines(den, cpg, {"task1": 64.0, "task5": 85.0})
    assert sorted(frame["task"].unique()) == [1, 5]  # tasks 10 and 15 are past this 5-task stream
    task1 = frame[frame["task"] == 1].pivot(index="after_task", columns="line", values="accuracy")
    assert task1["DEN"].tolist() == [70, 50, 30, 25, 20] and task1["CPG"].tolist() == [65] * 5
    assert task1["Finetune Avg"].tolist() == [64.0] * 5
    task5 = frame[frame["task"] == 5]
    assert task5["after_task"].unique().tolist() == [5] and set(task5["accuracy"]) == {81, 86, 85.0}


def test_fig2_mean_over_seeds_by_hand():
    one = f2.lines([[60.0, 0], [50.0, 80.0]], [[65.0, 0], [65.0, 77.0]], {"task1": 64.0})
    two = f2.lines([[70.0, 0], [40.0, 70.0]], [[67.0, 0], [67.0, 75.0]], {"task1": 66.0})
    frame = f2.mean_over_seeds([one, two]).set_index(["line", "after_task"])
    assert frame.loc[("DEN", 1), "accuracy"] == 65.0 and frame.loc[("DEN", 2), "accuracy"] == 45.0
    assert frame.loc[("DEN", 1), "std"] == pytest.approx(50**0.5) and frame.loc[("Finetune Avg", 2), "accuracy"] == 65.0
    assert f2.mean_over_seeds([one])["std"].isna().all()  # one seed: no spread
