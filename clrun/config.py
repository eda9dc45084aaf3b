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
    iterations: Optional[int] = None  # train exactly this many steps instead (epochs then follow from it)


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


class TaskId(Enum):
    """How a method with per-task parts finds the task of an input when the scenario gives no task id."""

    none = "none"  # it does not: the method runs in the task scenario only
    confidence = "confidence"  # the task whose head gives the highest softmax probability
    entropy = "entropy"  # the task whose head gives the lowest softmax entropy


@dataclass
class PerTaskMethodConfig(MethodConfig):
    """A method with per-task parts (a head, mask or model per task): task-incremental unless `task_id` is set."""

    task_id: TaskId = TaskId.none


class ReplayPolicy(Enum):
    reservoir = "reservoir"  # every training image seen so far has the same chance to be in memory
    class_balanced = "class_balanced"  # the budget is split equally over the classes seen so far
    herding = "herding"  # class_balanced, images picked by iCaRL's herding on the method's features after the task


@dataclass
class ReplayConfig:
    """A replay memory of at most `budget` training images (0: no replay), mixed into every batch."""

    budget: int = 0
    policy: ReplayPolicy = ReplayPolicy.class_balanced
    batch_size: Optional[int] = None  # replayed images per batch (null: the training batch size)


@dataclass
class ERConfig(MethodConfig):
    """Experience replay: fine-tuning with a replay memory (van de Ven's ER: loss 1/t current + (1-1/t) replay)."""

    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=1000))


class FisherLabels(Enum):
    predicted = "predicted"  # the gradient at the model's predicted class (van de Ven's 2019 code: the MNIST tables)
    expectation = "expectation"  # the exact expectation over classes weighted by p(c|x) (van de Ven's 2022 code)


@dataclass
class EWCConfig(MethodConfig):
    """EWC (Kirkpatrick et al. 2017): one Fisher penalty per earlier task; `online`: one running Fisher."""

    ewc_lambda: float = 1e7  # penalty weight lambda in (lambda / 2) sum_i F_i (theta_i - theta*_i)^2
    online: bool = False  # online EWC (Schwarz et al. 2018): F <- gamma F + F_t, anchored at the last task
    gamma: float = 1.0  # online only: decay of the running Fisher
    fisher_samples: Optional[int] = None  # training images the Fisher is estimated on (null: all of the task's)
    fisher_labels: FisherLabels = FisherLabels.predicted
    replay: ReplayConfig = field(default_factory=ReplayConfig)


@dataclass
class SIConfig(MethodConfig):
    """Synaptic intelligence (Zenke et al. 2017): importance from each weight's path integral of the loss."""

    si_c: float = 1.0  # penalty weight c
    epsilon: float = 0.1  # damping xi in omega = W / (delta^2 + xi)
    task_gradient: bool = False  # path integral with the task loss's gradient (Zenke et al.'s code), not the total's


@dataclass
class MASConfig(MethodConfig):
    """Memory aware synapses (Aljundi et al. 2018): importance = mean |gradient of the squared output norm|."""

    mas_lambda: float = 1.0
    importance_samples: Optional[int] = None  # training images the importance is estimated on (null: all)


@dataclass
class LwFConfig(MethodConfig):
    """Learning without forgetting (Li & Hoiem 2016): distil a frozen copy's outputs on the new data."""

    temperature: float = 2.0  # KD temperature T (Li & Hoiem, FACIL, van de Ven: 2)
    lwf_lambda: float = 1.0  # weight of the distillation loss (Li & Hoiem's lambda_o, FACIL: 1)
    warmup_epochs: int = 0  # first train only the new head for this many epochs (the paper's warm-up; 0: off)
    # class scenario: the student's softmax spans every class seen so far, the teacher's probabilities zero-padded for
    # the new classes (van de Ven's code, behind the published numbers); false: both softmaxes span the old classes
    # only (Li & Hoiem's old outputs)
    kd_over_seen: bool = True
    # false: CE + lambda KD (Li & Hoiem; van de Ven 2022); true: (1/t) CE + (1 - 1/t) lambda KD, t the tasks so far
    # (van de Ven's 2019 code, behind the MNIST tables the vdv presets compare with)
    weight_by_tasks: bool = False
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # budget 0: no replay


class HNTarget(Enum):
    heads = "heads"  # the hypernetwork generates each task's head; the backbone is shared and trained
    all = "all"  # the hypernetwork generates every weight of backbone and head


@dataclass
class HNConfig(PerTaskMethodConfig):
    """Task-conditioned hypernetwork (von Oswald et al. 2020) with the output regulariser on earlier embeddings.

    Defaults: chrhenning/hypercl's split-MNIST recipe (mnist/train_args_default.py); permuted MNIST in comments."""

    target: HNTarget = HNTarget.all
    embedding_dim: int = 96  # task embedding size (hypercl: 96 split, 24 permuted)
    hidden: list[int] = field(default_factory=lambda: [10, 10])  # hypernetwork hidden units, ReLU (hypercl: 10,10)
    beta: float = 0.01  # output regulariser weight (hypercl: 0.01 split, 0.1 permuted)
    lookahead: bool = True  # regularise at Theta + the optimizer's candidate step (hypercl's default dTheta)
    chunk_size: int = 42000  # generate the target weights in chunks of this size (0: at once; hypercl: 42000 / 78000)
    chunk_embedding_dim: int = 96  # size of the learned chunk embeddings (hypercl: 96 split, 8 permuted)


class KDForm(Enum):
    paper = "paper"  # mean over earlier tasks of KL(teacher || student)
    code = "code"  # pah2025/PAH: sum over earlier tasks of KL(student || teacher) x T^2


@dataclass
class PAHConfig(PerTaskMethodConfig):
    """Prototype-augmented hypernetworks (De La Fuente et al. 2025): heads generated from class prototypes.

    Defaults: pah2025/PAH config/hyper2d.py (its Split-MNIST config; methods.md §9)."""

    prototype_size: int = 10  # prototypes are prototype_size x prototype_size maps (paper's best: 10)
    prototype_channels: int = 1  # 1 (grey, repeated to the input's channels, as the code does) or the input's
    semantic_init: bool = True  # initialise each prototype from a real training image of its class (else N(0.5, 0.1))
    hyper_hidden: int = 16  # hypernetwork hidden units (code: 16)
    hyper_layers: int = 1  # hidden-to-hidden layers after the first hidden layer (code: 1)
    lambda_sm: float = 0.5  # distillation of earlier tasks' generated heads on current images (code's `stability`)
    lambda_sp: float = 1.0  # distillation on earlier tasks' prototypes, the prototype step (code: 1)
    temperature: float = 2.0  # KD temperature T (code: 2)
    kd: KDForm = KDForm.paper
    prototype_lr: float = 1e-3  # prototypes, both optimizers (code: 1e-3); the backbone's lr is train.lr (code: 1e-4)
    hyper_lr: float = 1e-3  # hypernetwork (code: 1e-3)


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
class PackNetConfig(PerTaskMethodConfig):
    """PackNet as in CPG's CIFAR-100 port (experiment1/PackNet_cifar100.sh)."""

    train: TrainConfig = field(default_factory=lambda: _train(**_CPG_TRAIN))
    retrain: TrainConfig = field(
        default_factory=lambda: _train(**{**_CPG_TRAIN, "epochs": 30, "lr": 1e-3, "milestones": [25]})
    )
    prune: float = 0.6  # fraction of the task's weights released by the one-shot magnitude prune
    prune_schedule: PruneSchedule = PruneSchedule.fixed
    prune_last: bool = True  # prune the last task too (CPG's port does; PackNet's own scripts do not)


@dataclass
class PiggybackConfig(PerTaskMethodConfig):
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
class CPGConfig(PerTaskMethodConfig):
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


@dataclass
class PNNConfig(PerTaskMethodConfig):
    """Progressive neural networks (Rusu et al. 2016): a column per task, earlier columns frozen, lateral adapters."""

    # each column's width as a multiple of backbone.width: 1 = full columns (Rusu et al., mammoth);
    # joansj/hat's capacity-matched baseline: 1.117 / n_tasks
    column_width: float = 1.0


@dataclass
class SideTuningConfig(PerTaskMethodConfig):
    """Side-tuning (Zhang et al. 2020): a frozen base plus a side network and a head per task, blended by alpha."""

    side_width: float = 0.25  # side network width as a multiple of backbone.width (the paper's side net is small)
    fixed_alpha: Optional[float] = None  # the base's weight in the blend; null: learned, sigmoid of a scalar from 0


@dataclass
class HATConfig(PerTaskMethodConfig):
    """HAT (Serra et al. 2018): learned per-task sigmoid gates on hidden units; defaults: joansj/hat."""

    # plain SGD lr 0.05, batch 64, no momentum, no weight decay (joansj/hat); its validation-driven lr decay and
    # early stopping are not used here: train.epochs / train.iterations decide
    train: TrainConfig = field(
        default_factory=lambda: _train(epochs=2, batch_size=64, optimizer=Optimizer.sgd, lr=0.05, momentum=0.0)
    )
    s_max: float = 400.0  # gate steepness at the end of each epoch and at test (code's grid 25-800)
    c: float = 0.75  # attention regulariser weight (code's `lamb`, grid 0.1-4)
    embedding_clamp: float = 6.0  # embeddings clamped to [-clamp, clamp] after each step (code's thres_emb)
    clip_grad_norm: Optional[float] = 10000.0  # gradient-norm clip (code: 10000; null: none)
    paper_anneal: bool = False  # s reaches s_max at each epoch's last batch (paper) instead of at offset i/N (code)
    binarize: bool = False  # test and cumulative masks 1[e > 0] instead of the code's sigmoid(s_max e)


@dataclass
class ExpertGateConfig(MethodConfig):
    """Expert Gate (Aljundi et al. 2017): an expert per task, picked at test by per-task autoencoder gates."""

    # the gates choose the expert, so there is no `task_id` rule: it runs in every scenario
    latent: int = 100  # autoencoder code size (Avalanche's ExpertGate: 100)
    # autoencoder training: Adam lr 1e-3 (Avalanche), 2 epochs (Avalanche's ae_epochs)
    gate_train: TrainConfig = field(default_factory=lambda: _train(epochs=2, optimizer=Optimizer.adam, lr=0.001))
    relatedness_init: bool = True  # start each expert from the most related earlier one (paper); false: from scratch


@dataclass
class DERConfig(MethodConfig):
    """DER (Yan, Xie & He 2021): a new feature extractor per task, earlier ones frozen, a classifier on them all;
    pruned channel masks, classifier re-balancing, a herding memory."""

    extractor_width: float = 1.0  # each extractor's width as a multiple of backbone.width (DER: the full backbone)
    aux_weight: float = 1.0  # weight of the auxiliary (new classes + "old") loss (DER's code: 1)
    sparsity_weight: float = 1.0  # lambda_s on L_S, the share of the new extractor's weights its masks keep
    s_max: float = 400.0  # gate steepness sigmoid(s e) at the end of each epoch (HAT-style annealing, as DER)
    prune_threshold: float = 0.5  # after a task, channels whose gate at s_max is at most this are pruned (set to 0)
    # the mask embeddings' own optimizer (DER's masks are HAT's: plain SGD, lr 0.05 in joansj/hat)
    gate_train: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(optimizer=Optimizer.sgd, lr=0.05, momentum=0.0)
    )
    rebalance: bool = True  # class scenario: after each task but the first, retrain the classifier alone (DER's code)
    # the re-balancing stage (DER's code, `decouple`): classifier re-initialised, SGD lr 0.1 x0.1 at epoch 15, 30 epochs
    rebalance_train: TrainConfig = field(
        default_factory=lambda: _train(
            epochs=30,
            batch_size=128,
            optimizer=Optimizer.sgd,
            lr=0.1,
            momentum=0.9,
            weight_decay=5e-4,
            schedule=Schedule.multistep,
            milestones=[15],
            gamma=0.1,
        )
    )
    rebalance_temperature: float = 5.0  # the re-balancing loss is CE(logits / T) (DER's code: 5)
    # replay memory, class scenario only (DER's code: 2000 exemplars by herding)
    replay: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=2000, policy=ReplayPolicy.herding))


class XdGRegularizer(Enum):
    none = "none"  # gates alone
    ewc = "ewc"  # plus EWC's Fisher penalty (clrun.methods.ewc)
    si = "si"  # plus SI's path-integral penalty (clrun.methods.si)


@dataclass
class XdGConfig(PerTaskMethodConfig):
    """XdG (Masse et al. 2018): a fixed random binary gate per task on each hidden layer, optionally with EWC or SI."""

    gating: float = (
        0.8  # share of each hidden layer's units a task's gate silences (Masse et al.; van de Ven: 0.9 split)
    )
    gate_conv: bool = True  # gate conv channels too (false: linear hidden layers only, as van de Ven's CIFAR runs)
    mask_seed: Optional[int] = None  # seed of the random gates (null: the run's seed)
    regularizer: XdGRegularizer = XdGRegularizer.none
    ewc_lambda: float = 1e7  # regularizer=ewc: lambda in (lambda / 2) sum_i F_i (theta_i - theta*_i)^2
    fisher_samples: Optional[int] = None  # regularizer=ewc: images the Fisher is estimated on (null: all)
    si_c: float = 50.0  # regularizer=si: penalty weight c
    epsilon: float = 0.1  # regularizer=si: damping xi in omega = W / (delta^2 + xi)


@dataclass
class DENConfig(PerTaskMethodConfig):
    """DEN (Yoon et al. 2018): selective retraining, expansion with group-sparse pruning, split/duplication, timestamps;
    defaults: the official DEN_run.py (MLP 784-312-128, Permuted MNIST)."""

    # Adam lr 1e-3, batch 256 (code); every phase (head, selective retraining, expansion, split retraining) trains
    # train.epochs / train.iterations; the code's 0.95 lr decay per epoch and its l2 weight decay 1e-4 are not used
    train: TrainConfig = field(default_factory=lambda: _train(epochs=2, batch_size=256, lr=0.001))
    mu: float = 1e-5  # L1 weight, applied as a proximal soft-threshold lr*mu after each step (code's l1_lambda)
    # lambda in lambda ||W_S - W_S^{t-1}||^2 of selective retraining and splitting (code's l2_lambda)
    drift: float = 0.5
    group_lasso: float = 1e-3  # group lasso weight on the new units' incoming weights, proximal (code's gl_lambda)
    k: int = 10  # units added per layer by expansion; most units split per layer (code's ex_k)
    tau: float = 0.01  # expand when the selective-retraining loss stays above tau (code's loss_thr)
    sigma: float = 0.05  # split a unit whose incoming weights drifted more than sigma in L2 norm (code's spl_thr)


@dataclass
class CCGNConfig(PerTaskMethodConfig):
    """CCGN (Abati et al. 2020): per-task input-conditioned channel gates (Gumbel-softmax), used channels frozen."""

    sparsity: float = 0.5  # lambda_s on the mean gate activation (ChannelGatedCL port: 0.5)
    gate_hidden: int = 16  # hidden units of each gating MLP (paper: 16 [unverified])
    # Gumbel-sigmoid temperature while training (a common choice; not from the paper)
    temperature: float = 0.6666666666666666
    relevance: float = 0.0  # a channel is relevant (frozen afterwards) when its gate fires on more than this share
    # of the task's training images (0: ever fires, which makes earlier tasks' logits exact; port: 0.8 probability)
    task_classifier: bool = True  # class/domain scenarios with task_id none: the paper's task classifier picks the task
    classifier_hidden: int = 64  # hidden units of the task classifier's MLP (ChannelGatedCL port: 64)
    classifier_train: TrainConfig = field(default_factory=TrainConfig)  # the task classifier's training after each
    # task, the gated network frozen (defaults Adam 1e-3, batch 128, 2 epochs: not from the paper)
    # episodic memory of earlier tasks' images for the task classifier (budget: not from the paper)
    memory: ReplayConfig = field(default_factory=lambda: ReplayConfig(budget=1000))


class SplitRule(Enum):
    """How a dataset's classes or inputs are cut into tasks."""

    contiguous = "contiguous"  # classes in label order, classes_per_task each
    random = "random"  # classes shuffled by the stream seed, then cut
    superclass = "superclass"  # CIFAR-100 coarse labels, CPG's order
    permutation = "permutation"  # every task all classes, a fixed pixel permutation each
    rotation = "rotation"  # every task all classes, a fixed rotation each


# The three scenarios of van de Ven & Tolias (2019); `class` is a keyword, hence the functional form.
Scenario = Enum("Scenario", [("task", "task"), ("class", "class"), ("domain", "domain")])
Scenario.__doc__ = """task: task id given at test, a head per task; class: one head over every class seen so far,
no task id; domain: one shared head over the tasks' common labels, no task id."""


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
    scenario: Scenario = Scenario.task
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
    threads: Optional[int] = None  # CPU threads for torch (null: torch's default)
    compile: bool = False  # torch.compile the backbones a method trains
    compile_mode: CompileMode = CompileMode.default  # reduce_overhead: CUDA graphs
    memory_fraction: Optional[float] = None  # cap on this process's share of GPU memory (parallel jobs on one GPU)


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
    ("method.train.iterations", lambda v: v is None or v >= 1, "null or at least 1"),
    ("method.train.lr", lambda v: v > 0, "positive"),
    ("method.train.momentum", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("method.train.weight_decay", lambda v: v >= 0, "non-negative"),
    ("method.train.gamma", lambda v: v > 0, "positive"),
    ("method.train.gammas", lambda v: all(g >= 0 for g in v), "a list of non-negative factors"),
    ("method.eval_batch_size", lambda v: v >= 1, "at least 1"),
    # method-specific keys (absent from other methods' configs: None passes)
    ("method.replay.budget", lambda v: v is None or v >= 0, "non-negative (0: no replay)"),
    ("method.replay.batch_size", lambda v: v is None or v >= 1, "null or at least 1"),
    ("method.ewc_lambda", lambda v: v is None or v >= 0, "non-negative"),
    ("method.gamma", lambda v: v is None or 0 < v <= 1, "in (0, 1]"),
    ("method.fisher_samples", lambda v: v is None or v >= 1, "null or at least 1"),
    ("method.si_c", lambda v: v is None or v >= 0, "non-negative"),
    ("method.epsilon", lambda v: v is None or v > 0, "positive"),
    ("method.mas_lambda", lambda v: v is None or v >= 0, "non-negative"),
    ("method.importance_samples", lambda v: v is None or v >= 1, "null or at least 1"),
    ("method.temperature", lambda v: v is None or v > 0, "positive"),
    ("method.lwf_lambda", lambda v: v is None or v >= 0, "non-negative"),
    ("method.warmup_epochs", lambda v: v is None or v >= 0, "non-negative"),
    ("method.beta", lambda v: v is None or v >= 0, "non-negative"),
    ("method.prototype_size", lambda v: v is None or v >= 1, "at least 1"),
    ("method.embedding_dim", lambda v: v is None or v >= 1, "at least 1"),
    ("method.hidden", lambda v: v is None or all(h >= 1 for h in v), "a list of positive unit counts"),
    ("method.chunk_size", lambda v: v is None or v >= 0, "non-negative (0: no chunking)"),
    ("method.chunk_embedding_dim", lambda v: v is None or v >= 1, "at least 1"),
    ("method.prototype_channels", lambda v: v is None or v >= 1, "at least 1"),
    ("method.hyper_hidden", lambda v: v is None or v >= 1, "at least 1"),
    ("method.hyper_layers", lambda v: v is None or v >= 0, "non-negative"),
    ("method.lambda_sm", lambda v: v is None or v >= 0, "non-negative"),
    ("method.lambda_sp", lambda v: v is None or v >= 0, "non-negative"),
    ("method.prototype_lr", lambda v: v is None or v > 0, "positive"),
    ("method.hyper_lr", lambda v: v is None or v > 0, "positive"),
    ("method.column_width", lambda v: v is None or v > 0, "positive"),
    ("method.side_width", lambda v: v is None or v > 0, "positive"),
    ("method.fixed_alpha", lambda v: v is None or 0 <= v <= 1, "null (learned) or in [0, 1]"),
    ("method.s_max", lambda v: v is None or v > 0, "positive"),
    ("method.c", lambda v: v is None or v >= 0, "non-negative"),
    ("method.embedding_clamp", lambda v: v is None or v > 0, "positive"),
    ("method.clip_grad_norm", lambda v: v is None or v > 0, "null (no clipping) or positive"),
    ("method.gating", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("method.latent", lambda v: v is None or v >= 1, "at least 1"),
    ("method.extractor_width", lambda v: v is None or v > 0, "positive"),
    ("method.aux_weight", lambda v: v is None or v >= 0, "non-negative"),
    ("method.sparsity_weight", lambda v: v is None or v >= 0, "non-negative"),
    ("method.prune_threshold", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("method.mu", lambda v: v is None or v >= 0, "non-negative"),
    ("method.drift", lambda v: v is None or v >= 0, "non-negative"),
    ("method.k", lambda v: v is None or v >= 0, "non-negative"),
    ("method.tau", lambda v: v is None or v >= 0, "non-negative"),
    ("method.group_lasso", lambda v: v is None or v >= 0, "non-negative"),
    ("method.sigma", lambda v: v is None or v >= 0, "non-negative"),
    ("method.sparsity", lambda v: v is None or v >= 0, "non-negative"),
    ("method.gate_hidden", lambda v: v is None or v >= 1, "at least 1"),
    ("method.relevance", lambda v: v is None or 0 <= v < 1, "in [0, 1)"),
    ("backbone.width", lambda v: v > 0, "positive"),
    ("stream.n_tasks", lambda v: v >= 1, "at least 1"),
    ("stream.classes_per_task", lambda v: v >= 1, "at least 1"),
    ("stream.train_per_task", lambda v: v is None or v >= 1, "null or at least 1"),
    ("stream.test_per_task", lambda v: v is None or v >= 1, "null or at least 1"),
    ("hardware.threads", lambda v: v is None or v >= 1, "null or at least 1"),
    ("hardware.memory_fraction", lambda v: v is None or 0 < v <= 1, "null or in (0, 1]"),
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
    cs.store(name="per_task_method_schema", node=PerTaskMethodConfig)
    cs.store(name="er_method_schema", node=ERConfig)
    cs.store(name="ewc_method_schema", node=EWCConfig)
    cs.store(name="si_method_schema", node=SIConfig)
    cs.store(name="mas_method_schema", node=MASConfig)
    cs.store(name="lwf_method_schema", node=LwFConfig)
    cs.store(name="hn_method_schema", node=HNConfig)
    cs.store(name="pah_method_schema", node=PAHConfig)
    cs.store(name="packnet_method_schema", node=PackNetConfig)
    cs.store(name="piggyback_method_schema", node=PiggybackConfig)
    cs.store(name="cpg_method_schema", node=CPGConfig)
    cs.store(name="pnn_method_schema", node=PNNConfig)
    cs.store(name="side_tuning_method_schema", node=SideTuningConfig)
    cs.store(name="hat_method_schema", node=HATConfig)
    cs.store(name="xdg_method_schema", node=XdGConfig)
    cs.store(name="expert_gate_method_schema", node=ExpertGateConfig)
    cs.store(name="der_method_schema", node=DERConfig)
    cs.store(name="den_method_schema", node=DENConfig)
    cs.store(name="ccgn_method_schema", node=CCGNConfig)
    cs.store(name="backbone_schema", node=BackboneConfig)
    cs.store(name="mlp_backbone_schema", node=MlpConfig)
    cs.store(name="stream_schema", node=StreamConfig)
    cs.store(name="hardware_schema", node=HardwareConfig)
