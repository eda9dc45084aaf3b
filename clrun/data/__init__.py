"""Datasets, task streams and the device-resident batch path."""

from clrun.data.batches import iterate, prepare
from clrun.data.build import build_stream
from clrun.data.stream import Split, Stream, Task

__all__ = ["Split", "Stream", "Task", "build_stream", "iterate", "prepare"]
