"""`benchmarks/reproduce_table1.py` (`make reproduce-table1`): paper values, presets, the comparison, errors."""

import importlib.util
import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import SHARED_DATA, compose_config, needs_shared
from rich.console import Console

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CONF = Path(__file__).resolve().parents[1] / "conf"


def _load_script():
    spec = importlib.util.spec_from_file_location("reproduce_table1", BENCHMARKS / "reproduce_table1.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rt = _load_script()


# ---- the paper's values ----------------------------------------------------------------------------------------


def test_paper_tables_parse_and_rows_average_to_the_printed_avg():
    table1 = pd.read_csv(BENCHMARKS / "paper" / "cpg_table1.csv").set_index("method")
    table2 = pd.read_csv(BENCHMARKS / "paper" / "cpg_table2.csv").set_index("method")
    tasks = rt.task_columns(20)
    assert list(table1.index) == ["PackNet", "PAE", "CPG"]
    assert list(table2.index) == ["Scratch", "fine-Avg", "fine-Max", "CPG avg", "CPG max", "CPG top"]
    assert list(table1["avg"]) == [67.5, 77.1, 80.9]
    for table in (table1, table2):
        assert list(table.columns) == [*tasks, "avg", "exp", "red"]
        means = table[tasks].mean(axis=1)
        assert (means - table["avg"]).abs().max() < 0.05, means
    assert table1.loc["CPG", tasks].tolist() == table2.loc["CPG avg", tasks].tolist()  # the same row in both
    assert table1[["exp", "red"]].values.tolist() == [[1, 0], [2, 0], [1.5, 0.41]]
    assert table2.loc["Scratch", ["avg", "exp", "red"]].tolist() == [78.8, 20, 0]


def test_load_paper_takes_scratch_from_table2():
    paper = rt.load_paper()
    assert set(paper.index) == {"packnet", "pae", "cpg", "scratch"}
    assert paper.loc["scratch", "task1"] == 65.8
    assert paper.loc["cpg", "task20"] == 94.8


def test_paper_goal_files_hold_table2_fine_rows():
    table2 = pd.read_csv(BENCHMARKS / "paper" / "cpg_table2.csv").set_index("method")
    for method, row in (("cpg", "fine-Avg"), ("pae", "fine-Max")):
        goals = json.loads((BENCHMARKS / "paper" / rt.PAPER_GOALS[method]).read_text())
        assert [float(goals[str(i)]) * 100 for i in range(1, 21)] == pytest.approx(
            table2.loc[row, rt.task_columns(20)].tolist()
        )


# ---- presets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["full", "smoke"])
@pytest.mark.parametrize("method", ["scratch", "packnet", "pae", "cpg"])
def test_presets_compose(method, scale):
    if not (CONF / "method" / f"{method}.yaml").exists():
        pytest.skip(f"no method {method} yet")
    overrides = [f"experiment={rt.preset(method, scale)}"]
    if method in rt.GOAL_METHODS:
        overrides.append("method.goals=outputs/runs/scratch-x")
    cfg = compose_config(*overrides)
    assert (cfg.method.name, cfg.stream.name, cfg.backbone.name, cfg.hardware.name) == (
        method,
        "cifar100_20",
        "vgg16_bn",
        "auto",
    )
    assert cfg.method.train.epochs == (100 if scale == "full" else 2)
    assert cfg.stream.n_tasks == (20 if scale == "full" else 4)
    assert cfg.backbone.width == (1.0 if scale == "full" else 0.25)
    assert (cfg.backbone.init.value, cfg.stream.normalize.value) == ("cpg", "task")  # CPG's code's, every row
    assert cfg.hardware.precision.value == "fp32"  # the paper's numbers are fp32
    if method == "scratch":  # CPG's baseline recipe, not the scratch option's own Adam default
        assert (cfg.method.train.optimizer.value, cfg.method.train.lr, cfg.method.train.batch_size) == (
            "sgd",
            0.01,
            32 if scale == "full" else 16,
        )
    if method in rt.GOAL_METHODS:
        assert cfg.method.goals == "outputs/runs/scratch-x"
        assert cfg.method.max_multiplier == (2.0 if method == "pae" else 1.5)


# ---- measured rows and the comparison --------------------------------------------------------------------------


def _fake_run(folder: Path, method: str, final: list[float], summary_extra: dict, tasks_extra: dict | None = None):
    """A finished run folder: accuracy.parquet (the full lower triangle), summary.parquet, tasks.parquet."""
    folder.mkdir(parents=True)
    n = len(final)
    rows = [
        {
            "run_id": folder.name,
            "method": method,
            "train_task": i,
            "eval_task": j,
            "accuracy": final[j] + 0.01 * (n - 1 - i),
        }
        for i in range(n)
        for j in range(i + 1)
    ]
    pd.DataFrame(rows).to_parquet(folder / "accuracy.parquet")
    summary = {"run_id": folder.name, "method": method, "n_tasks": n, "expansion": 1.07, **summary_extra}
    pd.DataFrame([summary]).to_parquet(folder / "summary.parquet")
    tasks = [{"task": i, **(tasks_extra or {})} for i in range(n)]
    pd.DataFrame(tasks).to_parquet(folder / "tasks.parquet")
    return folder


def test_comparison_of_fake_runs_gives_the_differences(tmp_path):
    paper = rt.load_paper()
    tasks = rt.task_columns(3)
    ref = {m: paper.loc[m, tasks].to_numpy() / 100 for m in paper.index}
    runs = {
        # width_multiplier and redundancy in summary.parquet
        "cpg": _fake_run(
            tmp_path / "cpg", "cpg", list(ref["cpg"] + 0.02), {"width_multiplier": 1.5, "redundancy": 0.30}
        ),
        # only in tasks.parquet (the last task's row)
        "pae": _fake_run(
            tmp_path / "pae", "pae", list(ref["pae"] - 0.01), {"width_multiplier": 2.0, "redundancy": 0.1}
        ),
        # neither: expansion, and scratch's redundancy is 0
        "scratch": _fake_run(tmp_path / "scratch", "scratch", list(ref["scratch"]), {"expansion": 3.0}),
    }
    measured = {m: rt.measured_row(folder) for m, folder in runs.items()}
    assert measured["cpg"]["exp_source"] == "width_multiplier"
    assert measured["scratch"]["exp_source"] == "expansion"

    table = rt.compare(paper, measured).set_index(["method", "row"])
    assert list(table.index.get_level_values(0).unique()) == ["PAE", "CPG", "Scratch"]  # Table 1 order, Scratch last
    assert [c for c in table.columns if c.startswith("task")] == tasks
    diff = table.xs("diff", level="row")
    assert diff.loc["CPG", tasks].tolist() == pytest.approx([2.0] * 3)
    assert diff.loc["PAE", tasks].tolist() == pytest.approx([-1.0] * 3)
    assert diff.loc["Scratch", tasks].tolist() == pytest.approx([0.0] * 3, abs=1e-9)
    # Avg. over the tasks that ran: the paper's mean over tasks 1..3, not its printed 20-task Avg.
    assert table.loc[("CPG", "paper"), "avg"] == pytest.approx(paper.loc["cpg", tasks].mean())
    assert diff.loc["CPG", "avg"] == pytest.approx(2.0)
    assert (diff.loc["CPG", "exp"], diff.loc["CPG", "red"]) == pytest.approx((0.0, 0.30 - 0.41))
    assert (table.loc[("PAE", "measured"), "exp"], table.loc[("PAE", "measured"), "red"]) == (2.0, 0.1)
    assert (table.loc[("Scratch", "measured"), "exp"], table.loc[("Scratch", "measured"), "red"]) == (3.0, 0.0)
    assert diff.loc["Scratch", "exp"] == pytest.approx(3.0 - 20)

    console = Console(record=True, width=200)
    rt.print_comparison(console, rt.compare(paper, measured), "title")
    text = console.export_text()
    assert "+2.0" in text and "-1.0" in text and "-0.11" in text
    assert "Avg. over tasks 1..3 (the paper's printed Avg. is over 20 tasks)" in text


def test_full_twenty_tasks_use_the_printed_avg(tmp_path):
    paper = rt.load_paper()
    final = list(paper.loc["packnet", rt.task_columns(20)].to_numpy() / 100)
    measured = {"packnet": rt.measured_row(_fake_run(tmp_path / "p", "packnet", final, {"width_multiplier": 1.0}))}
    table = rt.compare(paper, measured).set_index("row")
    assert table.loc["paper", "avg"] == 67.5
    assert table.loc["diff", "avg"] == pytest.approx(67.48 - 67.5)


def test_unfinished_run_is_one_line_error(tmp_path):
    with pytest.raises(rt.ReproduceError, match="no finished run"):
        rt.measured_row(tmp_path)


# ---- data checks -----------------------------------------------------------------------------------------------


def test_missing_cifar100_fails_with_one_line(tmp_path, capsys, monkeypatch):
    launched = []
    monkeypatch.setattr(rt, "run_clrun", lambda *args: launched.append(args))
    code = rt.main(["--scale", "smoke", "--data-root", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("reproduce_table1: error: CIFAR-100 not found")
    assert str(tmp_path / "cifar-100-python" / "train") in err
    assert "data.root" in err and "CLRUN_DATA" in err and "DATA_ROOT" in err
    assert not launched  # refused before any job starts


def test_data_root_defaults_to_clrun_data(monkeypatch, tmp_path):
    monkeypatch.setenv("CLRUN_DATA", str(tmp_path))
    assert rt.default_data_root() == str(tmp_path)
    monkeypatch.delenv("CLRUN_DATA")
    assert rt.default_data_root() == "~/.cache/clrun/data"


# ---- end to end ------------------------------------------------------------------------------------------------


@pytest.mark.slow
@needs_shared("CIFAR-100-subset", "cifar-100-python")
def test_smoke_pipeline_end_to_end(tmp_path, capsys):
    """The whole pipeline at a tiny size: scratch, then the others with its goals; the table and CSV come out."""
    methods = [m for m in ("scratch", "packnet", "pae", "cpg") if (CONF / "method" / f"{m}.yaml").exists()]
    out = tmp_path / "table.csv"
    tiny = ["stream.n_tasks=2", "stream.train_per_task=8", "stream.test_per_task=8", "backbone.width=0.0625"]
    tiny.append("hardware.threads=1")  # tiny steps: a second thread only waits, and on a busy machine for long
    argv = ["--scale", "smoke", "--data-root", str(SHARED_DATA / "CIFAR-100-subset"), "--runs-dir", str(tmp_path)]
    code = rt.main([*argv, "--methods", *methods, "--out", str(out), *tiny])
    assert code == 0, capsys.readouterr().err
    table = pd.read_csv(out)
    labels = [rt.LABELS[m] for m in rt.METHODS if m in methods]
    assert table["method"].unique().tolist() == labels
    assert table["row"].tolist() == ["paper", "measured", "diff"] * len(labels)
    assert [c for c in table.columns if c.startswith("task")] == ["task1", "task2"]
    assert table[table["row"] == "measured"][["task1", "task2", "avg", "exp", "red"]].notna().all().all()
    assert set(table["precision"]) == {"fp32"}  # the presets' precision, recorded per run
    assert "measured in fp32" in " ".join(capsys.readouterr().out.split())
    folders = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.is_dir() and p.name != "sweeps")
    assert folders == sorted(methods)


# ---- many seeds ------------------------------------------------------------------------------------------------


def test_seeds_average_and_flag_the_paper_outside_two_std():
    paper = rt.load_paper()
    tasks = rt.task_columns(2)
    ref = paper.loc["cpg", tasks].to_numpy()
    base = {"exp": 1.5, "red": 0.41, "exp_source": "width_multiplier", "n_tasks": 2, "precision": "fp32"}
    rows = [  # task 1: 1.5 and 2.5 points above the paper (mean +2 > 2 std = 1.41); task 2: -1 and +1 (inside)
        {"task1": ref[0] + 1.5, "task2": ref[1] - 1, **base, "run_id": "s0"},
        {"task1": ref[0] + 2.5, "task2": ref[1] + 1, **base, "run_id": "s1"},
    ]
    row = rt.mean_row(rows)
    assert (row["task1"], row["std_task1"], row["seeds"], row["run_id"]) == pytest.approx(
        (ref[0] + 2, 0.5**0.5, 2, "s0+s1")
    )
    table = rt.compare(paper, {"cpg": row}).set_index("row")
    assert list(table.index) == ["paper", "measured", "std", "diff"]
    assert table.loc["diff", "outside"].split() == ["task1"]
    console = Console(record=True, width=200)
    rt.print_table(console, table.reset_index(), "title")
    assert "+2.0!" in console.export_text() and "+0.0!" not in console.export_text()
    assert "mean +- 2 std (2 seeds)" in rt.flag_note(table.reset_index())
    one = rt.compare(paper, {"cpg": rt.mean_row(rows[1:])}).set_index("row")  # one seed: the 2-point tolerance
    assert "std" not in one.index and one.loc["diff", "outside"].split() == ["task1"]


def test_seeds_run_as_one_multirun_per_method_and_goals_per_seed(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(rt, "run_clrun", lambda args, console: commands.append(args) or 0.0)
    folders, _ = rt.run_pipeline("smoke", tmp_path, [3, 4], tmp_path, [], rt.METHODS, "scratch", Console(quiet=True))
    assert [len(folders[m]) for m in rt.METHODS] == [2, 2, 2, 2]
    assert [c[:3] for c in commands[:2]] == [
        ["-m", "experiment=table1_smoke_scratch", "seed=3,4"],
        ["-m", "experiment=table1_smoke_packnet", "seed=3,4"],
    ]
    for seed, command, scratch in zip((3, 4), commands[2:], folders["scratch"], strict=True):  # pae + cpg per seed
        assert command[1:3] == ["experiment=table1_smoke_pae,table1_smoke_cpg", f"seed={seed}"]
        assert f"method.goals=choice('{scratch}')" in command
    assert len(commands) == 4
