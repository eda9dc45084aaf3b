"""`benchmarks/scenarios_mnist.py` (`make scenarios-mnist`): van de Ven & Tolias's values and where each comes from."""

import sys
from pathlib import Path

import pandas as pd
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import scenarios_mnist as sm  # noqa: E402  (a script beside the package, not part of it)


def test_every_published_value_names_its_source():
    paper = pd.read_csv(sm.PAPER)
    assert list(paper.columns) == ["protocol", "scenario", "method", "acc", "sem", "source"]
    assert len(paper) == 48 and not paper.duplicated(["protocol", "scenario", "method"]).any()
    assert paper["source"].notna().all() and (paper["source"].str.strip() != "").all()
    table = {"split_mnist": "Table 3", "permuted_mnist": "Table 4"}
    assert all(row.source.startswith("arXiv:1809.10635") for row in paper.itertuples())
    assert all(row.source.endswith(table[row.protocol]) for row in paper.itertuples())
    point = paper.set_index(["protocol", "scenario", "method"])
    assert point.loc[("split_mnist", "task", "finetune"), ["acc", "sem"]].tolist() == [85.15, 1.00]
    assert point.loc[("permuted_mnist", "class", "online_ewc"), ["acc", "sem"]].tolist() == [33.88, 0.49]
    assert point.loc[("split_mnist", "class", "dgr_distill"), ["acc", "sem"]].tolist() == [91.84, 0.27]
    assert point.loc[("permuted_mnist", "task", "dgr"), ["acc", "sem"]].tolist() == [92.52, 0.08]


def test_collect_and_show_carry_the_source(tmp_path):
    run = tmp_path / "run0"
    run.mkdir()
    summary = {"stream": "split_mnist", "scenario": "task", "method": "si", "seed": 0, "n_tasks": 5, "acc": 0.99}
    pd.DataFrame([summary]).to_parquet(run / "summary.parquet")
    table = sm.collect(tmp_path)
    row = table.iloc[0]
    assert (row["published_acc"], row["published_sem"]) == (99.14, 0.11)
    assert row["published_source"].endswith("Table 3")
    console = Console(record=True, width=200)
    sm.show(table, console)
    text = console.export_text()
    assert "99.00 (99.14)" in text and "published: arXiv:1809.10635" in text and "Table 3" in text


def test_budgets_run_the_replay_methods_only_and_show_a_row_per_budget(tmp_path):
    assert [sm.replays(m) for m in ("er", "dark_er", "gem", "ewc", "finetune")] == [True, True, True, False, False]
    rows = [("er", 200, 0.80), ("er", 500, 0.90), ("finetune", None, 0.20)]
    for i, (method, budget, acc) in enumerate(rows):
        summary = {"stream": "split_mnist", "scenario": "class", "method": method, "replay_budget": budget, "acc": acc}
        (tmp_path / f"run{i}").mkdir()
        pd.DataFrame([summary]).to_parquet(tmp_path / f"run{i}" / "summary.parquet")
    console = Console(record=True, width=200)
    sm.show(sm.collect(tmp_path), console)
    lines = {line.split("│")[1].strip(): line for line in console.export_text().splitlines() if "│" in line}
    assert "80.00" in lines["er (memory 200)"] and "90.00" in lines["er (memory 500)"]
    assert "20.00" in lines["finetune"]
