"""`clrun eval RUN_FOLDER [KEY=VALUE ...]`: a finished run's final model evaluated again, through the CLI."""

import numpy as np
import pandas as pd
from conftest import SHARED_DATA, TINY_STREAM, clrun, matrix, needs_shared

SPLIT = ["stream=split_mnist", f"data.root={SHARED_DATA}", "backbone=mlp", "stream.n_tasks=2"]
TINY = [*TINY_STREAM[:2], *SPLIT, "stream.train_per_task=200", "stream.test_per_task=100", "method.train.epochs=1"]


@needs_shared("MNIST")
def test_eval_repeats_the_last_row_and_counts_every_test_image_in_the_confusion(tmp_path):
    assert clrun(tmp_path, *TINY, "stream.scenario=class", "hydra.run.dir=run").returncode == 0
    done = clrun(tmp_path, "eval", "run")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "run" / "eval" / "run-stream"
    rows = pd.read_parquet(out / "accuracy.parquet")
    np.testing.assert_array_equal(  # the final model again: the matrix's last row, bit for bit
        rows[rows["eval_mode"] == "task_agnostic"].sort_values("eval_task")["accuracy"], matrix(tmp_path / "run")[-1]
    )
    confusion = pd.read_parquet(out / "confusion.parquet")
    assert confusion.groupby("eval_task")["count"].sum().tolist() == [100, 100]  # every test image once
    assert set(confusion["true"]) == {0, 1, 2, 3}  # class scenario: the global labels
    per_class = pd.read_parquet(out / "per_class.parquet").set_index(["eval_task", "label"])
    right = confusion[confusion["true"] == confusion["predicted"]].set_index(["eval_task", "true"])["count"]
    totals = confusion.groupby(["eval_task", "true"])["count"].sum()
    np.testing.assert_allclose(per_class["accuracy"], (right / totals).dropna().to_numpy())

    more = clrun(tmp_path, "eval", "run", "stream.test_per_task=300", "--name", "more")  # another test set
    assert more.returncode == 0, more.stderr
    counts = pd.read_parquet(tmp_path / "run" / "eval" / "more" / "confusion.parquet").groupby("eval_task")["count"]
    assert counts.sum().tolist() == [300, 300]


@needs_shared("MNIST")
def test_eval_refuses_what_would_change_the_model_or_does_not_fit_it(tmp_path):
    assert clrun(tmp_path, *TINY, "hydra.run.dir=run").returncode == 0
    method = clrun(tmp_path, "eval", "run", "method.train.lr=0.5")
    assert method.returncode == 2 and "an evaluation may change only stream, data, hardware keys" in method.stderr
    longer = clrun(tmp_path, "eval", "run", "stream.n_tasks=3")
    assert longer.returncode == 2 and "the stream to evaluate has 3" in longer.stderr
    assert clrun(tmp_path, "eval", "nothing").stderr.startswith("clrun eval: error: nothing holds no clrun run")
