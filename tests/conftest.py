"""Shared test helpers: composing configs, and the real datasets in ../shared/data."""

import os
import subprocess
import sys
from pathlib import Path

# the suite runs in parallel workers (pytest-xdist): each worker, and each `clrun` it starts, takes one thread
# (`hardware.threads: null` reads OMP_NUM_THREADS), so that workers do not oversubscribe the cores
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

from clrun import results
from clrun.cli import compose
from clrun.config import check_config
from clrun.data import build_stream
from clrun.errors import ClrunError
from clrun.hardware import resolve_hardware
from clrun.run import Run

CONF = Path(__file__).resolve().parents[1] / "conf"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


# three tasks of 64 training and 32 test images on one CPU thread (tiny nets: one thread is fastest and least
# disturbed by other processes); method tests add their method and backbone
TINY_STREAM = [
    "hardware=cpu",
    "hardware.threads=1",
    "stream.n_tasks=3",
    "stream.train_per_task=64",
    "stream.test_per_task=32",
]


# real split MNIST, its first 3 tasks of 1024 training and 200 test images (a method's learn-and-keep check)
SPLIT_MNIST_3 = [
    "stream=split_mnist",
    f"data.root={SHARED_DATA}",
    "stream.n_tasks=3",
    "stream.train_per_task=1024",
    "stream.test_per_task=200",
]
# real split MNIST in the class scenario, 500 training and 200 test images a task: a replay method against fine-tuning
# in a minute (tests add the backbone's size and the recipe)
SPLIT_MNIST_CLASS = [
    "hardware=cpu",
    "hardware.threads=1",
    "stream=split_mnist",
    f"data.root={SHARED_DATA}",
    "stream.scenario=class",
    "backbone=mlp",
    "stream.train_per_task=500",
    "stream.test_per_task=200",
]


CLRUN = [sys.executable, "-c", "from clrun.cli import main; main()"]  # the `clrun` command of this interpreter


def clrun(cwd: Path, *args: str, **kwargs) -> subprocess.CompletedProcess:
    """`clrun <args>` run in `cwd` as a user would, its output captured."""
    return subprocess.run([*CLRUN, *args], cwd=cwd, capture_output=True, text=True, timeout=300, **kwargs)


def compose_config(*overrides: str):
    """The config `clrun <overrides>` would run."""
    return compose(overrides)


def build_method(method_class, *overrides: str):
    """The method `clrun <overrides>` would run, built in-process as Run builds it (the config checked, torch
    seeded with cfg.seed, then the stream, then the method), with its stream and config; no run folder.
    `method_class` None: the class cfg.method._target_ names."""
    cfg = compose_config(*overrides)
    configured = check_config(cfg)
    hw = resolve_hardware(cfg.hardware)
    torch.manual_seed(cfg.seed)
    stream = build_stream(cfg.stream, cfg.data, cfg.seed, hw.device)
    method_class = method_class or configured
    return method_class(cfg.method, cfg.backbone, stream, hw), stream, cfg


def task_inputs(stream, task: int):
    """Task `task`'s test images of `stream`, prepared as evaluation prepares them (no augmentation)."""
    return stream.prepare(stream.tasks[task].test.x, train=False)


def needs_shared(*parts: str) -> pytest.MarkDecorator:
    """Skip a test when ../shared/data/<parts> is absent, except in CI (CI=true), where it must be there."""
    present = SHARED_DATA.joinpath(*parts).exists()
    if not present and os.environ.get("CI") == "true":
        raise RuntimeError(f"CI needs the real data at {SHARED_DATA.joinpath(*parts)}")
    return pytest.mark.skipif(not present, reason=f"needs {SHARED_DATA.joinpath(*parts)}")


def run(tmp_path: Path, *overrides: str, name: str = "run") -> tuple[dict, Path]:
    """Execute a run in-process in `tmp_path / name`; return its summary row and folder."""
    run_dir = tmp_path / name
    return Run(compose_config(*overrides), run_dir, Console(quiet=True)).execute(), run_dir


def matrix(run_dir: Path) -> np.ndarray:
    """The accuracy matrix a run folder holds."""
    table = pd.read_parquet(run_dir / results.ACCURACY_FILE)
    return results.accuracy_matrix(table, table["train_task"].max() + 1)


def run_interrupted_then_resumed(tmp_path: Path, *overrides: str, after_tasks: int = 2) -> Path:
    """Stop a run right after the checkpoint of `after_tasks` tasks (as Ctrl-C would), run it again to the end,
    and return its folder."""
    save = Run._checkpoint

    def save_then_stop(self, method, accuracy_rows, task_rows):
        save(self, method, accuracy_rows, task_rows)
        if len(task_rows) == after_tasks:
            raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Run, "_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, *overrides, name="resumed")
    return run(tmp_path, *overrides, name="resumed")[1]


def learn_and_score(method, stream) -> dict[tuple[int, int], float]:
    """Learn every task of `stream` in order; R[(i, j)]: task j's test accuracy through `predict` after task i."""
    accuracy = {}
    for task in stream.tasks:
        method.learn(task)
        for j in range(task.index + 1):
            correct = method.predict(task_inputs(stream, j), j).argmax(1) == stream.tasks[j].test.y
            accuracy[task.index, j] = correct.float().mean().item()
    return accuracy


def step_with_the_same_gradients(pairs, steps: int) -> None:
    """Step each (parameters, optimizer) of `pairs` `steps` times, every pair with the same random gradients."""
    first = pairs[0][0]
    for _ in range(steps):
        grads = [torch.randn_like(p) for p in first]
        for params, optimizer in pairs:
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of `module`'s state."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def unchanged(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    """Whether `module`'s state is bit-identical to `state` (a `snapshot`)."""
    now = module.state_dict()
    return now.keys() == state.keys() and all(torch.equal(now[k], v) for k, v in state.items())


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (as `hardware.threads=1` runs tiny networks, e.g. a controller's LSTM)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_resume_is_bit_identical(tmp_path: Path, *overrides: str) -> None:
    """A run stopped after task 2 and resumed ends with the matrix and every tensor of the method's state (weights,
    masks, buffers) equal to an uninterrupted run's."""
    _, straight = run(tmp_path, *overrides)
    resumed = run_interrupted_then_resumed(tmp_path, *overrides, after_tasks=2)
    np.testing.assert_array_equal(matrix(straight), matrix(resumed))
    final = [torch.load(d / "checkpoints" / "last.pt", weights_only=True)["method"] for d in (straight, resumed)]
    pairs = list(zip(state_tensors(final[0]), state_tensors(final[1]), strict=True))
    assert len(pairs) > 20 and all(torch.equal(a, b) for a, b in pairs)


def state_tensors(value) -> list[torch.Tensor]:
    """Every tensor in a nested state (dicts, lists, tuples), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else []
    return [t for item in items for t in state_tensors(item)]


def one_line_error(match: str, call, *args, **keys) -> str:
    """The message of the `ClrunError` that `call(*args, **keys)` raises, checked to match and to be one line."""
    with pytest.raises(ClrunError, match=match) as info:
        call(*args, **keys)
    assert "\n" not in str(info.value)
    return str(info.value)


# an image-file stream cut to 2 tasks of 16x16 images, a few steps of finetune on an MLP (relative data.cache: the
# run's working folder)
IMAGE_RUN = ["data.cache=cache", "stream.n_tasks=2", "stream.image_size=[16,16]", "stream.input_size=[16,16]"]
IMAGE_RUN += ["backbone=mlp", "method=finetune", "method.train.iterations=2", "hardware=cpu"]


def run_tables(cwd: Path, pattern: str = "*") -> tuple[pd.DataFrame, pd.DataFrame]:
    """tasks.parquet and accuracy.parquet of the one run under `cwd`/outputs/runs whose folder matches `pattern`."""
    (run_dir,) = (p.parent for p in (cwd / "outputs" / "runs").glob(f"{pattern}/summary.parquet"))
    return pd.read_parquet(run_dir / "tasks.parquet"), pd.read_parquet(run_dir / "accuracy.parquet")


def record_insertions(method, stream, memory) -> dict:
    """Wrap `memory.insert` (a `LogitMemory`'s) so that every batch offered is checked to carry the model's own
    outputs at that moment and recorded by image bytes; return the record (filled as the method learns)."""
    at_insertion, insert = {}, memory.insert

    def spy(images, y, t, logits):
        with torch.no_grad():  # tiny streams do not augment: train and test inputs are the same
            now = method.outputs(method.hw.to_input(stream.prepare(images, train=False)))
        torch.testing.assert_close(logits.detach(), now, rtol=0, atol=1e-6)
        at_insertion.update({image.numpy().tobytes(): row for image, row in zip(images, now, strict=True)})
        insert(images, y, t, logits)

    memory.insert = spy
    return at_insertion
