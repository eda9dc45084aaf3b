"""Start-up: wall time of `clrun --help`, `clrun --cfg job`, `clrun-report --help`, and of a one-epoch split-MNIST
MLP run from process start to its first optimizer step and to its end; each a fresh process, the commands
alternated, medians of the repeats. Prints a table and writes benchmarks/results/startup-<host>-<date>.json.

    python benchmarks/startup.py [--quick] [--repeats N] [--data-root ../shared/data] [--before CHECKOUT]

`--before`: the same commands with another checkout's clrun first on PYTHONPATH (e.g. `git archive` of an earlier
commit), alternated with this one's, so that a ratio is measured side by side.

The first step is timed by a global optimizer step hook (`torch.optim.optimizer.register_optimizer_step_post_hook`)
that the run's process installs before clrun's `main` and that writes the wall clock at the first step to a file;
the clock at the first step minus the clock just before the process was started is the time to the first step.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table
from throughput import auto_hardware, write_record

from clrun import catalog

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
RUN = """
import sys, time
import torch.optim.optimizer as optimizer
def first_step(opt, args, kwargs):
    if not getattr(first_step, "done", False):
        first_step.done = True
        open({stamp!r}, "w").write(repr(time.time()))
optimizer.register_optimizer_step_post_hook(first_step)
sys.argv = ["clrun", *{args!r}]
from clrun.cli import main
main()
"""
PRINT = "import sys; sys.argv = [{prog!r}, *{args!r}]\nfrom {module} import main\nmain()"


def run_args(data_root: Path, run_dir: Path) -> list[str]:
    return [
        "method=finetune",
        "stream=split_mnist",
        "backbone=mlp",
        f"data.root={data_root}",
        "hardware=cpu",
        "hardware.threads=1",
        "method.train.epochs=1",
        "resume=false",
        f"hydra.run.dir={run_dir}",
    ]


def timed(code: str, cwd: Path, source: Path | None) -> float:
    """Seconds a fresh interpreter takes to run `code` (it must succeed), with clrun from `source` if given."""
    env = {**os.environ, "PYTHONPATH": str(source)} if source else None
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"failed: {code}\n{done.stderr[-2000:]}")
    return seconds


def timed_run(data_root: Path, work: Path, source: Path | None) -> tuple[float, float]:
    """(seconds to the first optimizer step, seconds in all) of one split-MNIST MLP run in a fresh process."""
    run_dir = Path(tempfile.mkdtemp(dir=work))
    stamp = run_dir / "first-step"
    code = RUN.format(stamp=str(stamp), args=run_args(data_root, run_dir / "run"))
    started = time.time()
    total = timed(code, work, source)
    return float(stamp.read_text()) - started, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats of each command (default 5, quick 2)")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA, help="the folder holding MNIST/")
    parser.add_argument("--before", type=Path, default=None, help="a checkout of earlier code, timed alongside")
    args = parser.parse_args()
    sources = {"": None, **({"before: ": args.before.resolve()} if args.before else {})}
    repeats = args.repeats or (2 if args.quick else 5)
    catalog.catalog()  # the method catalog current, as after a command's first use (the cost is then paid once)
    printing = {
        "clrun --help": PRINT.format(prog="clrun", args=["--help"], module="clrun.cli"),
        "clrun --cfg job": PRINT.format(prog="clrun", args=["--cfg", "job"], module="clrun.cli"),
        "clrun-report --help": PRINT.format(prog="clrun-report", args=["--help"], module="clrun.report"),
    }
    names = [*printing, "run: first step", "run: total"]
    seconds = {label + name: [] for label in sources for name in names}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for _ in range(repeats):  # alternated: each round runs every command once, of each checkout
            for label, source in sources.items():
                for name, code in printing.items():
                    seconds[label + name].append(timed(code, work, source))
                first, total = timed_run(args.data_root.resolve(), work, source)
                seconds[label + "run: first step"].append(first)
                seconds[label + "run: total"].append(total)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    table = Table(title=f"start-up (median of {repeats}, seconds)")
    for column in ("what", "median", "all"):
        table.add_column(column)
    for name, values in seconds.items():
        table.add_row(name, f"{medians[name]:.2f}", " ".join(f"{v:.2f}" for v in values))
    console = Console()
    console.print(table)
    record = {
        "quick": args.quick,
        "repeats": repeats,
        "before": str(args.before) if args.before else None,
        "load_average": os.getloadavg(),
        "median_s": medians,
    }
    out = write_record("startup-", auto_hardware(), {**record, "seconds": seconds})
    console.print(f"written: {out}")


if __name__ == "__main__":
    main()
