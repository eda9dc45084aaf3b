"""Start-up: the commands that only print (`clrun --help`, `--cfg job`, shell completion, `clrun-report --help`)
import neither torch nor torchvision, a small run imports no torchvision model or operator and reaches its first step
without pandas or matplotlib, and the method catalog they read holds what the method classes say."""

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY_STREAM

from clrun import catalog

# runs an entry point with the given arguments, then prints (to stderr) which heavy modules the process imported
PROBE = """
import json, sys
sys.argv = [{prog!r}, *{args!r}]
try:
    from {module} import main
    main()
except SystemExit:
    pass
finally:
    heavy = ("torch", "torchvision", "torchvision.models", "torchvision.ops", "torch._inductor")
    print("IMPORTED " + json.dumps([m for m in heavy if m in sys.modules]), file=sys.stderr)
"""

# runs clrun with the given arguments; prints which table and plot modules were imported when the first step was
# taken, and which torchvision modules at the end
RUN_PROBE = """
import json, sys
import torch.optim.optimizer as optimizer
seen = []
def first_step(opt, args, kwargs):
    if not seen:
        seen.append([m for m in ("pandas", "matplotlib") if m in sys.modules])
optimizer.register_optimizer_step_post_hook(first_step)
sys.argv = ["clrun", *{args!r}]
from clrun.cli import main
main()
print("AT FIRST STEP " + json.dumps(seen[0]), file=sys.stderr)
vision = ("torchvision", "torchvision.models", "torchvision.ops")
print("IMPORTED " + json.dumps([m for m in vision if m in sys.modules]), file=sys.stderr)
"""


def imported(tmp_path, module: str, prog: str, *args: str, env: dict | None = None) -> list[str]:
    """The heavy modules `prog args` imports, run as a user runs it (a fresh interpreter)."""
    code = PROBE.format(module=module, prog=prog, args=list(args))
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env
    )
    return printed(done.stderr, "IMPORTED ")


def printed(stderr: str, prefix: str):
    """What a probe printed as JSON after `prefix` (its last such line)."""
    lines = [x for x in stderr.splitlines() if x.startswith(prefix)]
    assert lines, stderr[-2000:]
    return json.loads(lines[-1].removeprefix(prefix))


@pytest.fixture(scope="module")
def warm_catalog():
    catalog.catalog()  # the first command after a change to the sources builds it (and imports torch)


@pytest.mark.parametrize(
    "module, prog, args",
    [
        ("clrun.cli", "clrun", ["--help"]),
        ("clrun.cli", "clrun", ["--cfg", "job", "method=ewc", "replay.budget=200", "stream=split_mnist"]),
        ("clrun.report", "clrun-report", ["--help"]),
    ],
)
def test_printing_commands_import_no_torch(tmp_path, warm_catalog, module, prog, args):
    assert imported(tmp_path, module, prog, *args) == []


def test_shell_completion_imports_no_torch(tmp_path, warm_catalog):
    env = {**os.environ, "COMP_LINE": "clrun method=e", "COMP_POINT": "16"}
    assert imported(tmp_path, "clrun.cli", "clrun", "-sc", "query=bash", env=env) == []


def test_a_small_run_imports_no_torchvision_and_takes_its_first_step_before_pandas_or_matplotlib(
    tmp_path, warm_catalog
):
    args = [*TINY_STREAM, "backbone=mlp", "method.train.epochs=1", f"hydra.run.dir={tmp_path / 'run'}"]
    code = RUN_PROBE.format(args=args)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert (tmp_path / "run" / "summary.parquet").exists(), done.stderr[-2000:]  # it ran to its end
    assert printed(done.stderr, "AT FIRST STEP ") == [] and printed(done.stderr, "IMPORTED ") == []


def test_the_catalog_holds_what_the_method_classes_say():
    facts = catalog.build()
    assert catalog.catalog() == json.loads(json.dumps(facts))  # the cached file is current
    for name, method in facts.items():
        rebuilt = catalog.rebuild(method["schema"])
        assert catalog.describe_value(rebuilt, type(rebuilt)) == method["schema"], name  # rebuilt as described
    assert facts["ewc"]["budget_key"] == "replay.budget" and facts["rps_net"]["budget_key"] == "memory"
    assert "[class]" in facts["dgmw"]["help"] and "[task; class, domain with task_id]" in facts["cpg"]["help"]


def test_the_config_store_its_copies_share_still_hands_out_copies():
    """`cli.setup` makes Hydra's deep copies of the ConfigStore the store itself (they cost `--help` seconds); that
    is safe only while `ConfigStore.load` copies what it returns: a change to a loaded node must not reach the next
    load, nor the next composed config (a Hydra upgrade that stops copying fails here)."""
    import copy

    from hydra.core.config_store import ConfigStore

    from clrun.cli import compose, setup

    setup()
    store = ConfigStore.instance()
    assert copy.deepcopy(store) is store
    store.load("config_schema.yaml").node.seed = 123
    assert store.load("config_schema.yaml").node.seed == 0
    changed = compose(["seed=5"])
    changed.resume = False
    assert compose().seed == 0 and compose().resume is True
