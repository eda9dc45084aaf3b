"""The built-in methods and the public method API.

Every module in this package but `base` (and the `parts` package) is one method: it defines exactly one
`Method` subclass, whose `config_class` is the method's config dataclass. `register` stores each method's
schema in Hydra's ConfigStore as `<module>_method_schema` (with `_target_` and `name` filled in), which
`conf/method/<module>.yaml` starts from; `describe` lists the methods for `clrun --help`. Both read the methods'
facts from `clrun.catalog` (cached: no method module, and so no torch, is imported), and so does importing this
package: the method API (`Method`, ...) is imported from `base` when first used.
"""

import importlib
import inspect
import pkgutil
from functools import cache

from hydra.core.config_store import ConfigNode, ConfigStore
from omegaconf import OmegaConf

from clrun import catalog

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
API = {"Method", "MethodConfig", "PerTaskMethodConfig", "SharedModelMethod", "TaskId", "mixed_task_loss", "task_loss"}


def __getattr__(name: str):
    """The method API from `base` on first use (it imports torch)."""
    if name not in API:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.base"), name)


@cache
def method_classes() -> dict[str, type]:
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
    from clrun.methods.base import Method

    return issubclass(candidate, Method) and candidate.__module__ == module


class _LazySchema(ConfigNode):
    """A ConfigStore entry whose config is built when Hydra first loads it: a composition loads one or two of the
    methods' schemas, and building all of them takes longer than the rest of `clrun --help`."""

    def __init__(self, name: str, described: dict):
        self.name, self.group, self.package, self.provider = f"{name}.yaml", None, None, None
        self.described = described

    @property
    def node(self):
        if "_node" not in vars(self):
            self._node = OmegaConf.structured(catalog.rebuild(self.described))
        return self._node

    @node.setter
    def node(self, value):  # ConfigStore.load sets its copy's
        self._node = value


def register(store: ConfigStore) -> None:
    """Store every built-in method's schema as `<module>_method_schema`, its `_target_` and `name` filled in (an
    equivalent of its `config_class`, rebuilt from the catalog when first loaded)."""
    for name, facts in catalog.catalog().items():
        store.repo[f"{name}_method_schema.yaml"] = _LazySchema(f"{name}_method_schema", facts["schema"])


def scenarios(method_class: type) -> str:
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


def help_line(name: str, method_class: type) -> str:
    """A method's `clrun --help` line: its name, its scenarios and the first paragraph of its module's docstring."""
    doc = (inspect.getmodule(method_class).__doc__ or "").strip()
    return f"  {name:12s} [{scenarios(method_class)}] {' '.join(doc.split(chr(10) * 2)[0].split())}"


def describe() -> str:
    """One line per built-in method (`help_line`), from the catalog."""
    return "\n".join(facts["help"] for facts in catalog.catalog().values())
