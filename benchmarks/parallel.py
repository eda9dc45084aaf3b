"""Many small runs on one machine: a sweep of N split-MNIST MLP runs one after another against the `parallel`
launcher at each n_jobs x hardware.threads split of the cores, and the default threads (null) against the best
split on a machine loaded by other processes.

Each variant is one `clrun -m seed=0..N-1 ...` command in a fresh folder; the variants alternate in rounds and
each figure is the median of the rounds. Part (b): every split n_jobs x threads that fills the cores (n_jobs a
power of 2), 1 x 1, and the launcher's default (n_jobs = cores, threads null); on a GPU also the best parallel
split with `hardware.memory_fraction` 0.9 / n_jobs per job (`CLRUN_GPU_DRY_RUN=1`: that variant on the CPU, where
the fraction is ignored). Part (c): one busy process per two cores, then the sequential and parallel defaults
against the best split. Prints runs per minute and writes benchmarks/results/parallel-<host>-<date>.json.

    python benchmarks/parallel.py [--quick] [--runs 16] [--iterations 20] [--rounds 2] [--data-root DIR]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from reproduce_table1 import clrun_command
from rich.console import Console
from rich.table import Table
from throughput import auto_hardware, write_record

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Variant:
    """How a sweep runs: jobs at once (1: Hydra's basic launcher), torch threads per job (None: the default)."""

    n_jobs: int
    threads: int | None
    memory_fraction: float | None = None

    @property
    def name(self) -> str:
        threads = "null" if self.threads is None else self.threads
        fraction = f" mem {self.memory_fraction}" if self.memory_fraction else ""
        return f"{self.n_jobs} x {threads}{fraction}"

    def overrides(self) -> list[str]:
        launcher = ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={self.n_jobs}"] if self.n_jobs > 1 else []
        threads = "null" if self.threads is None else self.threads
        fraction = [f"hardware.memory_fraction={self.memory_fraction}"] if self.memory_fraction else []
        return [*launcher, f"hardware.threads={threads}", *fraction]


def sweep(variant: Variant, runs: int, common: list[str]) -> tuple[float, list[int]]:
    """Run the sweep in a fresh folder; its wall seconds and the threads its runs recorded."""
    with tempfile.TemporaryDirectory(prefix="clrun-parallel-") as folder:
        command = [*clrun_command(), "-m", f"seed=range(0,{runs})", *common, *variant.overrides()]
        start = time.perf_counter()
        done = subprocess.run(command, cwd=folder, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        if done.returncode != 0:
            sys.exit(f"`{' '.join(command)}` failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        summaries = list(Path(folder, "outputs", "runs").glob("*/summary.parquet"))
        if len(summaries) != runs:
            sys.exit(f"{variant.name}: {len(summaries)} of {runs} runs finished")
        return seconds, sorted({int(pd.read_parquet(p)["threads"].iloc[0]) for p in summaries})


def measure(variants: list[Variant], runs: int, rounds: int, common: list[str], console: Console) -> list[dict]:
    """Each variant's sweep `rounds` times, the variants alternating; median seconds and runs per minute."""
    seconds: dict[Variant, list[float]] = {v: [] for v in variants}
    threads: dict[Variant, list[int]] = {}
    for r in range(rounds):
        for variant in variants if r % 2 == 0 else variants[::-1]:
            elapsed, threads[variant] = sweep(variant, runs, common)
            seconds[variant].append(round(elapsed, 2))
            console.print(f"round {r + 1}: {variant.name}: {elapsed:.1f} s (threads {threads[variant]})")
    rows = []
    for variant in variants:
        median = statistics.median(seconds[variant])
        rows.append(
            {
                "variant": variant.name,
                **asdict(variant),
                "threads_recorded": threads[variant],
                "seconds": seconds[variant],
                "median_s": round(median, 2),
                "runs_per_min": round(runs * 60 / median, 2),
            }
        )
    return rows


def show(title: str, rows: list[dict], console: Console) -> None:
    table = Table(title=title)
    for column in ("n_jobs x threads", "threads recorded", "seconds (median)", "runs / min"):
        table.add_column(column, justify="right")
    for row in rows:
        recorded = ",".join(map(str, row["threads_recorded"]))
        table.add_row(row["variant"], recorded, f"{row['median_s']:.1f}", f"{row['runs_per_min']:.1f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 runs of 10 iterations, one round (about a minute)")
    parser.add_argument("--runs", type=int, help="runs in each sweep (default 16; --quick 8)")
    parser.add_argument("--iterations", type=int, help="iterations per task (default 20; --quick 10)")
    parser.add_argument("--rounds", type=int, help="alternating rounds; figures are medians (default 2; --quick 1)")
    parser.add_argument("--data-root", default=str(SHARED_DATA), help="folder holding MNIST/raw")
    args = parser.parse_args()
    runs = args.runs or (8 if args.quick else 16)
    iterations = args.iterations or (10 if args.quick else 20)
    rounds = args.rounds or (1 if args.quick else 2)
    console = Console()

    cores = len(os.sched_getaffinity(0))
    common = [
        "stream=split_mnist",
        "backbone=mlp",
        "method=finetune",
        f"data.root={Path(args.data_root).expanduser().resolve()}",
        f"method.train.iterations={iterations}",
        "stream.test_per_task=500",
    ]
    splits = [2**k for k in range(cores.bit_length()) if 2**k <= cores]
    variants = [Variant(j, cores // j) for j in splits] + [Variant(1, 1), Variant(cores, None)]
    console.print(f"{runs} split-MNIST MLP runs of {iterations} iterations a task on {cores} cores")
    rows = measure(variants, runs, rounds, common, console)
    best = max(rows, key=lambda row: row["runs_per_min"])
    gpu = torch.cuda.is_available() or os.environ.get("CLRUN_GPU_DRY_RUN") == "1"
    if gpu:  # each job capped at its share of GPU memory: the best parallel split again, side by side with it
        top = max((row for row in rows if row["n_jobs"] > 1), key=lambda row: row["runs_per_min"])
        fraction = round(0.9 / top["n_jobs"], 3)
        pair = [Variant(top["n_jobs"], top["threads"]), Variant(top["n_jobs"], top["threads"], fraction)]
        memory_rows = measure(pair, runs, rounds, common, console)
        show("the best parallel split with and without hardware.memory_fraction", memory_rows, console)
    show(f"{runs} runs, one after another and in parallel", rows, console)

    load = max(1, cores // 2)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(load)]
    try:
        loaded = [Variant(best["n_jobs"], best["threads"]), Variant(1, None), Variant(cores, None)]
        loaded = list(dict.fromkeys(loaded))  # the best split may be a default already
        loaded_rows = measure(loaded, runs, rounds, common, console)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    show(f"with {load} busy process(es) beside the sweep: the defaults against the best split", loaded_rows, console)

    fields = {
        "load_average": os.getloadavg(),
        "quick": args.quick,
        "cores": cores,
        "runs": runs,
        "iterations": iterations,
        "rounds": rounds,
        "command": "clrun -m seed=range(0,N) " + " ".join(common[:2] + common[3:]),
        "variants": rows,
        "best": best["variant"],
        "speedup_best_vs_sequential": round(best["runs_per_min"] / rows[0]["runs_per_min"], 2),
        "memory_fraction": memory_rows if gpu else None,
        "busy_processes": load,
        "loaded": loaded_rows,
    }
    out = write_record("parallel-", auto_hardware(), fields)
    console.print(f"best split {best['variant']}: {fields['speedup_best_vs_sequential']}x the sequential sweep")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()
