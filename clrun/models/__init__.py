"""Backbones (feature extractors) and per-task heads."""

from clrun.models.backbones import build_backbone
from clrun.models.heads import MultiHead, TaskModel

__all__ = ["MultiHead", "TaskModel", "build_backbone"]
