"""`benchmarks/reproduce_pah.py` (`make reproduce-pah`): the comparison with PAH's table, the smoke pipeline."""

import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import SHARED_DATA, compose_config, needs_shared

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reproduce_pah as rp  # noqa: E402  (a script beside the package, not part of it)
import reproduce_table1 as t1  # noqa: E402


def test_compare_with_the_papers_table_and_flag_by_seeds():
    paper = pd.read_csv(t1.PAPER / "pah_table.csv").set_index("method")
    pah = t1.mean_row([{"acc": 70.0, "forg": 2.0, "run_id": "a"}, {"acc": 72.0, "forg": 2.5, "run_id": "b"}])
    si = t1.mean_row([{"acc": 60.0, "forg": 26.0, "run_id": "c"}])
    table = rp.compare(paper, {"pah": pah, "si": si}, "tiny").set_index("method")
    assert table.loc["PAH", ["paper_acc", "acc", "diff_acc", "paper_forg", "diff_forg"]].tolist() == pytest.approx(
        [63.65, 71.0, 7.35, 4.43, -2.18]
    )
    assert table.loc["PAH", "std_acc"] == pytest.approx(2**0.5) and table.loc["PAH", "seeds"] == 2
    # PAH: 7.35 and 2.18 points lie beyond 2 std (2.83, 0.35); SI (one seed): 15.04 beyond 2 points, 0.29 not
    assert table["outside"].tolist() == ["acc forg", "acc"]


@pytest.mark.parametrize("dataset", ["split_cifar100", "tiny_imagenet_10"])
def test_smoke_presets_keep_the_protocol_without_weights(dataset):
    full, smoke = (compose_config(f"experiment=pah_{s}{dataset}") for s in ("", "smoke_"))
    assert (full.backbone.pretrained, smoke.backbone.pretrained) == ("imagenet", None)
    assert smoke.backbone.stem.value == "imagenet" and smoke.method.kd.value == "code" and smoke.stream.n_tasks == 2
    assert smoke.stream.normalize == full.stream.normalize


@needs_shared("CIFAR-100-subset")
def test_smoke_pipeline_end_to_end(tmp_path, capsys):
    out = tmp_path / "pah.csv"
    argv = ["--scale", "smoke", "--data-root", str(SHARED_DATA / "CIFAR-100-subset"), "--runs-dir", str(tmp_path)]
    methods = ["--methods", "pah", "dark_er", "si"]
    assert rp.main([*argv, *methods, "--seeds", "2", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "mean +- 2 std (2 seeds)" in capsys.readouterr().out
    table = pd.read_csv(out)
    assert table["method"].tolist() == ["PAH", "DER (Dark Experience Replay)", "SI"]
    assert table["paper_acc"].tolist() == [74.46, 63.09, 63.58]
    assert table[["acc", "forg", "std_acc", "std_forg"]].notna().all().all() and table["seeds"].tolist() == [2, 2, 2]
    folders = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != "sweeps"]  # sweeps: the status tables
    runs = sorted(p.name.split("-")[0] + p.name.split("-seed")[1][0] for p in folders)
    assert runs == ["dark_er0", "dark_er1", "pah0", "pah1", "si0", "si1"]  # two seeds of each method
    budgets = {p.name.split("-")[0]: pd.read_parquet(p / "summary.parquet")["replay_budget"][0] for p in folders}
    assert budgets["dark_er"] == 200 and budgets["pah"] is None  # the table's buffer, for its buffer rows only


@needs_shared("CIFAR-100-subset")
def test_smoke_ablation_is_one_grid(tmp_path, capsys):
    out = tmp_path / "ablation.csv"
    argv = ["--scale", "smoke", "--data-root", str(SHARED_DATA / "CIFAR-100-subset"), "--runs-dir", str(tmp_path)]
    grid = ["--ablation", "--sizes", "5", "10", "--lambda-sm", "0.5"]
    assert rp.main([*argv, *grid, "--out", str(out)]) == 0, capsys.readouterr().err
    table = pd.read_csv(out)
    assert len(table) == 8 and len(list(tmp_path.glob("pah-*"))) == 8  # 2 sizes x 2 inits x L_sp on/off
    known = table.dropna(subset=["paper_acc"]).set_index(["prototype_size", "semantic_init"])
    assert known["paper_acc"].to_dict() == {(5, True): 73.72, (10, True): 74.46, (10, False): 72.54}
    assert set(known["lambda_sp"]) == {1.0}  # the poster's values are for the default lambdas
