import json
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_STREAM, clrun, compose_config

from clrun import report, results, run


def write_run(root, method, seed, diagonal, final_row, acc, config="c0"):
    """A finished run folder with a 2-task matrix: R[0,0], R[1,1] = diagonal; R[1,:] = final_row."""
    run_id = f"{method}-{config}-s{seed}"
    labels = {
        "run_id": run_id,
        "method": method,
        "stream": "toy",
        "backbone": "mlp",
        "seed": seed,
        "config_id": f"{method}-{config}",
    }
    cells = [(0, 0, diagonal[0]), (1, 0, final_row[0]), (1, 1, diagonal[1])]
    accuracy = pd.DataFrame([{**labels, "train_task": i, "eval_task": j, "accuracy": a} for i, j, a in cells])
    summary = {
        **labels,
        "acc": acc,
        "bwt": final_row[0] - diagonal[0],
        "forgetting": diagonal[0] - final_row[0],
        "expansion": 1.0,
        "model_mb": 1.0,
        "wall_s": 2.0,
    }
    results.write_parquet(accuracy, root / run_id / results.ACCURACY_FILE)
    results.write_parquet(pd.DataFrame([summary]), root / run_id / results.SUMMARY_FILE)


@pytest.fixture
def runs(tmp_path):
    write_run(tmp_path, "scratch", 0, (0.80, 0.70), (0.80, 0.70), 0.75)
    write_run(tmp_path, "scratch", 1, (0.90, 0.60), (0.90, 0.60), 0.75)
    write_run(tmp_path, "finetune", 0, (0.80, 0.90), (0.50, 0.90), 0.70)
    write_run(tmp_path, "finetune", 1, (0.90, 0.70), (0.30, 0.70), 0.50)
    (tmp_path / "unfinished").mkdir()  # a run without summary.parquet is ignored
    return tmp_path


def test_transfer_against_scratch_of_same_seed(runs):
    summaries, accuracy = report.load_runs([runs])
    transfer = dict(zip(summaries["run_id"], report.transfer_vs_scratch(summaries, accuracy), strict=True))
    assert transfer["scratch-c0-s0"] == 0.0
    assert transfer["finetune-c0-s0"] == pytest.approx(((0.80 - 0.80) + (0.90 - 0.70)) / 2)
    assert transfer["finetune-c0-s1"] == pytest.approx(((0.90 - 0.90) + (0.70 - 0.60)) / 2)


def test_configs_are_not_averaged_together_and_scratch_duplicates_are_averaged(runs):
    # a second finetune config (say another lr) and a second scratch config with seed 0
    write_run(runs, "finetune", 0, (0.50, 0.50), (0.50, 0.50), 0.50, config="c1")
    write_run(runs, "scratch", 0, (0.60, 0.90), (0.60, 0.90), 0.75, config="c1")
    summaries, accuracy = report.load_runs([runs])
    summaries["transfer_vs_scratch"] = report.transfer_vs_scratch(summaries, accuracy)
    transfer = dict(zip(summaries["run_id"], summaries["transfer_vs_scratch"], strict=True))
    # seed-0 scratch reference: mean of (0.80, 0.60) = 0.70 and of (0.70, 0.90) = 0.80
    assert transfer["finetune-c1-s0"] == pytest.approx(((0.50 - 0.70) + (0.50 - 0.80)) / 2)
    table = report.aggregate(summaries).set_index("config_id")
    assert table.loc["finetune-c0", report.RUNS] == 2
    assert table.loc["finetune-c1", ("acc", "mean")] == pytest.approx(0.50)


def test_aggregate_over_seeds(runs):
    summaries, accuracy = report.load_runs([runs])
    summaries["transfer_vs_scratch"] = report.transfer_vs_scratch(summaries, accuracy)
    table = report.aggregate(summaries).set_index("config_id")
    assert table.loc["finetune-c0", ("acc", "mean")] == pytest.approx(0.60)
    assert table.loc["finetune-c0", ("acc", "std")] == pytest.approx(np.std([0.70, 0.50], ddof=1))
    assert table.loc["finetune-c0", report.RUNS] == 2
    assert table.loc["finetune-c0", ("transfer_vs_scratch", "mean")] == pytest.approx((0.10 + 0.05) / 2)


def test_command_prints_table_and_writes_parquet(runs, tmp_path, capsys):
    out = tmp_path / "all.parquet"
    report.main([str(runs), "--out", str(out)])
    printed = capsys.readouterr().out
    assert "finetune" in printed and "60.00±14.14" in printed and "toy (task scenario) / mlp" in printed
    assert len(pd.read_parquet(out)) == 4


def test_command_without_runs_fails_clearly(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        report.main([str(tmp_path)])
    assert info.value.code == 2
    assert "no finished runs" in capsys.readouterr().err


def test_exports_mark_the_best_value_of_each_metric(runs, tmp_path):
    md, tex, csv = tmp_path / "t.md", tmp_path / "t.tex", tmp_path / "t.csv"
    report.main([str(runs), "--markdown", str(md), "--latex", str(tex), "--csv", str(csv)])
    # scratch: ACC 75.00±0.00 and forgetting 0 (best: higher ACC, lower forgetting); finetune 60.00±14.14, 45.00
    lines = {line.split("|")[1].strip(): line for line in md.read_text().splitlines() if line.startswith("| ")}
    assert "**75.00±0.00**" in lines["ACC %"] and "| 60.00±14.14 " in lines["ACC %"]
    assert "**0.00±0.00**" in lines["forgetting %"] and "| 45.00±21.21 " in lines["forgetting %"]
    assert lines["ACC %"].index("60.00") < lines["ACC %"].index("75.00")  # columns: finetune, then scratch
    latex = tex.read_text()
    assert all(rule in latex for rule in (r"\toprule", r"\midrule", r"\bottomrule"))
    assert r"ACC \% & 60.00 $\pm$ 14.14 & \textbf{75.00 $\pm$ 0.00} \\" in latex
    table = pd.read_csv(csv).set_index("config_id")
    assert table.loc["finetune-c0", "acc_mean"] == pytest.approx(0.60)
    assert table.loc["scratch-c0", "runs_n"] == 2


def test_where_selects_runs_and_group_by_sets_the_groups(runs, tmp_path, capsys):
    csv = tmp_path / "t.csv"
    report.main([str(runs), "--where", "method=finetune", "--csv", str(csv)])
    assert list(pd.read_csv(csv)["method"]) == ["finetune"]
    report.main([str(runs), "--where", "seed=1", "--group-by", "method", "--csv", str(csv)])
    table = pd.read_csv(csv).set_index("method")
    assert list(table.columns[:1]) == ["acc_mean"] and table.loc["finetune", "acc_mean"] == pytest.approx(0.50)
    assert (table["runs_n"] == 1).all()
    report.main([str(runs), "--where", "method=finetune,method=scratch,seed=0", "--csv", str(csv)])
    assert sorted(pd.read_csv(csv)["method"]) == ["finetune", "scratch"]
    capsys.readouterr()
    for option, column in ((["--where", "metod=cpg"], "metod"), (["--group-by", "method,nope"], "nope")):
        with pytest.raises(SystemExit) as info:
            report.main([str(runs), *option])
        error = capsys.readouterr().err
        assert info.value.code == 2 and error.count("\n") == 1 and f"{option[0]}: no column '{column}'" in error


def test_run_curves_stay_distinct_at_many_tasks_with_the_legend_outside():
    assert len(set(results.colors(20))) == 20 and len(set(results.colors(30))) == 30
    fig = results.curves_figure(np.tril(np.full((25, 25), 0.5)), [f"t{j}" for j in range(25)], "run")
    fig.canvas.draw()
    (ax,) = fig.axes
    legend = ax.get_legend().get_window_extent()
    assert legend.x0 >= ax.get_window_extent().x1 and len(ax.get_legend().get_texts()) == 25
    assert len({tuple(line.get_color()) for line in ax.get_lines()}) == 25


# scratch and finetune on two configs of one stream (32 and 64 training images a task), 2 tasks each
TINY_TWO = [*TINY_STREAM, "stream.n_tasks=2", "stream.test_per_task=32"]
REPORT = [sys.executable, "-c", "from clrun.report import main; main()"]  # the `clrun-report` command


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("real")
    done = clrun(cwd, "-m", *TINY_TWO, "method=scratch,finetune", "stream.train_per_task=32,64")
    assert done.returncode == 0, done.stderr[-2000:]
    return cwd


def summary_of(cwd: Path, method: str, train_per_task: int) -> pd.Series:
    summaries = pd.concat(pd.read_parquet(p) for p in (cwd / "outputs" / "runs").glob("*/summary.parquet"))
    (row,) = (
        r for _, r in summaries.iterrows() if r["method"] == method and r["cfg.stream.train_per_task"] == train_per_task
    )
    return row


def test_summary_records_the_config_the_code_and_the_machine(real_runs):
    row = summary_of(real_runs, "finetune", 32)
    cfg = compose_config(*TINY_TWO, "method=finetune", "stream.train_per_task=32")
    assert row["cfg.method.train.lr"] == cfg.method.train.lr and row["cfg.method.train.optimizer"] == "adam"
    assert json.loads(row["cfg.stream.scale"]) == list(cfg.stream.scale) and row["cfg.hardware.threads"] == 1
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(run.__file__).parent, capture_output=True, text=True)
    assert row["git_commit"] == head.stdout.strip() and isinstance(row["git_dirty"], (bool, np.bool_))
    assert row["torch_version"] == torch.__version__ and row["device"] == "cpu" and row["device_name"]


def test_code_outside_a_git_checkout_records_no_commit(tmp_path, monkeypatch):
    monkeypatch.setattr(run, "__file__", str(tmp_path / "run.py"))
    assert {k: v for k, v in run.provenance(torch.device("cpu")).items() if k.startswith("git")} == {
        "git_commit": None,
        "git_dirty": None,
    }


def test_speed_keys_keep_the_run_folder_and_result_keys_move_it(real_runs, tmp_path):
    def name(*overrides):
        return run.run_name(compose_config(*TINY_TWO, "method=scratch", "stream.train_per_task=32", *overrides))

    base = name()
    assert name("hardware.threads=2", "hardware.compile=true", "hardware.compile_mode=max_autotune") == base
    assert name("hardware.precision=bf16") != base and name("method.train.lr=0.01") != base
    shutil.copytree(real_runs / "outputs", tmp_path / "outputs")  # the same run again, on 2 threads: reused
    done = clrun(tmp_path, *TINY_TWO, "method=scratch", "stream.train_per_task=32", "hardware.threads=2")
    assert done.returncode == 0 and "finished earlier, nothing to train" in done.stdout
    assert len(list((tmp_path / "outputs" / "runs").glob("scratch-*"))) == 2


def test_report_command_matches_scratch_on_the_whole_stream_config_and_draws_plots(real_runs, tmp_path):
    out, plots = tmp_path / "all.parquet", tmp_path / "plots"
    command = [*REPORT, "outputs/runs", "--out", str(out), "--plots", str(plots), "--tasks", "0,1"]
    done = subprocess.run(command, cwd=real_runs, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    runs = pd.read_parquet(out)
    assert (runs.loc[runs["method"] == "scratch", "transfer_vs_scratch"] == 0.0).all()
    diagonals = {}
    for m, n in [("scratch", 32), ("scratch", 64), ("finetune", 32)]:
        folder = real_runs / "outputs" / "runs" / summary_of(real_runs, m, n)["run_id"]
        diagonals[m, n] = np.diag(results.accuracy_matrix(pd.read_parquet(folder / "accuracy.parquet"), 2))
    assert not np.array_equal(diagonals["scratch", 32], diagonals["scratch", 64])  # averaging both would show
    finetune = runs[(runs["method"] == "finetune") & (runs["cfg.stream.train_per_task"] == 32)]
    expected = (diagonals["finetune", 32] - diagonals["scratch", 32]).mean()
    assert finetune["transfer_vs_scratch"].item() == pytest.approx(expected)
    for name in ("task_accuracy", "accuracy_vs_size", "accuracy_matrices"):
        image = matplotlib.image.imread(plots / f"{name}.png")
        assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0  # a drawn picture, not blank
        assert (plots / f"{name}.pdf").read_bytes().startswith(b"%PDF")
