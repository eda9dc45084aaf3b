"""Structured configs: one dataclass per config group, registered in Hydra's ConfigStore.

Each YAML option under `conf/<group>/` starts from its schema
(`defaults: [/<name>_schema@_here_]`), so an unknown key or a value of
the wrong type fails at composition, before any work, naming the key.
"""

import dataclasses
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from clrun.errors import ClrunError


class Optimizer(Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Schedule(Enum):
    constant = "constant"
    multistep = "multistep"
    cosine = "cosine"


@dataclass
class OptimizerConfig:
    """An optimizer and its per-epoch learning-rate schedule (for a second parameter group, e.g. masks)."""

    optimizer: Optimizer = Optimizer.adam
    lr: float = 0.001
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 0.0
    schedule: Schedule = Schedule.constant
    milestones: list[int] = field(default_factory=list)  # epochs where multistep multiplies lr by gamma
    gamma: float = 0.1
    gammas: list[float] = field(default_factory=list)  # multistep: a factor per milestone instead of gamma


@dataclass
class TrainConfig(OptimizerConfig):
    """One training phase: optimizer, learning-rate schedule, epochs, batch size."""

    epochs: int = 2
    batch_size: int = 128


@dataclass
class MethodConfig:
    """Fields every method has; `_target_` names the class Hydra loads."""

    _target_: str = MISSING
    name: str = MISSING
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int = 1000


@dataclass
class JointConfig(MethodConfig):
    reinit: bool = True  # start each task's joint training from a fresh model


class PruneSchedule(Enum):
    fixed = "fixed"  # release the same fraction `prune` of each task's weights
    equal_share = "equal_share"  # task k of N keeps 1/(N-k+1) of its pool: equal capacity for every task


def _train(**fields) -> TrainConfig:
    return TrainConfig(**fields)


# CPG's CIFAR-100 recipe (ivclab/CPG experiment1): SGD-Nesterov, lr 1e-2 x0.1 at epochs 50 and 80, wd 4e-5, batch 32
_CPG_TRAIN = dict(
    epochs=100,
    batch_size=32,
    optimizer=Optimizer.sgd,
    lr=1e-2,
    momentum=0.9,
    nesterov=True,
    weight_decay=4e-5,
    schedule=Schedule.multistep,
    milestones=[50, 80],
    gamma=0.1,
)


@dataclass
class PackNetConfig(MethodConfig):
    """PackNet as in CPG's CIFAR-100 port (experiment1/PackNet_cifar100.sh)."""

    train: TrainConfig = field(default_factory=lambda: _train(**_CPG_TRAIN))
    retrain: TrainConfig = field(
        default_factory=lambda: _train(**{**_CPG_TRAIN, "epochs": 30, "lr": 1e-3, "milestones": [25]})
    )
    prune: float = 0.6  # fraction of the task's weights released by the one-shot magnitude prune
    prune_schedule: PruneSchedule = PruneSchedule.fixed
    prune_last: bool = True  # prune the last task too (CPG's port does; PackNet's own scripts do not)


@dataclass
class PiggybackConfig(MethodConfig):
    """Piggyback: task 1 trains the backbone, later tasks learn binary masks over it (arunmallya/piggyback)."""

    train: TrainConfig = field(default_factory=lambda: _train(**_CPG_TRAIN))  # task 1's backbone training
    mask_train: TrainConfig = field(
        default_factory=lambda: _train(
            epochs=30,
            batch_size=32,
            optimizer=Optimizer.adam,
            lr=1e-4,
            schedule=Schedule.multistep,
            milestones=[15],
            gamma=0.1,
        )
    )  # masks and head of tasks >= 2 (Adam 1e-4, x0.1 every 15 epochs)
    mask_init: float = 1e-2
    threshold: float = 5e-3
    train_bn: bool = False  # train per-task batch norm on tasks >= 2 (Piggyback's default: frozen)


@dataclass
class CPGConfig(MethodConfig):
    """CPG (ivclab/CPG experiment1/CPG_cifar100_scratch_mul_1.5.sh); PAE is this with picking off and max 2.0."""

    train: TrainConfig = field(default_factory=lambda: _train(**_CPG_TRAIN))
    mask_train: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            optimizer=Optimizer.adam,
            lr=5e-4,
            schedule=Schedule.multistep,
            milestones=[50, 70],
            gammas=[0.2, 0.0],
        )
    )  # picking masks during `train` (epochs follow `train`)
    prune_train: TrainConfig = field(
        default_factory=lambda: _train(
            **{**_CPG_TRAIN, "epochs": 20, "lr": 1e-3, "schedule": Schedule.constant, "milestones": []}
        )
    )
    sparsities: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    pruning_interval: int = 4  # epochs of the cubic sparsity ramp in each gradual-pruning step
    pruning_frequency: int = 10  # iterations between mask updates during the ramp
    retrain: TrainConfig = field(
        default_factory=lambda: _train(
            **{**_CPG_TRAIN, "epochs": 30, "lr": 1e-3, "schedule": Schedule.constant, "milestones": []}
        )
    )
    retrain_mask: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(optimizer=Optimizer.adam, lr=1e-4)
    )  # picking masks in the retrain pass (epochs follow `retrain`)
    retrain_patience: int = 5  # stop the retrain pass after this many epochs without a gain
    retrain_pass: bool = True  # the picking-mask retrain pass after pruning (tasks >= 2)
    picking: bool = True  # learn picking masks over earlier tasks' weights (false: PAE, use them all)
    mask_init: float = 1e-2
    threshold: float = 5e-3
    max_multiplier: float = 1.5  # largest parameter multiplier growth may reach (channels scale by its sqrt)
    grow_step: float = 0.5  # multiplier added per growth
    min_train_acc: float = 0.95  # a training or pruning result counts only above this training accuracy
    goals: Optional[str] = (
        None  # accuracy goals: a number, a JSON file {task: acc}, or a run folder; null: unpruned acc
    )


class SplitRule(Enum):
    """How a dataset's classes or inputs are cut into tasks."""

    contiguous = "contiguous"  # classes in label order, classes_per_task each
    random = "random"  # classes shuffled by the stream seed, then cut
    superclass = "superclass"  # CIFAR-100 coarse labels, CPG's order
    permutation = "permutation"  # every task all classes, a fixed pixel permutation each
    rotation = "rotation"  # every task all classes, a fixed rotation each


class Dataset(Enum):
    synthetic = "synthetic"
    mnist = "mnist"
    cifar10 = "cifar10"
    cifar100 = "cifar100"


@dataclass
class StreamConfig:
    name: str = MISSING
    dataset: Dataset = MISSING
    split: SplitRule = SplitRule.contiguous
    n_tasks: int = 5
    classes_per_task: int = 2
    split_seed: Optional[int] = None  # seed of class order / permutations / subsets (null: the run's seed)
    max_rotation: float = 180.0  # rotation split: task k rotates by k * max_rotation / n_tasks degrees
    train_per_task: Optional[int] = None  # keep at most this many training images per task (null: all)
    test_per_task: Optional[int] = None
    augment: bool = False  # random crop (padding 4) and horizontal flip while training


class Device(Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(Enum):
    auto = "auto"  # bf16 on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


@dataclass
class HardwareConfig:
    name: str = MISSING
    device: Device = Device.auto
    precision: Precision = Precision.auto
    channels_last: Optional[bool] = None  # null: on for CUDA
    cudnn_benchmark: Optional[bool] = None  # null: on for CUDA
    threads: Optional[int] = None  # CPU threads for torch (null: torch's default)


@dataclass
class BackboneConfig:
    name: str = MISSING
    width: float = 1.0  # channel / unit multiplier
    pretrained: Optional[str] = None  # path to a state_dict for the backbone (e.g. torchvision ResNet50)


@dataclass
class MlpConfig(BackboneConfig):
    hidden: list[int] = field(default_factory=lambda: [400, 400])  # hidden units per layer at width 1


@dataclass
class DataConfig:
    root: str = "${oc.env:CLRUN_DATA,'~/.cache/clrun/data'}"  # dataset folder: env CLRUN_DATA, else ~/.cache/clrun/data
    download: bool = False  # fetch missing files with torchvision's downloaders (needs network)


@dataclass
class Config:
    method: Any = MISSING
    backbone: Any = MISSING
    stream: Any = MISSING
    hardware: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    resume: bool = True  # continue from the run folder's checkpoint; false: start the run over


# (key, test, what the value must be): checked before any work
RANGES = [
    ("method.train.epochs", lambda v: v >= 1, "at least 1"),
    ("method.train.batch_size", lambda v: v >= 1, "at least 1"),
    ("method.train.lr", lambda v: v > 0, "positive"),
    ("method.train.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("method.train.weight_decay", lambda v: v >= 0, "non-negative"),
    ("method.train.gamma", lambda v: v > 0, "positive"),
    ("method.train.gammas", lambda v: all(g >= 0 for g in v), "a list of non-negative factors"),
    ("method.eval_batch_size", lambda v: v >= 1, "at least 1"),
    ("backbone.width", lambda v: v > 0, "positive"),
    ("stream.n_tasks", lambda v: v >= 1, "at least 1"),
    ("stream.classes_per_task", lambda v: v >= 1, "at least 1"),
    ("stream.train_per_task", lambda v: v is None or v >= 1, "null or at least 1"),
    ("stream.test_per_task", lambda v: v is None or v >= 1, "null or at least 1"),
    ("hardware.threads", lambda v: v is None or v >= 1, "null or at least 1"),
]


def check_config(cfg: DictConfig) -> None:
    """Fail with one line on keys outside the schema or values out of range, before any work."""
    check_known_keys(cfg)
    for key, test, expected in RANGES:
        value = OmegaConf.select(cfg, key)
        if not test(value):
            raise ClrunError(f"{key}={value} is invalid: it must be {expected}")


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


def register_configs() -> None:
    """Register the schemas; called before Hydra composes."""
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    cs.store(name="method_schema", node=MethodConfig)
    cs.store(name="joint_method_schema", node=JointConfig)
    cs.store(name="packnet_method_schema", node=PackNetConfig)
    cs.store(name="piggyback_method_schema", node=PiggybackConfig)
    cs.store(name="cpg_method_schema", node=CPGConfig)
    cs.store(name="backbone_schema", node=BackboneConfig)
    cs.store(name="mlp_backbone_schema", node=MlpConfig)
    cs.store(name="stream_schema", node=StreamConfig)
    cs.store(name="hardware_schema", node=HardwareConfig)
