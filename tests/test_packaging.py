"""The built wheel carries the configs: installed into a fresh virtual environment, `clrun --help` and `clrun` work
from an empty folder, far from the checkout."""

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_from_an_empty_folder(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("clrun-*.whl")
    env_dir = tmp_path / "env"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    # the dependencies (torch & co.) come from this environment's site-packages, clrun only from the wheel
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True
    ).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [python, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", wheel], check=True, capture_output=True
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    clrun = env_dir / "bin" / "clrun"
    where = subprocess.run(
        [python, "-c", "import clrun; print(clrun.__file__)"], capture_output=True, text=True, cwd=empty
    )
    assert where.stdout.startswith(str(env_dir)), where  # the wheel's copy, not the checkout's

    shown = subprocess.run([clrun, "--help"], capture_output=True, text=True, cwd=empty, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert "cpg          [task; class, domain with task_id] CPG: Compacting, Picking and Growing" in shown.stdout
    assert "dgmw         [class] DGMw" in shown.stdout  # each method's scenarios
    assert "finetune     [task, class, domain] Fine-tuning" in shown.stdout
    options = {group: sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml")) for group in ("method", "stream")}
    for group, names in options.items():  # every option of the checkout's conf/, from the wheel's copy of it
        assert f"{group}: {', '.join(names)}\n" in shown.stdout, group

    tiny = ["hardware=cpu", "stream.n_tasks=2", "stream.train_per_task=64", "stream.test_per_task=32"]
    done = subprocess.run(
        [clrun, *tiny, "method.train.epochs=1"], capture_output=True, text=True, cwd=empty, timeout=300
    )
    assert done.returncode == 0, done.stderr
    (run_dir,) = (empty / "outputs" / "runs").iterdir()
    assert run_dir.name.startswith("finetune-synthetic-convnet-seed0-")
    assert len(pd.read_parquet(run_dir / "accuracy.parquet")) == 3
    config = subprocess.run([clrun, "--cfg", "job", "method=pae"], capture_output=True, text=True, cwd=empty)
    assert "name: pae" in config.stdout and "max_multiplier: 2.0" in config.stdout
