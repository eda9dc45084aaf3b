"""clrun's configs: this folder ships as the package `clrun.conf` (pyproject.toml), found by Hydra as pkg://clrun.conf."""
