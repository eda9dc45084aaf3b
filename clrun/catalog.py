"""What the `clrun` command needs to know of the built-in methods before it runs one, without importing them (each
method module imports torch, which takes seconds): each method's schema, replay-budget key and `--help` line.

The facts come from the method classes themselves (`clrun.methods.method_classes`): the first `clrun` after a change
to clrun's sources imports them all and writes the facts to a JSON file in the user's cache folder, keyed by a hash
of the sources; later commands read that file. A schema is stored as its fields' types and values, and rebuilt as
an equivalent dataclass (same name, field names, types, enums and defaults), so Hydra composes and type-checks a
config exactly as with the method's own `config_class`; `check_config` then merges the node onto that class.
"""

import copy
import dataclasses
import functools
import hashlib
import json
import os
import sys
import tempfile
from enum import Enum
from functools import cache
from pathlib import Path
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

PACKAGE = Path(__file__).parent
PLAIN = {"int": int, "float": float, "bool": bool, "str": str, "any": Any}


def cache_dir() -> Path:
    """clrun's cache folder: $XDG_CACHE_HOME/clrun, else ~/.cache/clrun."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clrun"


def sources_hash() -> str:
    """A hash of every clrun source file (the catalog is stale when any of them changed) and the Python version."""
    digest = hashlib.sha1(sys.version.encode())
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(str(path.relative_to(PACKAGE)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


@cache
def catalog() -> dict[str, dict]:
    """Each built-in method's name and facts: `target` (its class), `schema` (see `describe_value`), `budget_key`,
    `help` (its `clrun --help` line); read from the cache file, or built from the classes and written there."""
    path = cache_dir() / f"methods-{sources_hash()}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        pass
    facts = build()
    try:  # an atomic write: concurrent commands write the same text
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as tmp:
            json.dump(facts, tmp)
        os.replace(tmp.name, path)
    except OSError:
        pass  # a read-only home: the next command builds the facts again
    return facts


def build() -> dict[str, dict]:
    """The facts of every built-in method, from its class (imports every method module, and so torch)."""
    from clrun.methods import help_line, method_classes  # here: the slow import the cache file spares

    facts = {}
    for name, method_class in method_classes().items():
        target = f"{method_class.__module__}.{method_class.__name__}"
        node = method_class.config_class(_target_=target, name=name)
        facts[name] = {
            "target": target,
            "schema": describe_value(node, type(node)),
            "budget_key": method_class.budget_key(),
            "help": help_line(name, method_class),
        }
    return facts


def describe_type(hint) -> Any:
    """A field's type as JSON: "int", "float", "bool", "str", "any", ["optional", t], ["list", t], ["dict", k, v],
    ["enum", name, [[member, value], ...], "module:qualname"] or ["dataclass", name, [[field, t], ...]]."""
    if hint in PLAIN.values():
        return next(key for key, value in PLAIN.items() if value is hint)
    origin, args = get_origin(hint), get_args(hint)
    if origin is Union and type(None) in args and len(args) == 2:
        return ["optional", describe_type(next(a for a in args if a is not type(None)))]
    if origin is list:
        return ["list", describe_type(args[0])]
    if origin is dict:
        return ["dict", describe_type(args[0]), describe_type(args[1])]
    if isinstance(hint, type) and issubclass(hint, Enum):
        return ["enum", hint.__name__, [[m.name, m.value] for m in hint], f"{hint.__module__}:{hint.__qualname__}"]
    if dataclasses.is_dataclass(hint):
        hints = get_type_hints(hint)
        return ["dataclass", hint.__name__, [[f.name, describe_type(hints[f.name])] for f in dataclasses.fields(hint)]]
    raise TypeError(f"the catalog cannot describe the config type {hint!r}")


def describe_value(value, hint) -> dict:
    """`value` (of type `hint`) as JSON: {"type": describe_type(hint), "value": ...}, enums by member name and
    dataclasses as {field: described value}."""
    return {"type": describe_type(hint), "value": _plain(value)}


def _plain(value):
    if isinstance(value, Enum):
        return value.name
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def rebuild(described: dict):
    """The config object `described` (from `describe_value`): an instance of a dataclass equivalent to the one it was
    made from, whose defaults are the described values."""
    return _value(described["type"], described["value"])


def _type(desc):
    if isinstance(desc, str):
        return PLAIN[desc]
    kind, *rest = desc
    if kind == "optional":
        return Optional[_type(rest[0])]
    if kind == "list":
        return list[_type(rest[0])]
    if kind == "dict":
        return dict[_type(rest[0]), _type(rest[1])]
    if kind == "enum":
        module, _, qualname = rest[2].partition(":")
        if module in sys.modules:  # its method module is imported already: the real enum, which its code compares to
            return functools.reduce(getattr, qualname.split("."), sys.modules[module])
        return _enum(rest[0], tuple(tuple(member) for member in rest[1]))
    raise TypeError(f"a dataclass type is rebuilt with its values: {desc!r}")


@cache
def _enum(name: str, members: tuple) -> type[Enum]:
    """A stand-in for an enum whose module is not imported (it would import torch): same name, members, values."""
    return Enum(name, list(members))


def _value(desc, value):
    """`value` rebuilt as a value of the type `desc`."""
    if value is None:
        return None
    kind = desc if isinstance(desc, str) else desc[0]
    if kind == "optional":
        return _value(desc[1], value)
    if kind == "enum":
        return _type(desc)[value]
    if kind == "list":
        return [_value(desc[1], v) for v in value]
    if kind == "dict":
        return {k: _value(desc[2], v) for k, v in value.items()}
    if kind == "dataclass":
        fields = []
        for field_name, field_desc in desc[2]:
            default = _value(field_desc, value[field_name])
            hint = type(default) if _is_dataclass_desc(field_desc) else _type(field_desc)
            fields.append((field_name, hint, dataclasses.field(default_factory=_constant(default))))
        return dataclasses.make_dataclass(desc[1], fields, namespace={"__module__": __name__})()
    return value


def _is_dataclass_desc(desc) -> bool:
    return isinstance(desc, list) and desc[0] == "dataclass"


def _constant(value):
    """A default factory returning a fresh copy of `value` (a list, dict or config object is mutable)."""
    return lambda: copy.deepcopy(value)
