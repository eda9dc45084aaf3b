"""One-command GPU check (`make gpu-check`): everything that needs CUDA, in at most 8 minutes on one H200.

Steps, each a subprocess under its own time limit (a step that fails or runs over is reported and the others
still run):
1. the tests marked `gpu` (fused optimizers, CUDA graphs, memory_fraction, bf16 autocast, channels_last, host
   images streamed in chunks, a resumed GPU run against an uninterrupted one);
2. `make bench`'s scripts in their quick form: throughput.py, masking.py, images.py, startup.py, slope.py
   (per-step cost as the stream grows), parallel.py (a sweep of small runs at each n_jobs x threads split, and
   with hardware.memory_fraction per job), and speed.py with a short CPG task of 1,000 images on vgg16_bn
   projected to Table 1 (speed.py's `table1`);
3. speed.py's steps at batch 32 again with `--compile --compile-mode reduce_overhead` (CUDA graphs).
Then one summary table of the headline figures, and benchmarks/results/gpu-check-<host>-<date>.json: each step's
command, status and seconds, the figures and the JSON each came from (every step writes its own JSON there too).

`--dry-run` (on a CPU; CI runs it): the same steps at the smallest sizes on the CPU, the `gpu` tests under
CLRUN_GPU_DRY_RUN=1 (everything but the CUDA calls), the graphs step eager (the tests compile a convnet with
`reduce_overhead`), every JSON into a scratch folder; exit status 1 when a step fails.

    python benchmarks/gpu_check.py [--dry-run]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent


@dataclass
class Step:
    """One check: a command run in benchmarks/ with a time limit on the GPU, and its smallest form for --dry-run."""

    name: str
    command: list[str]
    gpu_args: list[str]
    dry_args: list[str]
    limit_s: int


STEPS = [
    Step("tests", ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "4", "-m", "gpu", "../tests"], [], [], 120),
    Step("throughput", ["throughput.py", "--quick"], [], ["--backbones", "mlp", "convnet"], 45),
    Step("masking", ["masking.py", "--quick"], [], ["--backbones", "convnet", "--batch-sizes", "32"], 40),
    Step("images", ["images.py", "--quick"], [], ["--images", "40"], 40),
    Step("startup", ["startup.py", "--quick"], [], ["--repeats", "1"], 45),
    Step("slope", ["slope.py", "--quick"], [], ["--tasks", "3", "--methods", "finetune,ewc"], 90),
    Step("parallel", ["parallel.py", "--quick"], [], ["--runs", "2", "--iterations", "1"], 120),
    Step(
        "speed",
        ["speed.py", "--quick"],
        ["--task-images", "1000", "--epoch-scale", "20"],
        ["--batch-sizes", "32"],
        150,
    ),
    Step(
        "graphs",
        ["speed.py", "--quick", "--batch-sizes", "32", "--skip-cpg"],
        ["--compile", "--compile-mode", "reduce_overhead"],
        ["--kinds", "plain"],  # eager: compiling VGG16 on a CPU takes many minutes (the tests step compiles a convnet)
        100,
    ),
]


def run_step(step: Step, dry_run: bool, results: Path) -> dict:
    """Run one step (its whole process group killed at the limit); its status, seconds and the JSON it wrote."""
    argv = [sys.executable, *step.command, *(step.dry_args if dry_run else step.gpu_args)]
    start = time.time()
    process = subprocess.Popen(
        argv, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=None if dry_run else step.limit_s)
        status = "ok" if process.returncode == 0 else f"failed ({process.returncode})"
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        status = f"over its {step.limit_s} s"
    seconds = time.time() - start
    print(output, flush=True)
    files = sorted(str(p) for p in results.glob("*.json") if p.stat().st_mtime >= start)
    return {
        "name": step.name,
        "command": " ".join(argv[1:]),
        "status": status,
        "seconds": round(seconds, 1),
        "files": files,
        "last_line": output.strip().splitlines()[-1] if output.strip() else "",
    }


def figures(path: str) -> list[tuple[str, str]]:
    """The headline figures of one benchmark JSON."""
    record = json.loads(Path(path).read_text())
    name = Path(path).name
    rows = []
    if name.startswith("masking-"):
        for r in record["rows"]:
            rows.append(
                (
                    f"masked step / dense, {r['backbone']} batch {r['batch_size']}",
                    f"PackNet {r['packnet_ratio']:.2f}x, CPG {r['cpg_ratio']:.2f}x",
                )
            )
    elif name.startswith("speed-"):
        label = f"compiled, {record['compile']}" if record.get("compile") else "eager"
        for r in record["steps"]:
            rows.append(
                (
                    f"clrun vs reference, {r['kind']} batch {r['batch_size']} ({label})",
                    f"{r['clrun_images_per_s']:,.0f} vs {r['reference_images_per_s']:,.0f} img/s = {r['speedup']:.2f}x",
                )
            )
        if record.get("table1"):
            t = record["table1"]
            rows.append(
                (
                    "projected `make reproduce-table1` (clrun / reference-style)",
                    f"{t['clrun_s'] / 3600:.2f} h / {t['reference_s'] / 3600:.2f} h = {t['ratio']:.2f}x",
                )
            )
    elif name.startswith("parallel-"):
        for key, label in (("variants", ""), ("memory_fraction", ""), ("loaded", ", loaded")):
            for r in record[key] or []:
                rows.append(
                    (
                        f"{record['runs']} small runs, n_jobs x threads {r['variant']}{label}",
                        f"{r['runs_per_min']:.1f} runs/min",
                    )
                )
    elif name.startswith("images-"):
        rows.append(
            (
                "224 augmented epoch: on device / DataLoader",
                f"{record['epoch_images_per_s']['clrun_on_device']:,.0f} / "
                f"{record['epoch_images_per_s']['dataloader']:,.0f} img/s = "
                f"{record['speedup_vs_dataloader']:.2f}x",
            )
        )
        rows.append(("decoded-image cache build", f"{record['cache_build_images_per_s']:,.0f} img/s"))
        if record.get("resnet50_train_images_per_s"):  # measured on CUDA only
            rows.append(("resnet50 train at 224", f"{record['resnet50_train_images_per_s']:,.0f} img/s"))
    elif name.startswith("startup-"):
        rows += [(f"start-up: {command}", f"{seconds:.2f} s") for command, seconds in record["median_s"].items()]
    elif name.startswith("slope-"):
        for method, r in record["methods"].items():
            if "cpu" in r:
                label = f"{method} CPU ms/step, task 1 -> {record['tasks']}"
                rows.append((label, f"{r['cpu']['first_ms']:.2f} -> {r['cpu']['last_ms']:.2f}"))
    elif "backbones" in record:
        for r in record["backbones"]:
            rows.append((f"{r['backbone']} train, batch {r['batch_size']}", f"{r['images_per_s']:,.0f} img/s"))
        d = record["data_path"]
        rows.append(("augmented CIFAR epoch: clrun / DataLoader", f"{d['speedup']:.1f}x"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dry-run", action="store_true", help="on a CPU: everything but the CUDA calls, smallest sizes"
    )
    names = [step.name for step in STEPS]
    parser.add_argument("--steps", nargs="*", default=names, choices=names, help="only these steps (default: all)")
    args = parser.parse_args()

    import torch  # after the arguments, so that --help stays quick

    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("gpu_check.py: no CUDA device is visible; on a CPU run it as `make gpu-check ARGS=--dry-run`")
    os.environ["PYTHONUNBUFFERED"] = "1"
    scratch = None
    if args.dry_run:
        scratch = tempfile.TemporaryDirectory(prefix="clrun-gpu-check-")
        os.environ.update(CLRUN_GPU_DRY_RUN="1", CLRUN_BENCH_RESULTS=scratch.name)
    sys.path.insert(0, str(HERE))
    import throughput  # its RESULTS follows CLRUN_BENCH_RESULTS, read at import

    results = throughput.RESULTS
    results.mkdir(parents=True, exist_ok=True)

    start = time.time()
    done = []
    for step in [step for step in STEPS if step.name in args.steps]:
        print(f"== {step.name} ({time.time() - start:.0f} s)", flush=True)
        done.append(run_step(step, args.dry_run, results))

    console = Console(width=max(120, Console().width))
    table = Table(
        title=f"gpu-check on {throughput.host_kind()}{' (dry run)' if args.dry_run else ''}, "
        f"{time.time() - start:.0f} s"
    )
    for column in ("step", "status", "s", "figure", "value"):
        table.add_column(column, justify="left")
    collected = []
    for step in done:
        colour = "green" if step["status"] == "ok" else "red"
        table.add_row(
            step["name"],
            f"[{colour}]{step['status']}[/]",
            f"{step['seconds']:.0f}",
            "",
            step["last_line"] if step["name"] == "tests" else "",
        )
        for path in step["files"]:
            for figure, value in figures(path):
                table.add_row("", "", "", figure, value)
                collected.append({"step": step["name"], "figure": figure, "value": value, "file": Path(path).name})
    console.print(table)
    subset = "" if args.steps == names else "-".join(args.steps) + "-"  # a partial check's file beside the full one
    out = throughput.write_record(
        f"gpu-check-{subset}",
        throughput.auto_hardware(),
        {"dry_run": args.dry_run, "seconds": round(time.time() - start, 1), "steps": done, "figures": collected},
    )
    console.print(f"wrote {out}")
    if scratch is not None:
        scratch.cleanup()
    if any(step["status"] != "ok" for step in done):
        sys.exit(1)


if __name__ == "__main__":
    main()
