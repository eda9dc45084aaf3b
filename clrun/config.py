"""The run-level config schema (data, stream, backbone, hardware), range rules, and the one validation entry point.

Each YAML option under `conf/<group>/` starts from its schema (`defaults: [/<name>_schema@_here_]`), so an unknown
key or a value of the wrong type fails at composition, before any work, naming the key. A method's schema is its
own config dataclass, beside its class (`clrun.methods`). Fields carry their range rule in their metadata
(`checked`); `check_config` applies every rule of the composed config before any work.
"""

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clrun.errors import ClrunError


@dataclass(frozen=True)
class Rule:
    """What a field's value must be: `test(value)` holds; `expected` says it in words for the error message."""

    test: Callable[[Any], bool]
    expected: str


AT_LEAST_1 = Rule(lambda v: v >= 1, "at least 1")
NULL_OR_AT_LEAST_1 = Rule(lambda v: v >= 1, "null or at least 1")
POSITIVE = Rule(lambda v: v > 0, "positive")
NON_NEGATIVE = Rule(lambda v: v >= 0, "non-negative")
FRACTION = Rule(lambda v: 0 <= v < 1, "in [0, 1)")


def checked(rule: Rule, default: Any = MISSING, *, factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with a default (or a default `factory`) whose value `check_config` tests with `rule`
    (null values pass: whether a field may be null is its type's business)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"rule": rule})
    return field(default=default, metadata={"rule": rule})


class SplitRule(Enum):
    """How a dataset's classes or inputs are cut into tasks."""

    contiguous = "contiguous"  # classes in label order, classes_per_task each
    random = "random"  # classes shuffled by the stream seed, then cut
    superclass = "superclass"  # CIFAR-100 coarse labels, CPG's order
    permutation = "permutation"  # every task all classes, a fixed pixel permutation each
    rotation = "rotation"  # every task all classes, a fixed rotation each
    label_permutation = "label_permutation"  # every task all images, its labels mapped by a fixed permutation each
    release = "release"  # the tasks the dataset's release fixes (its reader lists them: CORe50, CPG's six datasets)
    tasks = "tasks"  # the tasks `stream.tasks` lists, each classes of its own dataset (CTrL's streams)
    random_tasks = "random_tasks"  # n_tasks such tasks drawn as `stream.random_tasks` says (CTrL's S_long)


class ResizeRule(Enum):
    """How image files are resized to `stream.image_size` when they are decoded into the cache."""

    short_side = "short_side"  # the short side to min(image_size) (aspect kept), then a centre crop to image_size
    stretch = "stretch"  # straight to image_size (aspect not kept; CPG's *_cropped sets, fixed-size faces)


class CropRule(Enum):
    """The random crop of training images when `stream.augment` is on."""

    pad = "pad"  # an input_size window of the image zero-padded by `padding` (CIFAR)
    resized = "resized"  # torchvision's RandomResizedCrop(input_size, scale, ratio)
    none = "none"  # no crop (flip and cutout still apply)


class Normalization(Enum):
    """The per-channel mean and std inputs are normalised with."""

    dataset = "dataset"  # the dataset's own (official training-set values; measured for a reader of your own)
    imagenet = "imagenet"  # ImageNet's (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)
    half = "half"  # 0.5 / 0.5 (CPG's face recipe)
    task = "task"  # each task's own, measured on its training images (CPG's CIFAR code); task scenario only


# The three scenarios of van de Ven & Tolias (2019); `class` is a keyword, hence the functional form.
Scenario = Enum("Scenario", [("task", "task"), ("class", "class"), ("domain", "domain")])
Scenario.__doc__ = """task: task id given at test, a head per task; class: one head over every class seen so far,
no task id; domain: one shared head over the tasks' common labels, no task id."""


@dataclass
class StreamConfig:
    name: str = MISSING
    # a built-in dataset (clrun.data.readers.DATASETS: synthetic, mnist, fashion_mnist, cifar10, cifar100), or a
    # reader of your own: {_target_: your.module.read, ...its keys}, called read(root=data.root, train=True|False,
    # **its keys) and returning uint8 images (N, C, H, W) or (N, H, W) and int labels 0..K-1 (README, Adding a dataset)
    dataset: Any = MISSING
    split: SplitRule = SplitRule.contiguous
    scenario: Scenario = Scenario.task
    n_tasks: int = checked(AT_LEAST_1, 5)
    classes_per_task: int = checked(AT_LEAST_1, 2)
    split_seed: Optional[int] = None  # seed of class order / permutations / subsets (null: the run's seed)
    max_rotation: float = 180.0  # rotation split: task k rotates by k * max_rotation / n_tasks degrees
    train_per_task: Optional[int] = checked(NULL_OR_AT_LEAST_1, None)  # keep at most this many training images
    test_per_task: Optional[int] = checked(NULL_OR_AT_LEAST_1, None)
    # share of each task's training images held out as its validation split (drawn per class, never trained on,
    # evaluated after each task into val_accuracy.parquet; summary `val_acc`); 0: none
    val_fraction: float = checked(FRACTION, 0.0)
    augment: bool = False  # while training: the random `crop`, a horizontal flip (`flip`) and `cutout`
    # image-file datasets: [H, W] the images are decoded to and cached at (required there; tensor datasets: unused)
    image_size: Optional[list[int]] = None
    resize: ResizeRule = ResizeRule.short_side  # how image files are resized to image_size
    # [H, W] the network sees: training crops and test centre crops of that size (null: the images' own size)
    input_size: Optional[list[int]] = None
    crop: CropRule = CropRule.pad
    padding: int = checked(NON_NEGATIVE, 4)  # crop=pad: zero padding on each side
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # crop=resized: range of the crop's area share
    ratio: list[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop=resized: range of its aspect ratio
    flip: bool = True  # random horizontal flip (with augment)
    cutout: int = checked(NON_NEGATIVE, 0)  # side of one Cutout square zeroed per training image (0: none; CPG: 16)
    normalize: Normalization = Normalization.dataset
    # release tasks with their own recipe: {task name: {key: value}}, the keys among TASK_VIEW_KEYS (a task's
    # image_size may be smaller than image_size: its images are centred on a zero border; README, Streams); null: none
    task_views: Optional[dict[str, Any]] = None
    # split tasks: the tasks in order, each {dataset, classes, train_per_class, test_per_class, background, name}
    # (clrun.data.composed.TaskEntry); images brought to the most channels and image_size (default: the largest)
    tasks: Optional[list[Any]] = None
    # split random_tasks: {datasets, steps, train_per_class (per stage a list of options), test_per_class}
    random_tasks: Optional[dict[str, Any]] = None


TASK_VIEW_KEYS = ("image_size", "resize", "augment", "crop", "padding", "scale", "ratio", "flip", "cutout")


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Enum):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class CompileMode(Enum):
    """torch.compile's modes (`hardware.compile=true`)."""

    default = "default"
    reduce_overhead = "reduce-overhead"  # CUDA graphs: replays whole fixed-shape steps (small batches)
    max_autotune = "max-autotune"


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.auto
    precision: Precision = Precision.auto
    channels_last: Optional[bool] = None  # null: on for CUDA
    cudnn_benchmark: Optional[bool] = None  # null: on for CUDA
    # CPU threads for torch (null: OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, else the process's CPU affinity)
    threads: Optional[int] = checked(NULL_OR_AT_LEAST_1, None)
    compile: bool = False  # torch.compile the backbones a method trains
    compile_mode: CompileMode = CompileMode.default  # reduce_overhead: CUDA graphs
    # cap on this process's share of GPU memory (parallel jobs on one GPU)
    memory_fraction: Optional[float] = checked(Rule(lambda v: 0 < v <= 1, "null or in (0, 1]"), None)


class Init(Enum):
    """How a backbone's and its heads' weights start (`backbone.init`)."""

    torch = "torch"  # PyTorch's layer defaults
    # CPG's and PackNet's code (torchvision's VGG): Kaiming-normal (fan_out, ReLU) convolutions, N(0, 0.01) linear
    # layers and heads, zero biases, batch norm 1 / 0; grown weights start the same way
    cpg = "cpg"


class Stem(Enum):
    """The input layers of resnet18, resnet50 and vgg16_bn (`backbone.stem`)."""

    cifar = "cifar"  # ResNet: 3x3 stride-1 conv, no max-pool; VGG16-BN: CPG's CIFAR layout
    imagenet = "imagenet"  # torchvision's layout and state-dict keys (its ImageNet weights load)


@dataclass
class BackboneConfig:
    name: str = MISSING
    width: float = checked(POSITIVE, 1.0)  # channel / unit multiplier
    # a state_dict file for the backbone, or `imagenet`: torchvision's ImageNet-1k file from the torch hub cache
    pretrained: Optional[str] = None
    stem: Optional[Stem] = None  # resnet18, resnet50, vgg16_bn only (null: the backbone's default)
    imagenet_head: bool = False  # task 0's head starts as the pretrained classifier (ImageNet: 1000 classes)
    init: Init = Init.torch


@dataclass
class MlpConfig(BackboneConfig):
    hidden: list[int] = field(default_factory=lambda: [400, 400])  # hidden units per layer at width 1


@dataclass
class LstmConfig(BackboneConfig):
    hidden: int = checked(AT_LEAST_1, 128)  # LSTM units at width 1


@dataclass
class DataConfig:
    root: str = "${oc.env:CLRUN_DATA,'~/.cache/clrun/data'}"  # dataset folder: env CLRUN_DATA, else ~/.cache/clrun/data
    download: bool = False  # fetch missing files with torchvision's downloaders (needs network)
    # decoded image-file datasets: env CLRUN_CACHE, else ~/.cache/clrun/images (README, The decoded-image cache)
    cache: str = "${oc.env:CLRUN_CACHE,'~/.cache/clrun/images'}"
    skip_corrupt: bool = False  # skip image files that cannot be decoded (warned of, and counted in tasks.parquet)


@dataclass
class RunReplayConfig:
    # the replay memory, in images, of whichever method keeps one (its `budget_key`, e.g. `method.replay.budget`);
    # null: the method's own default. One key, so that a sweep over replay methods compares them at one budget.
    budget: Optional[int] = checked(Rule(lambda v: v >= 0, "null or non-negative"), None)


@dataclass
class CheckpointConfig:
    # checkpoints inside a task (clrun.midtask), at the end of an epoch of a phase: when this many minutes passed
    # since the last one, and/or every this many epochs; both null: only after each task. Not in the run's hash.
    every_minutes: Optional[float] = checked(Rule(lambda v: v > 0, "null or positive"), None)
    every_epochs: Optional[int] = checked(Rule(lambda v: v >= 1, "null or at least 1"), None)


@dataclass
class CsvLoggerConfig:
    dir: str = "logs"  # CSV files (hparams, accuracy, epochs, summary), in the run folder


@dataclass
class TensorboardLoggerConfig:
    dir: str = "tensorboard"  # the event files, in the run folder


@dataclass
class WandbLoggerConfig:
    project: str = "clrun"
    entity: Optional[str] = None  # your W&B user or team (null: your default)
    mode: str = "offline"  # offline (files in the run folder; `wandb sync` uploads them) | online | disabled
    dir: str = "."  # below the run folder: wandb writes <dir>/wandb/


@dataclass
class MlflowLoggerConfig:
    # a local SQLite store beside outputs/, artifacts in mlruns/ (MLflow 3 refuses its plain file store);
    # or a tracking server: http://host:5000
    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    experiment: str = "clrun"


@dataclass
class LoggerConfig:
    """The trackers a run reports to (conf/logger/: one or several, `logger=[csv,tensorboard]`); null: not that one."""

    csv: Optional[CsvLoggerConfig] = None
    tensorboard: Optional[TensorboardLoggerConfig] = None
    wandb: Optional[WandbLoggerConfig] = None
    mlflow: Optional[MlflowLoggerConfig] = None


@dataclass
class Config:
    method: Any = MISSING
    backbone: Any = MISSING
    stream: Any = MISSING
    hardware: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    replay: RunReplayConfig = field(default_factory=RunReplayConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    seed: int = 0
    resume: bool = True  # continue from the run folder's checkpoint; false: start the run over


def register_schemas(store: ConfigStore) -> None:
    """Register the run-level schemas (the methods' own: `clrun.methods.register`)."""
    store.store(name="config_schema", node=Config)
    store.store(name="backbone_schema", node=BackboneConfig)
    store.store(name="mlp_backbone_schema", node=MlpConfig)
    store.store(name="lstm_backbone_schema", node=LstmConfig)
    store.store(name="stream_schema", node=StreamConfig)
    store.store(name="hardware_schema", node=HardwareConfig)


# ---- validation ----------------------------------------------------------------------------------------------


def import_target(path: str, key: str) -> Any:
    """The object a `_target_` names (`package.module.Name`); a one-line error naming `key`, with the import's own
    error and the PYTHONPATH hint, when it cannot be imported."""
    module_name, _, name = str(path).rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), name)
    except Exception as error:  # the module's own import errors too (a missing dependency, a syntax error)
        raise ClrunError(
            f"{key}={path} cannot be imported ({type(error).__name__}: {' '.join(str(error).split())}); "
            "the module must be importable: install it, or put the folder that holds it on PYTHONPATH"
        ) from error


def check_config(cfg: DictConfig) -> type:
    """Validate a composed config before any work, with one-line errors naming the key; return the method's class.

    The method's `_target_` is imported and its node merged onto the class's `config_class` (a no-op for the
    built-in methods, whose schemas Hydra composed already; a method from outside clrun gets its defaults and
    type checks here); the scenario must be one the method supports; no key may lie outside its schema (Hydra's
    `+key=` can add some); every field's range rule must hold; `stream.dataset` must be a built-in dataset or
    a reader `_target_`.
    """
    from clrun.data.readers import check_dataset
    from clrun.methods.base import Method

    target = cfg.method.get("_target_") if isinstance(cfg.method, DictConfig) else None
    if target is None:
        raise ClrunError("method._target_ is missing: a method's config must name its class (see README)")
    method_class = import_target(target, "method._target_")
    if not (isinstance(method_class, type) and issubclass(method_class, Method)):
        raise ClrunError(f"method._target_={target} is not a subclass of clrun.methods.Method")
    cfg.method = _typed(method_class.config_class, cfg.method, "method")
    if OmegaConf.is_missing(cfg.method, "name"):
        raise ClrunError(f"method.name is missing: give the method of {target} a name (`name: ...` in its YAML)")
    if "checkpoint" in cfg:
        check_ranges(cfg.checkpoint, "checkpoint")
    budget = cfg.get("replay", {}).get("budget")
    if budget is not None:
        check_ranges(cfg.replay, "replay")
        if method_class.budget_key() is None:
            raise ClrunError(
                f"replay.budget={budget}: method {cfg.method.name} keeps no replay memory; "
                "leave replay.budget out of its runs (or sweep it with replay methods only)"
            )
        OmegaConf.update(cfg.method, method_class.budget_key(), budget, merge=False)
    scenario = cfg.stream.scenario.value
    supported = method_class.supported_scenarios(cfg.method)
    if scenario not in supported:
        hint = "" if "task_id" not in cfg.method else "; method.task_id=confidence|entropy adds class and domain"
        raise ClrunError(
            f"method {cfg.method.name} does not support stream.scenario={scenario}; "
            f"it supports {', '.join(supported)}{hint}"
        )
    if cfg.backbone.get("imagenet_head") and not method_class.starts_head_from_classifier:
        raise ClrunError(
            f"backbone.imagenet_head=true: method {cfg.method.name} builds its own heads and cannot start task 0's "
            f"from the pretrained classifier; set backbone.imagenet_head=false"
        )
    check_known_keys(cfg)
    check_ranges(cfg)
    check_dataset(cfg.stream)
    return method_class


def _typed(schema: type, node: DictConfig, path: str) -> DictConfig:
    """`node` merged onto `schema`'s defaults; one-line errors for keys outside it and values of the wrong type."""
    if OmegaConf.get_type(node) is schema:
        return node
    check_known_keys(node, path)  # a built-in method's node is typed by its catalog schema (`clrun.catalog`)
    try:
        return OmegaConf.merge(OmegaConf.structured(schema), OmegaConf.to_container(node, enum_to_str=True))
    except OmegaConfBaseException as error:
        key = f"{path}.{error.full_key}" if getattr(error, "full_key", None) else path
        known = ", ".join(f.name for f in dataclasses.fields(schema))
        first = str(error).splitlines()[0]
        raise ClrunError(f"{key}: {first} (the keys of {schema.__name__}: {known})") from None


def with_changes(node: DictConfig, changes: Any, path: str) -> DictConfig:
    """`node` (a typed config) with `changes` merged in, checked as `check_config` checks a run's config; one-line
    errors name the key under `path` (e.g. `method.task_overrides.cars`)."""
    if not isinstance(changes, DictConfig | dict):
        raise ClrunError(f"{path}: expected a mapping of keys to change, e.g. {{train: {{lr: 0.01}}}}, not {changes!r}")
    try:
        merged = OmegaConf.merge(node, changes)
    except OmegaConfBaseException as error:
        key = str(getattr(error, "full_key", "") or "").removeprefix(f"{node._get_full_key(None)}.")
        raise ClrunError(f"{path}.{key}: {str(error).splitlines()[0]}" if key else f"{path}: {error}") from None
    check_known_keys(merged, path)
    check_ranges(merged, path)
    return merged


def check_known_keys(node: DictConfig, path: str = "") -> None:
    """Fail on keys outside the schema, such as ones force-added with Hydra's `+key=value`."""
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        full_key = f"{path}.{key}" if path else str(key)
        if known is not None and key not in known:
            raise ClrunError(f"unknown config key {full_key}; valid keys there: {', '.join(sorted(known))}")
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            check_known_keys(child, full_key)


def check_ranges(node: DictConfig, path: str = "") -> None:
    """Fail on the first field whose value breaks its range rule (`checked`), anywhere below `node`."""
    schema = OmegaConf.get_type(node)
    fields = {f.name: f for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else {}
    for key in node.keys():
        full_key = f"{path}.{key}" if path else str(key)
        child = node._get_node(key)
        if isinstance(child, DictConfig):
            check_ranges(child, full_key)
            continue
        rule = fields[key].metadata.get("rule") if key in fields else None
        value = node[key]
        if rule is not None and value is not None and not rule.test(value):
            shown = list(value) if isinstance(value, ListConfig) else value
            raise ClrunError(f"{full_key}={shown} is invalid: it must be {rule.expected}")
