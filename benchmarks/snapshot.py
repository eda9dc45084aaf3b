"""Behaviour snapshot: what every method computes and composes, to check that a refactoring changes nothing.

`record` writes one JSON with
- `cli_cfg`: the output of `clrun --cfg job method=<m>` for every method option,
- `composed`: the composed config of every method under every experiment preset (and under none),
- `runs`: tiny CPU runs (3 synthetic tasks, MLP at a quarter width, 8 iterations, one thread) of every method in
  each scenario, also with `method.task_id=entropy` where the method has that key: the accuracy rows
  (the whole matrix, bit for bit), the per-task table and the summary without timings, and the tables' columns;
  a run that is refused records its one-line error instead,
- `table1_smoke`: the accuracy matrices of `reproduce_table1.py --scale smoke` on the CIFAR-100 subset.
`compare` prints every difference between two such files and exits 1 if there is one.

    python benchmarks/snapshot.py record OUT.json [--data-root ../shared/data] [--jobs 2]
    python benchmarks/snapshot.py compare BEFORE.json AFTER.json
"""

import argparse
import json
import math
import multiprocessing
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = [
    "hardware=cpu",
    "hardware.threads=1",
    "backbone=mlp",
    "backbone.width=0.25",
    "stream.n_tasks=3",
    "stream.train_per_task=64",
    "stream.test_per_task=32",
    "method.train.iterations=8",
]
# phases with recipes of their own, cut to a few steps
EXTRA = {
    "packnet": ["method.retrain.epochs=1"],
    "piggyback": ["method.mask_train.epochs=1"],
    "expert_gate": ["method.gate_train.iterations=8"],
    "der": ["method.rebalance_train.iterations=8"],
    "ccgn": ["method.classifier_train.iterations=8"],
    **{
        name: [
            "method.train.iterations=null",
            "method.train.epochs=2",
            "method.train.batch_size=32",
            "method.prune_train.epochs=1",
            "method.prune_train.batch_size=32",
            "method.retrain.epochs=2",
            "method.retrain.batch_size=32",
            "method.sparsities=[0.3,0.6]",
            "method.pruning_interval=1",
            "method.pruning_frequency=2",
            "method.min_train_acc=0.0",
        ]
        for name in ("cpg", "pae")
    },
}
TIMING = ("wall_s", "train_s", "images_per_s", "clrun_version", "run_id")  # and the *_phase_s columns


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def clrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "from clrun.cli import main; main()", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True)


def composed_configs() -> dict[str, str]:
    from omegaconf import OmegaConf

    from clrun.cli import compose

    found = {}
    for experiment in [None, *options("experiment")]:
        for method in options("method"):
            overrides = [f"method={method}"] + ([f"experiment={experiment}"] if experiment else [])
            try:
                found[" ".join(overrides)] = OmegaConf.to_yaml(compose(overrides))
            except Exception as error:  # a preset that does not fit a method: the refusal is behaviour too
                found[" ".join(overrides)] = f"error: {type(error).__name__}: {' '.join(str(error).split())}"
    return found


def tiny_runs() -> list[list[str]]:
    runs = []
    for method in options("method"):
        for scenario in ("task", "class", "domain"):
            base = [*TINY, *EXTRA.get(method, []), f"method={method}", f"stream.scenario={scenario}"]
            runs.append(base)
            if scenario != "task":
                runs.append([*base, "method.task_id=entropy"])
    return runs


def _rows(frame: pd.DataFrame) -> list[dict]:
    """A table's rows without timings, as JSON values (floats exact)."""
    timings = [c for c in frame if c in TIMING or c.endswith("_phase_s")]
    records = frame.drop(columns=timings).to_dict(orient="records")
    return json.loads(json.dumps(records, default=lambda value: value.item()))


def tiny_run(overrides: list[str]) -> dict:
    """One tiny run in a temporary folder: its results without timings, or its refusal."""
    from rich.console import Console

    from clrun.cli import compose
    from clrun.errors import ClrunError
    from clrun.run import Run

    with tempfile.TemporaryDirectory() as folder:
        try:
            Run(compose(overrides), Path(folder) / "run", Console(quiet=True)).execute()
        except ClrunError as error:
            return {"error": " ".join(str(error).split())}
        except Exception as error:  # composition errors (a key the method lacks)
            return {"error": f"{type(error).__name__}: {' '.join(str(error).split())}"}
        run_dir = Path(folder) / "run"
        found = {}
        for name in ("accuracy", "tasks", "summary"):
            table = pd.read_parquet(run_dir / f"{name}.parquet")
            found[name] = _rows(table)
            found[f"{name}_columns"] = list(table.columns)
        return found


def table1_smoke(data_root: Path) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, str(ROOT / "benchmarks" / "reproduce_table1.py"), "--scale", "smoke"]
        command += ["--data-root", str(data_root), "--runs-dir", folder, "--out", str(Path(folder) / "table.csv")]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
        found = {}
        for run_dir in sorted(Path(folder).glob("*-seed*")):
            method = pd.read_parquet(run_dir / "summary.parquet")["method"].iloc[0]
            accuracy = pd.read_parquet(run_dir / "accuracy.parquet")
            found[method] = _rows(accuracy.drop(columns="config_id"))  # it hashes the goals' temporary folder
        return found


def record(out: Path, data_root: Path, jobs: int) -> None:
    methods = options("method")
    with ThreadPoolExecutor(jobs) as pool:
        cli = dict(zip(methods, pool.map(lambda m: clrun("--cfg", "job", f"method={m}").stdout, methods), strict=True))
    print(f"clrun --cfg job: {len(cli)} methods", flush=True)
    composed = composed_configs()
    print(f"composed: {len(composed)} (method, preset) pairs", flush=True)
    runs = tiny_runs()
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = dict(zip((" ".join(r[len(TINY) :]) for r in runs), pool.map(tiny_run, runs), strict=True))
    print(f"tiny runs: {len(results)} ({sum('error' in r for r in results.values())} refused)", flush=True)
    smoke = table1_smoke(data_root / "CIFAR-100-subset")
    print(f"table1 smoke: {', '.join(smoke)}", flush=True)
    snapshot = {"cli_cfg": cli, "composed": composed, "runs": results, "table1_smoke": smoke}
    out.write_text(json.dumps(snapshot, indent=1, sort_keys=True))
    print(f"wrote {out}")


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def differences(before, after, path: str = "") -> list[str]:
    """Every place two snapshots differ, as `path: before != after` lines."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            where = f"{path}/{key}"
            if key not in after:
                found.append(f"{where}: missing after")
            elif key not in before:
                found.append(f"{where}: new after")
            else:
                found += differences(before[key], after[key], where)
        return found
    if isinstance(before, list) and isinstance(after, list) and len(before) == len(after):
        pairs = enumerate(zip(before, after, strict=True))
        return [line for i, (a, b) in pairs for line in differences(a, b, f"{path}[{i}]")]
    return [] if _same(before, after) else [f"{path}: {str(before)[:200]!r} != {str(after)[:200]!r}"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record")
    rec.add_argument("out", type=Path)
    rec.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    rec.add_argument("--jobs", type=int, default=2)
    cmp = sub.add_parser("compare")
    cmp.add_argument("before", type=Path)
    cmp.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "record":
        record(args.out, args.data_root.resolve(), args.jobs)
        return 0
    before, after = (json.loads(p.read_text()) for p in (args.before, args.after))
    found = differences(before, after)
    for line in found:
        print(line)
    counts = {key: len(before[key]) for key in before}
    print(f"{len(found)} differences over {counts}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
