"""Per-step cost as the stream grows: every method on a long permuted-MNIST stream, per-step train time against
the task index.

Each method runs in its own process at one thread (`--jobs` at once): permuted MNIST (task scenario; a method
that refuses it in the domain scenario, else the class one), `--tasks` tasks of `--steps` steps each (every other
training phase cut to as few; `--train-per-task` images a task, so that importance estimates stay cheap), a 2x400 MLP,
64 test images a task. A task's per-step time is the time of its training phases (`Trainer.fit`: no evaluation,
no importance estimate) over their steps, both as wall time (the run's `train_s`) and as the training thread's CPU
time (far less disturbed by other processes on a loaded machine: the headline). The slope is the least-squares
fit of per-step time against task index (seconds per step per extra task); `first_ms`/`last_ms` are the measured
ms per step at the first and the last task, `growth` the slope x (tasks - 1) / the first. Prints a table, writes
benchmarks/results/slope-<host>-<date>.json and a PNG of per-step time against task index beside it. Without
../shared/data/MNIST the stream is synthetic images permuted the same way (the JSON's `dataset` says which).

    python benchmarks/slope.py [--quick] [--tasks 50] [--steps 25] [--methods ewc,si] [--jobs 2]
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(os.environ.get("CLRUN_BENCH_RESULTS") or ROOT / "benchmarks" / "results")
QUICK_METHODS = ["finetune", "ewc", "online_ewc", "si", "mas", "er", "pnn"]


def phases(method: str, steps: int) -> list[str]:
    """Overrides cutting a method's other training phases to about `steps` steps."""
    cut = {
        "packnet": [f"method.retrain.iterations={steps}"],
        "piggyback": [f"method.mask_train.iterations={steps}"],
        "expert_gate": [f"method.gate_train.iterations={steps}"],
        "der": [f"method.rebalance_train.iterations={steps}"],
        "ccgn": [f"method.classifier_train.iterations={steps}"],
        "clnp": [f"method.finetune.iterations={steps}"],
        "gim": [f"method.gate_train.iterations={steps}"],
    }
    epoch_based = [  # pruning schedules count epochs: one epoch of the task's images per phase
        "method.train.iterations=null",
        "method.train.epochs=1",
        "method.prune_train.epochs=1",
        "method.retrain.epochs=1",
        "method.sparsities=[0.5]",
        "method.pruning_interval=1",
        "method.pruning_frequency=1",
        "method.min_train_acc=0.0",
    ]
    return cut.get(method, []) + (epoch_based if method in ("cpg", "pae") else [f"method.train.iterations={steps}"])


def overrides(method: str, scenario: str, args) -> list[str]:
    mnist = (args.data_root / "MNIST").is_dir()
    return [
        "hardware=cpu",
        "hardware.threads=1",
        "stream=permuted_mnist",
        f"data.root={args.data_root}" if mnist else "stream.dataset=synthetic",
        f"stream.scenario={scenario}",
        "backbone=mlp",
        f"stream.n_tasks={args.tasks}",
        f"stream.train_per_task={args.train_per_task}",
        "stream.test_per_task=64",
        f"method={method}",
        *phases(method, args.steps),
        *([f"method.nz={10 * args.tasks + 100}"] if method == "dgmw" else []),  # its noise holds a one-hot per class
    ]


def one(method: str, args) -> dict:
    """Run `method` (task scenario, else domain, else class) in this process: per task, the wall seconds per
    training step (the run's `train_s` over the steps of its training phases) and the thread's CPU seconds per step
    (less disturbed by other processes on a loaded machine)."""
    import tempfile

    import pandas as pd
    import torch
    from rich.console import Console

    from clrun.cli import compose
    from clrun.errors import ClrunError
    from clrun.run import Run
    from clrun.train import Trainer

    # what torch imports on first use is start-up, not per-step cost: torch.optim's constructor imports torch._dynamo
    # (about 0.9 s of CPU, which would count as 45 ms a step in the first task's 20 steps)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    per_task = []  # [CPU seconds, steps] of each task's training phases
    fit, learn = Trainer.fit, Run._learn

    def counted_fit(self, module, recipe, *rest, **kwargs):
        start = time.thread_time()
        stats = fit(self, module, recipe, *rest, **kwargs)
        per_task[-1][0] += time.thread_time() - start
        per_task[-1][1] += -(-stats.images // recipe.batch_size)
        return stats

    def counted_learn(self, *rest, **kwargs):
        per_task.append([0.0, 0])
        return learn(self, *rest, **kwargs)

    Trainer.fit, Run._learn = counted_fit, counted_learn
    refusals = []
    for scenario in ("task", "domain", "class"):
        per_task.clear()
        with tempfile.TemporaryDirectory() as folder:
            try:
                Run(compose(overrides(method, scenario, args)), Path(folder) / "run", Console(quiet=True)).execute()
            except ClrunError as error:
                refusals.append(f"{scenario}: {' '.join(str(error).split())}")
                continue
            train_s = pd.read_parquet(Path(folder) / "run" / "tasks.parquet")["train_s"].tolist()
        if not all(steps for _, steps in per_task):
            return {"skipped": "trains outside Trainer.fit (no steps counted)"}
        return {
            "scenario": scenario,
            "steps": [steps for _, steps in per_task],
            "per_step_s": [round(s / steps, 7) for s, (_, steps) in zip(train_s, per_task, strict=True)],
            "cpu_per_step_s": [round(cpu / steps, 7) for cpu, steps in per_task],
        }
    return {"skipped": "; ".join(refusals)}


def fit(per_step: list[float]) -> dict:
    """Least-squares slope of per-step seconds against task index, the measured ms per step at the first and the
    last task, and the growth the slope makes over the stream relative to the first task."""
    import numpy as np

    slope = float(np.polyfit(np.arange(1, len(per_step) + 1), per_step, 1)[0])
    return {
        "slope_s_per_step_per_task": slope,
        "first_ms": 1000 * per_step[0],
        "last_ms": 1000 * per_step[-1],
        "growth": slope * (len(per_step) - 1) / per_step[0],
    }


def run_all(args) -> dict:
    """Every method in its own process, `--jobs` at once; what each returned, or its failure."""

    def launch(method: str) -> tuple[str, dict]:
        argv = [sys.executable, __file__, "--one", method, "--tasks", str(args.tasks), "--steps", str(args.steps)]
        argv += ["--train-per-task", str(args.train_per_task), "--data-root", str(args.data_root)]
        start = time.time()
        try:
            done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=args.limit)
        except subprocess.TimeoutExpired:
            return method, {"skipped": f"over the {args.limit} s limit at {args.tasks} tasks"}
        if done.returncode:
            return method, {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "?"}
        found = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{method}: {time.time() - start:.0f} s", flush=True)
        return method, found

    with ThreadPoolExecutor(args.jobs) as pool:
        return dict(pool.map(launch, args.methods))


def plot(found: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = sorted(((m, r) for m, r in found.items() if "cpu" in r), key=lambda mr: -mr[1]["cpu"]["last_ms"])
    paired = [*plt.cm.tab20.colors, *plt.cm.tab20b.colors, *plt.cm.tab20c.colors]  # 60 colours, in similar pairs
    colours = paired[::2] + paired[1::2]  # neighbours in the legend apart
    fig, axes = plt.subplots(1, 2, figsize=(15, 6), sharey=True)
    for ax, key, what in zip(axes, ("cpu_per_step_s", "per_step_s"), ("the thread's CPU", "wall"), strict=True):
        for i, (method, r) in enumerate(lines):
            x = range(1, len(r[key]) + 1)
            style = ("-", "--", ":")[i // 20 % 3]
            ax.plot(x, [1000 * s for s in r[key]], style, color=colours[i % len(colours)], label=method, lw=1.2)
        ax.set_yscale("log")
        ax.set_xlabel("task index")
        ax.set_title(f"{what} time per step")
    axes[0].set_ylabel("ms per training step (log scale)")
    fig.suptitle("Per-step train time as the stream grows (permuted MNIST, 2x400 MLP, 1 thread)")
    axes[1].legend(loc="upper left", bbox_to_anchor=(1.01, 1), ncol=2 if len(lines) > 24 else 1, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"8 tasks, {', '.join(QUICK_METHODS)}")
    parser.add_argument("--tasks", type=int, default=None, help="tasks in the stream (default 50; --quick: 8)")
    parser.add_argument("--steps", type=int, default=25, help="training steps per task")
    parser.add_argument("--train-per-task", type=int, default=256, help="training images per task")
    parser.add_argument("--methods", default=None, help="comma-separated (default: every conf/method option)")
    parser.add_argument("--jobs", type=int, default=2, help="methods run at once (one thread each)")
    parser.add_argument("--limit", type=int, default=900, help="seconds a method may take")
    parser.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.tasks = args.tasks or (8 if args.quick else 50)
    args.data_root = args.data_root.resolve()
    if args.one:
        print(json.dumps(one(args.one, args)))
        return 0
    every = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml"))
    args.methods = args.methods.split(",") if args.methods else (QUICK_METHODS if args.quick else every)
    start = time.time()
    found = run_all(args)
    for r in found.values():
        if "per_step_s" in r:
            r["cpu"], r["wall"] = fit(r["cpu_per_step_s"]), fit(r["per_step_s"])

    from rich.console import Console
    from rich.table import Table

    n = args.tasks
    table = Table(title=f"per-step train time over {n} tasks of {args.steps} steps (CPU: the thread's)")
    columns = ("method", "scenario", "CPU ms task 1", f"CPU ms task {n}", "CPU slope us/task", "growth", "wall slope")
    for column in columns:
        table.add_column(column, justify="left" if column in ("method", "scenario") else "right")
    for method, r in sorted(found.items(), key=lambda mr: -mr[1]["cpu"]["growth"] if "cpu" in mr[1] else 9):
        if "cpu" in r:
            cpu, wall = r["cpu"], r["wall"]
            table.add_row(
                method,
                r["scenario"],
                f"{cpu['first_ms']:.2f}",
                f"{cpu['last_ms']:.2f}",
                f"{1e6 * cpu['slope_s_per_step_per_task']:.2f}",
                f"{100 * cpu['growth']:+.0f}%",
                f"{1e6 * wall['slope_s_per_step_per_task']:.2f}",
            )
        else:
            table.add_row(method, r.get("skipped") or r.get("failed"), *[""] * 5)
    Console(width=160).print(table)

    host = _host()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"slope-{host}-{datetime.date.today().isoformat()}.json"
    record = {
        "host": host,
        "load_average": os.getloadavg(),
        "command": " ".join(["python", "benchmarks/slope.py", *sys.argv[1:]]),
        "dataset": "mnist" if (args.data_root / "MNIST").is_dir() else "synthetic",
        "tasks": args.tasks,
        "steps": args.steps,
        "train_per_task": args.train_per_task,
        "jobs": args.jobs,
        "seconds": round(time.time() - start, 1),
        "methods": found,
    }
    out.write_text(json.dumps(record, indent=1) + "\n")
    plot(found, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")
    return 0


def _host() -> str:
    """The machine's short name (throughput.py's `host_kind`), imported late: it imports torch."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from throughput import host_kind

    return host_kind()


if __name__ == "__main__":
    sys.exit(main())
