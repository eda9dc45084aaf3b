"""The trackers of conf/logger/ (clrun/trackers.py), each read back with the tool's own reader: pandas for the CSV
files, TensorBoard's EventAccumulator, MLflow's client, W&B's `wandb leet inspect` of the offline run's .wandb log."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_STREAM, clrun, matrix, run_interrupted_then_resumed

from clrun import results
from clrun.trackers import STATE_FILE

pytest.importorskip("tensorboard", reason="the trackers extra: pip install -e '.[trackers]'")
pytest.importorskip("wandb", reason="the trackers extra: pip install -e '.[trackers]'")
pytest.importorskip("mlflow", reason="the trackers extra: pip install -e '.[trackers]'")

from mlflow import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.slow
ALL = "logger=[csv,tensorboard,wandb,mlflow]"
WANDB = [sys.executable, "-m", "wandb"]


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run folder's offline W&B runs, oldest run first, read by wandb's own inspector."""
    records = []
    for log in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        out = subprocess.run([*WANDB, "leet", "inspect", "--json", str(log)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        records += [json.loads(line) for line in out.stdout.splitlines()]
    return records


def wandb_history(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(train_task or epoch, value) of `key` in the order it was logged."""
    items = [r["history"]["item"] for r in records if r["type"] == "history"]
    step = "train_task" if key.startswith("accuracy/") else "epoch"
    return [(item[step], item[key]) for item in items if key in item]


def tensorboard(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    return events.Reload()


def mlflow_run(tracking_uri: str, run_dir: Path):
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("clrun").experiment_id], f"tags.run_folder = '{run_dir}'")
    assert len(runs) == 1  # one tracker run per run folder, resumed or not
    return client, runs[0]


def test_each_tracker_gets_config_matrix_rows_epochs_summary_and_plots(tmp_path):
    out = clrun(tmp_path, *TINY_STREAM, "stream.n_tasks=2", "stream.train_per_task=32", ALL)
    assert out.returncode == 0, out.stderr
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    R = matrix(run_dir)
    summary = pd.read_parquet(run_dir / results.SUMMARY_FILE).iloc[0]
    n_epochs = 2 * 2  # finetune's default recipe: 2 epochs a task

    logs = run_dir / "logs"  # CSV, through pandas
    accuracy = pd.read_csv(logs / "accuracy.csv")
    assert list(accuracy.columns) == ["train_task", "task_0", "task_1", "mean"]
    np.testing.assert_allclose(accuracy[["task_0", "task_1"]].to_numpy(), R)
    epochs = pd.read_csv(logs / "epochs.csv")
    assert list(epochs["step"]) == list(range(n_epochs)) and (epochs["images_per_s"] > 0).all()
    hparams = pd.read_csv(logs / "hparams.csv").set_index("key")["value"]
    assert hparams["method.train.lr"] == "0.001" and hparams["stream.n_tasks"] == "2"
    assert pd.read_csv(logs / "summary.csv")["acc"].iloc[0] == pytest.approx(summary["acc"])

    events = tensorboard(run_dir)  # TensorBoard's event reader
    for j in range(2):
        logged = [(e.step, e.value) for e in events.Scalars(f"accuracy/task_{j}")]
        assert [s for s, _ in logged] == list(range(j, 2))
        np.testing.assert_allclose([v for _, v in logged], R[j:, j], rtol=1e-6)
    assert [e.step for e in events.Scalars("train/loss")] == list(range(n_epochs))
    assert events.Scalars("summary/acc")[0].value == pytest.approx(summary["acc"])
    assert {"plots/accuracy_matrix", "plots/accuracy_curves"} <= set(events.Tags()["images"])
    assert "config/text_summary" in events.Tags()["tensors"]
    assert "_hparams_/session_start_info" in events.PluginTagToContent("hparams")  # the HPARAMS dashboard

    client, mlrun = mlflow_run(f"sqlite:///{tmp_path}/mlruns/mlflow.db", run_dir)  # MLflow's client
    assert mlrun.data.params["method.train.lr"] == "0.001" and mlrun.info.status == "FINISHED"
    history = client.get_metric_history(mlrun.info.run_id, "accuracy/task_0")
    assert sorted((m.step, m.value) for m in history) == [(i, pytest.approx(R[i, 0])) for i in range(2)]
    assert len(client.get_metric_history(mlrun.info.run_id, "train/images_per_s")) == n_epochs
    assert mlrun.data.metrics["summary/acc"] == pytest.approx(summary["acc"])
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id, "plots")}
    assert artifacts == {"plots/accuracy_matrix.png", "plots/accuracy_curves.png"}
    assert list((tmp_path / "mlruns" / "clrun").glob("*/artifacts/plots/accuracy_matrix.png"))  # beside outputs/

    records = wandb_records(run_dir)  # W&B's offline transaction log
    config = {k: v for r in records if r["type"] == "config" for k, v in r["config"]["update"].items()}
    assert config["method.train.lr"] == 0.001
    assert wandb_history(records, "accuracy/task_1") == [(1, pytest.approx(R[1, 1]))]
    assert len(wandb_history(records, "train/loss")) == n_epochs
    summaries = {k: v for r in records if r["type"] == "summary" for k, v in r["summary"].get("update", {}).items()}
    assert summaries["summary/acc"] == pytest.approx(summary["acc"])
    plots = [r["history"]["item"] for r in records if r["type"] == "history" and "plots/accuracy_matrix" in str(r)]
    assert plots and (run_dir / "wandb").glob("offline-run-*/files/media/images/plots/accuracy_matrix_*.png")


def test_a_resumed_run_continues_each_tracker_run_and_logs_no_task_twice(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    run_dir = run_interrupted_then_resumed(
        tmp_path, *TINY_STREAM, "stream.train_per_task=32", ALL, f"logger.mlflow.tracking_uri={uri}"
    )
    R = matrix(run_dir)
    state = json.loads((run_dir / STATE_FILE).read_text())
    assert {name: state[name]["tasks"] for name in state} == {"csv": 3, "tensorboard": 3, "wandb": 3, "mlflow": 3}

    assert list(pd.read_csv(run_dir / "logs" / "accuracy.csv")["train_task"]) == [0, 1, 2]
    assert [e.step for e in tensorboard(run_dir).Scalars("accuracy/task_0")] == [0, 1, 2]
    client, mlrun = mlflow_run(uri, run_dir)
    assert mlrun.info.run_id == state["mlflow"]["run_id"]
    history = client.get_metric_history(mlrun.info.run_id, "accuracy/task_0")
    assert sorted((m.step, m.value) for m in history) == [(i, pytest.approx(R[i, 0])) for i in range(3)]
    logs = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(logs) == 2 and all(log.name == f"run-{state['wandb']['id']}.wandb" for log in logs)  # one W&B run
    assert wandb_history(wandb_records(run_dir), "accuracy/task_0") == [(i, pytest.approx(R[i, 0])) for i in range(3)]


def test_a_tracker_whose_package_is_missing_is_one_line_naming_the_extra(tmp_path):
    (tmp_path / "wandb.py").write_text("raise ImportError('not installed')\n")  # shadows the real package
    out = clrun(tmp_path, *TINY_STREAM, "logger=[csv,wandb]", env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 2
    assert out.stderr.strip() == "clrun: error: logger=wandb needs the wandb package: pip install -e '.[trackers]'"
    assert not (tmp_path / "outputs" / "runs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())
