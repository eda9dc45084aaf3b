"""Accuracy goals of CPG and PAE (`method.goals`): the test accuracy each task must keep.

CPG grows the network while a task misses its goal and keeps the largest
sparsity whose accuracy still meets it. The goals come from one of:

- null: no external goal; each task's goal is its own accuracy after its training
  phase (no growth, pruning keeps the largest sparsity at no accuracy loss);
- a number in [0, 1], e.g. `0.8`: that goal for every task;
- a JSON file in CPG's `logs/*_acc.txt` format, `{"aquatic_mammals": "0.6580", ...}`:
  keys are task names (clrun's CIFAR-100 task names are CPG's superclass names) or
  1-based task numbers as strings (`"1"` is the first task, as CPG counts them);
  values are fractions in [0, 1], as strings or numbers. Every task needs a goal;
  a key "0" that names no task is refused (it would shift every goal by one task);
- an earlier clrun run folder (holding `accuracy.parquet`): the goal of task j is that
  run's R[j, j], its accuracy right after learning task j. A `scratch` run gives the
  "individual models" goals of CPG's Table 2; a `finetune` run gives fine-tuning goals.
  Its tasks must carry the same names as this stream's.
"""

import json
import math
from pathlib import Path

import pandas as pd

from clrun.errors import ClrunError
from clrun.results import ACCURACY_FILE, matrix_rows

KEY = "method.goals"


def load_goals(spec: str | None, names: list[str]) -> list[float] | None:
    """One goal per task (in stream order) from `spec`, or None when `spec` is null."""
    if spec is None:
        return None
    text = str(spec).strip()
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is not None:
        return [_check(value, f"{KEY}={text}")] * len(names)
    path = Path(text).expanduser()
    if path.is_dir():
        return _from_run(path, names)
    if path.is_file():
        return _from_json(path, names)
    raise ClrunError(f"{KEY}={text} is neither a number in [0, 1] nor an existing JSON goals file or clrun run folder")


def _check(value: float, where: str) -> float:
    if not (isinstance(value, float) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ClrunError(f"{where}: a goal must be an accuracy in [0, 1] (a fraction, not a percentage), not {value}")
    return value


def _from_json(path: Path, names: list[str]) -> list[float]:
    where = f"{KEY}={path}"
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ClrunError(f"{where}: not a readable JSON file ({error})") from None
    if not isinstance(data, dict):
        raise ClrunError(f'{where}: expected a JSON object {{"<task name or 1-based number>": "0.6580", ...}}')
    if "0" in data and "0" not in names:
        raise ClrunError(f'{where}: task numbers are 1-based as in CPG ("1" is the first task); found key "0"')
    goals = []
    for index, name in enumerate(names):
        key = name if name in data else str(index + 1)
        if key not in data:
            raise ClrunError(f'{where}: no goal for task {index + 1} ("{name}"); give it as "{name}" or "{index + 1}"')
        try:
            value = float(data[key])
        except (TypeError, ValueError):
            raise ClrunError(f'{where}: the goal of "{key}" is {data[key]!r}, not a number') from None
        goals.append(_check(value, f'{where}: "{key}"'))
    return goals


def _from_run(folder: Path, names: list[str]) -> list[float]:
    where = f"{KEY}={folder}"
    path = folder / ACCURACY_FILE
    if not path.is_file():
        raise ClrunError(f"{where}: a run folder must hold {ACCURACY_FILE} (a clrun run's results)")
    try:
        table = pd.read_parquet(path)
    except Exception as error:  # pyarrow raises several types for a damaged or foreign file
        raise ClrunError(f"{where}: cannot read {path.name} ({' '.join(str(error).split())})") from None
    table = matrix_rows(table)
    diagonal = table[table["train_task"] == table["eval_task"]].drop_duplicates("eval_task", keep="last")
    diagonal = diagonal.set_index("eval_task")
    goals = []
    for index, name in enumerate(names):
        if index not in diagonal.index:
            raise ClrunError(f"{where}: that run has no accuracy for task {index} ({name}); it learned fewer tasks")
        row = diagonal.loc[index]
        if row["eval_task_name"] != name:
            raise ClrunError(
                f"{where}: task {index} is {row['eval_task_name']} in that run but {name} here; "
                "use a run on this stream"
            )
        goals.append(_check(float(row["accuracy"]), f"{where}: task {index}"))
    return goals
