import numpy as np
import pandas as pd
import pytest

from clrun import report, results


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
    assert table.loc["finetune-c0", ("seeds", "n")] == 2
    assert table.loc["finetune-c1", ("acc", "mean")] == pytest.approx(0.50)


def test_aggregate_over_seeds(runs):
    summaries, accuracy = report.load_runs([runs])
    summaries["transfer_vs_scratch"] = report.transfer_vs_scratch(summaries, accuracy)
    table = report.aggregate(summaries).set_index("config_id")
    assert table.loc["finetune-c0", ("acc", "mean")] == pytest.approx(0.60)
    assert table.loc["finetune-c0", ("acc", "std")] == pytest.approx(np.std([0.70, 0.50], ddof=1))
    assert table.loc["finetune-c0", ("seeds", "n")] == 2
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
