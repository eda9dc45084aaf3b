"""Datasets, task streams and the device-resident batch path."""

from clrun.data.batches import iterate, prepare
from clrun.data.stream import Split, Stream, Task
from clrun.data.streams import build_stream

__all__ = ["Split", "Stream", "Task", "build_stream", "iterate", "prepare"]
