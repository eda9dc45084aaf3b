"""The structure ARCHITECTURE.md describes: what each package may import, one home per method (its module and at
most one YAML holding only what differs from its config's defaults), the registry."""

import ast
import dataclasses
from pathlib import Path

import pytest
from conftest import CONF, compose_config
from omegaconf import DictConfig, OmegaConf

import clrun.config
from clrun import methods
from clrun.methods import Method, MethodConfig

PACKAGE = Path(clrun.__file__).parent
METHOD_MODULES = set(methods.method_classes())

# what each part of clrun may import from clrun (ARCHITECTURE.md, "Packages and what each may import")
MAY_IMPORT = {
    "clrun.errors": set(),
    "clrun.metrics": set(),
    "clrun.config": {"clrun.errors"},
    "clrun.catalog": set(),
    "clrun.naming": {"clrun", "clrun.errors", "clrun.config", "clrun.catalog"},
    "clrun.models": {"clrun.errors", "clrun.models"},
    "clrun.data": {"clrun.errors", "clrun.config", "clrun.data"},
    "clrun.hardware": {"clrun.errors", "clrun.config", "clrun.models"},
    "clrun.midtask": {"clrun.errors", "clrun.results"},
    "clrun.results": {"clrun", "clrun.errors", "clrun.metrics"},
    "clrun.train": {"clrun.errors", "clrun.metrics", "clrun.config", "clrun.data", "clrun.hardware"},
    "clrun.methods.base": {"clrun.errors", "clrun.config", "clrun.data", "clrun.hardware", "clrun.models"}
    | {"clrun.results", "clrun.train"},
    "clrun.trackers": {"clrun.errors", "clrun.results", "clrun.train"},
    "clrun.run": {"clrun", "clrun.errors", "clrun.config", "clrun.data", "clrun.hardware", "clrun.results"}
    | {"clrun.midtask", "clrun.train", "clrun.trackers", "clrun.naming"},
    "clrun.sweeps": {"clrun.results"},
    "clrun.evaluate": {"clrun", "clrun.errors", "clrun.results", "clrun.run"},
    "clrun.cli": {"clrun", "clrun.errors", "clrun.config", "clrun.run", "clrun.methods", "clrun.sweeps"}
    | {"clrun.evaluate", "clrun.naming"},
    "clrun.report": {"clrun.results", "clrun.sweeps", "clrun.naming"},
    "clrun.import_cpg": {"clrun", "clrun.errors", "clrun.config", "clrun.models", "clrun.methods", "clrun.results"}
    | {"clrun.run", "clrun.cli", "clrun.naming"},
}
MAY_IMPORT["clrun.methods.parts"] = MAY_IMPORT["clrun.methods.base"] | {"clrun.methods.base", "clrun.methods.parts"}
MAY_IMPORT["clrun.methods"] = MAY_IMPORT["clrun.methods.parts"] | {"clrun.catalog"}  # the registry, every method
# the one place the layers meet: check_config imports the method base class and the dataset readers to check them
LATE_IMPORTS = {("clrun.config", "clrun.methods.base"), ("clrun.config", "clrun.data.readers")}
LATE_IMPORTS |= {("clrun.catalog", "clrun.methods")}  # and the catalog builds the methods' facts from their classes


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def clrun_imports(path: Path) -> set[str]:
    """Every clrun module `path` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "clrun":
            found |= {node.module} if node.module != "clrun" else {f"clrun.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "clrun"}
    return found


def within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


SOURCES = sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: module_name(p))
def test_each_module_imports_only_what_its_layer_may(path):
    module = module_name(path)
    if module == "clrun":
        return
    rule = max((prefix for prefix in MAY_IMPORT if within(module, prefix)), key=len)
    for imported in clrun_imports(path):
        if (module, imported) in LATE_IMPORTS:
            continue
        allowed = any(within(imported, prefix) for prefix in MAY_IMPORT[rule] - {"clrun"}) or imported == "clrun"
        assert allowed, f"{module} imports {imported}; {rule} may import {sorted(MAY_IMPORT[rule])}"


def test_no_method_module_imports_another_and_no_part_imports_a_method():
    for path in (PACKAGE / "methods").rglob("*.py"):
        module = module_name(path)
        for imported in clrun_imports(path):
            name = imported.removeprefix("clrun.methods.")
            if name in METHOD_MODULES:
                assert imported == module, f"{module} imports the method module {imported}"


def test_every_method_module_defines_one_method_and_has_a_yaml_starting_from_its_schema():
    assert len(METHOD_MODULES) >= 21
    for name, method_class in methods.method_classes().items():
        assert issubclass(method_class, Method) and dataclasses.is_dataclass(method_class.config_class)
        assert issubclass(method_class.config_class, MethodConfig), name
        yaml = OmegaConf.load(CONF / "method" / f"{name}.yaml")
        assert f"/{name}_method_schema@_here_" in yaml.defaults, name
        cfg = compose_config(f"method={name}").method
        assert OmegaConf.get_type(cfg).__name__ == method_class.config_class.__name__  # its catalog equivalent
        typed = clrun.config._typed(method_class.config_class, cfg, "method")  # as check_config types it
        assert OmegaConf.get_type(typed) is method_class.config_class and OmegaConf.to_yaml(typed) == OmegaConf.to_yaml(
            cfg
        )
        assert cfg._target_ == f"clrun.methods.{name}.{method_class.__name__}" and cfg.name == name
        assert method_class.__doc__ or (PACKAGE / "methods" / f"{name}.py").read_text().startswith('"""')


def test_config_py_holds_no_methods_schema():
    schemas = {
        name
        for name, value in vars(clrun.config).items()
        if isinstance(value, type) and dataclasses.is_dataclass(value)
    }
    assert schemas == {
        "Rule",
        "StreamConfig",
        "HardwareConfig",
        "BackboneConfig",
        "MlpConfig",
        "LstmConfig",
        "DataConfig",
        "RunReplayConfig",
        "CheckpointConfig",
        "LoggerConfig",
        "CsvLoggerConfig",
        "TensorboardLoggerConfig",
        "WandbLoggerConfig",
        "MlflowLoggerConfig",
        "Config",
    }


def flat(node, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "method").glob("*.yaml")))
def test_no_method_yaml_repeats_a_default(option):
    """Each key a method's YAML sets differs from what it would be without the YAML: its schema's default (with
    `_target_` and `name` filled in by the registry), or for a preset, the value of the option it starts from."""
    yaml = OmegaConf.load(CONF / "method" / f"{option}.yaml")
    (parent,) = [entry for entry in yaml.defaults if entry != "_self_"]
    if parent.startswith("/"):
        schema_name = parent.removeprefix("/").removesuffix("_method_schema@_here_")
        method_class = methods.method_classes()[schema_name]
        base = OmegaConf.structured(method_class.config_class(_target_="", name=schema_name))
    else:
        base = compose_config(f"method={parent}").method
    base = flat(OmegaConf.to_container(base, enum_to_str=True))
    values = flat(OmegaConf.to_container(DictConfig({k: v for k, v in yaml.items() if k != "defaults"})))
    repeated = {key: value for key, value in values.items() if base.get(key, object()) == value}
    assert not repeated, f"conf/method/{option}.yaml repeats defaults: {repeated}"
    assert len((CONF / "method" / f"{option}.yaml").read_text().splitlines()) <= 15  # short


def test_help_lists_every_method_with_its_description():
    text = methods.describe()
    lines = text.splitlines()
    assert [line.split()[0] for line in lines] == sorted(METHOD_MODULES)
    assert "CPG: Compacting, Picking and Growing" in text and all(len(line.split()) > 3 for line in lines)
