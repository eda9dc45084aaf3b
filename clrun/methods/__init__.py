"""The built-in methods and the public method API.

Every module in this package but `base` (and the `parts` package) is one method: it defines exactly one
`Method` subclass, whose `config_class` is the method's config dataclass. `register` stores each method's
schema in Hydra's ConfigStore as `<module>_method_schema` (with `_target_` and `name` filled in), which
`conf/method/<module>.yaml` starts from; `describe` lists the methods for `clrun --help`.
"""

import importlib
import inspect
import pkgutil
from functools import cache

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from clrun.methods.base import (
    Method,
    MethodConfig,
    PerTaskMethodConfig,
    SharedModelMethod,
    TaskId,
    mixed_task_loss,
    task_loss,
)

__all__ = [
    "Method",
    "MethodConfig",
    "PerTaskMethodConfig",
    "SharedModelMethod",
    "TaskId",
    "describe",
    "method_classes",
    "mixed_task_loss",
    "register",
    "task_loss",
]

NOT_METHODS = {"base", "parts"}


@cache
def method_classes() -> dict[str, type[Method]]:
    """Each built-in method module's name and its `Method` subclass, in name order."""
    found = {}
    for module_info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if module_info.name in NOT_METHODS:
            continue
        module = importlib.import_module(f"{__name__}.{module_info.name}")
        classes = [c for _, c in inspect.getmembers(module, inspect.isclass) if _defines_method(c, module.__name__)]
        if len(classes) != 1:
            raise TypeError(f"{module.__name__} must define exactly one Method subclass, found {len(classes)}")
        found[module_info.name] = classes[0]
    return found


def _defines_method(candidate: type, module: str) -> bool:
    return issubclass(candidate, Method) and candidate.__module__ == module


def register(store: ConfigStore) -> None:
    """Store every built-in method's schema as `<module>_method_schema`, its `_target_` and `name` filled in."""
    for name, method_class in method_classes().items():
        target = f"{method_class.__module__}.{method_class.__name__}"
        store.store(name=f"{name}_method_schema", node=method_class.config_class(_target_=target, name=name))


def scenarios(method_class: type[Method]) -> str:
    """The scenarios a method runs in under its default config, and those a `task_id` rule adds, e.g.
    "task; class, domain with task_id"."""
    cfg = OmegaConf.structured(method_class.config_class())
    plain = method_class.supported_scenarios(cfg)
    text = ", ".join(plain)
    if "task_id" in cfg:
        cfg.task_id = "entropy"
        added = [s for s in method_class.supported_scenarios(cfg) if s not in plain]
        text += f"; {', '.join(added)} with task_id" if added else ""
    return text


def describe() -> str:
    """One line per built-in method: its name, its scenarios and the first paragraph of its module's docstring."""
    lines = []
    for name, method_class in method_classes().items():
        doc = (inspect.getmodule(method_class).__doc__ or "").strip()
        lines.append(f"  {name:12s} [{scenarios(method_class)}] {' '.join(doc.split(chr(10) * 2)[0].split())}")
    return "\n".join(lines)
