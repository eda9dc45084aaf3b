"""`clrun eval RUN_FOLDER [KEY=VALUE ...]`: a finished run's final model, evaluated again.

The run's config is composed from its `.hydra/overrides.yaml` plus the given overrides, which may change the
stream and where it is read from (`stream.*`, `data.*`, `hardware.*`, e.g. another compatible stream or more
test images), never the method, backbone or seed. The model of `checkpoints/last.pt` is evaluated on every task
and written to `<RUN_FOLDER>/eval/<name>/`: `accuracy.parquet` (the matrix's last row, as a run writes it),
`per_class.parquet` (accuracy per task and true label) and `confusion.parquet` (counts per task, true and
predicted label), from the headline prediction (task id given in the task scenario, not in the others).
"""

import argparse
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

from clrun import results
from clrun.errors import ClrunError
from clrun.run import CHECKPOINT, Run

CHANGEABLE = ("stream", "data", "hardware")  # the override keys an evaluation may change


def evaluate(run_dir: Path, overrides: list[str], name: str | None, compose: Callable, console: Console) -> Path:
    """Evaluate the final model of the run in `run_dir` under `overrides` (`compose`: `clrun.cli.compose`); return
    the folder of the results."""
    saved = run_dir / ".hydra" / "overrides.yaml"
    if not (run_dir / CHECKPOINT).is_file() or not saved.is_file():
        raise ClrunError(f"{run_dir} holds no clrun run ({CHECKPOINT} and .hydra/overrides.yaml); give a run folder")
    for override in overrides:
        key = override.lstrip("+~").split("=")[0]
        if key.split(".")[0].split("@")[0] not in CHANGEABLE:
            raise ClrunError(f"{override}: an evaluation may change only {', '.join(CHANGEABLE)} keys")
    name = name or ("run-stream" if not overrides else hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8])
    out = run_dir / "eval" / name
    run = Run(compose([*OmegaConf.load(saved), *overrides]), out, console)
    rows, confusion = run.evaluate_saved(run_dir / CHECKPOINT)
    confusion = pd.DataFrame(confusion)
    totals = confusion.groupby(["eval_task", "true"])["count"].transform("sum")
    right = confusion[confusion["true"] == confusion["predicted"]]
    per_class = right.assign(accuracy=right["count"] / totals[right.index]).rename(columns={"true": "label"})
    results.write_parquet(pd.DataFrame(rows), out / results.ACCURACY_FILE)
    results.write_parquet(confusion, out / "confusion.parquet")
    results.write_parquet(per_class.drop(columns=["predicted", "count"]), out / "per_class.parquet")
    results.atomic_write(out / "overrides.yaml", lambda tmp: OmegaConf.save(OmegaConf.create(overrides), tmp))
    view = Table("task", "mode", "accuracy %", title=f"{run_dir.name}: the final model on {run.cfg.stream.name}")
    for row in rows:
        view.add_row(str(row["eval_task_name"]), row["eval_mode"], f"{100 * row['accuracy']:.2f}")
    console.print(view)
    console.print(f"results: {out}")
    return out


def main(argv: list[str], compose: Callable) -> None:
    """`clrun eval ...` (`clrun.cli.main` hands over the arguments after `eval`, and its `compose`)."""
    parser = argparse.ArgumentParser(prog="clrun eval", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run folder (outputs/runs/<run>)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="stream, data or hardware keys to change")
    parser.add_argument("--name", help="the results' folder below <run_dir>/eval (default: from the overrides)")
    args = parser.parse_args(argv)
    try:
        evaluate(args.run_dir, args.overrides, args.name, compose, Console())
    except ClrunError as error:
        print(f"clrun eval: error: {' '.join(str(error).split())}", file=sys.stderr)
        sys.exit(2)
