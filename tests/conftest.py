"""Shared test helpers: composing configs, and the real datasets in ../shared/data."""

import os
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

import clrun.cli  # noqa: F401  (registers the schemas and the run-name resolver)

CONF = Path(__file__).resolve().parents[1] / "conf"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout


def compose_config(*overrides: str):
    """The config `clrun <overrides>` would run."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def needs_shared(*parts: str) -> pytest.MarkDecorator:
    """Skip a test when ../shared/data/<parts> is absent, except in CI (CI=true), where it must be there."""
    present = SHARED_DATA.joinpath(*parts).exists()
    if not present and os.environ.get("CI") == "true":
        raise RuntimeError(f"CI needs the real data at {SHARED_DATA.joinpath(*parts)}")
    return pytest.mark.skipif(not present, reason=f"needs {SHARED_DATA.joinpath(*parts)}")
