"""A run's name and identity: the part of its config that decides its results, and the folder name hashed from it
(Hydra's `hydra.run.dir` reads `clrun_run_name`, so this is light: no torch)."""

import hashlib
import json

from omegaconf import OmegaConf

from clrun import catalog
from clrun.config import import_target
from clrun.errors import ClrunError

RUNS_DIR = "outputs/runs"  # where runs go (conf/config.yaml writes it too: hydra.run.dir and hydra.sweep.dir)
IDENTITY_KEYS = ("method", "backbone", "stream", "hardware", "seed")
# hardware keys that change how fast a run goes, not what it learns (at most floating-point rounding, as threads do):
# left out of the identity, so the same run on 2 threads or compiled lands in the same folder; precision stays in
SPEED_KEYS = ("threads", "compile", "compile_mode", "cudnn_benchmark", "channels_last", "memory_fraction")


def identity(cfg) -> dict:
    """The part of the config that decides a run's results (not `data.root`, not `resume`, not the hardware's
    `SPEED_KEYS`), resolved; a null `stream.task_views` and a zero `stream.val_fraction` left out, so that runs made
    before those keys keep their folders."""
    value = {key: container(cfg[key]) for key in IDENTITY_KEYS}
    for key in SPEED_KEYS:
        value["hardware"].pop(key, None)
    if value["stream"].get("task_views", {}) is None:
        del value["stream"]["task_views"]
    if value["stream"].get("val_fraction", 1) == 0:
        del value["stream"]["val_fraction"]
    budget = OmegaConf.select(cfg, "replay.budget", default=None)
    if budget is not None:  # the method's own key: `replay.budget=200` and `method.replay.budget=200` are one run
        _set_budget(value["method"], budget)
    return value


def _set_budget(method: dict, budget: int) -> None:
    """Write `budget` at the method's `budget_key` in its plain config (nothing for a method without a memory,
    or one whose class cannot be imported: `check_config` says so); a built-in method's from the catalog."""
    target = method.get("_target_")
    built_in = {facts["target"]: facts["budget_key"] for facts in catalog.catalog().values()}
    try:
        key = built_in[target] if target in built_in else import_target(target, "method._target_").budget_key()
    except (ClrunError, AttributeError):
        return
    if key is None:
        return
    *parents, leaf = key.split(".")
    for parent in parents:
        method = method[parent]
    method[leaf] = budget


def container(value):
    """A config value as plain Python, interpolations resolved (in the context of the whole config)."""
    return OmegaConf.to_container(value, resolve=True, enum_to_str=True) if OmegaConf.is_config(value) else value


def _digest(value: dict) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True).encode()).hexdigest()[:8]


def run_name(cfg) -> str:
    """The run's folder name and id: method, stream, backbone, seed and a hash of the whole identity."""
    method = OmegaConf.select(cfg, "method.name", default=None, throw_on_missing=False) or "method"
    return f"{method}-{cfg.stream.name}-{cfg.backbone.name}-seed{cfg.seed}-{_digest(identity(cfg))}"


def config_id(cfg) -> str:
    """A hash of the identity without the seed: runs that differ only in seed share it."""
    return _digest({key: value for key, value in identity(cfg).items() if key != "seed"})
