"""DER: dynamically expandable representation (Yan, Xie & He, CVPR 2021), class-incremental.

Each task adds a feature extractor (the backbone at `extractor_width` times
backbone.width); earlier extractors are frozen (eval mode, batch norm included, no
gradient, out of the optimizer). The classifier reads the concatenation of every
extractor's features:

- class scenario (DER's own): one classifier over every class seen, rebuilt per task
  over the wider features with the old classifier's weights copied in (as PyCIL; DER's
  released config, `reuse_oldfc: false`, starts it afresh); the whole of it trains, with
  a class-balanced replay memory (`replay`: 2000 exemplars by herding) mixed into every
  batch;
- task scenario: a head per task on the features of extractors 0..t, so earlier tasks'
  logits never change (no replay, no re-balancing).

The loss adds an auxiliary classifier on the new extractor's features over the task's
classes plus one "old" class for every replayed image (weight `aux_weight`; tasks from 1
on, discarded after the task), and `sparsity_weight` times DER's sparsity loss L_S on
channel masks. A mask is sigmoid(s e) per hidden unit or channel of the new extractor
(`clrun.models.gating`, after each activation), with s annealed from 1/s_max to s_max
over each epoch, HAT's gradient compensation and embedding clamp (DER adapts HAT's
masks). L_S (the paper's; `kept_weight_share`) is the share of the extractor's weights
whose input and output channels are open, each layer weighted by its size. The
embeddings start at 0.1 (every channel open at s_max) and have their own optimizer
(`gate_train`: plain SGD lr 0.05, as joansj/hat's; under the extractor's Adam, lr 1e-3,
a channel needs at least 100 steps to close). After the task, channels whose mask at
s_max is at most `prune_threshold` are pruned: masked to exactly 0 from then on, the
others to 1. Channels are masked, not removed: the footprint counts every parameter;
`tasks.parquet` reports the share of units pruned (`pruned`) and of weights kept
(`kept_weights`).

DER's released code has no masks (its experiments are `der_womask`; PyCIL and
LibContinual leave them out too), so L_S's form follows the paper, while
`sparsity_weight` (1) and `gate_train` are this implementation's, chosen so that
pruning happens within a task at the defaults (split MNIST, mlp 2x400: 58-88% of the
units pruned per task). L_S pushes each gate by about 1/(layer width), so very narrow
layers (tens of units) can close entirely within a few dozen steps.

Class scenario, after each task but the first, DER's code's classifier learning stage
(`rebalance`): the classifier is re-initialised and trained alone on a class-balanced
subset (the memory and the task's images, every class cut at random to the smallest
class's count), every extractor frozen in eval mode, loss CE(logits / T) with
T = `rebalance_temperature` (5), `rebalance_train` (SGD lr 0.1, momentum 0.9, wd 5e-4,
30 epochs, x0.1 at epoch 15). Then the memory takes the task's exemplars by iCaRL's
herding on the features of every extractor (`replay.policy: herding`, as DER's code;
`clrun.methods.parts.replay.herding`). DER's code repicks an image herding already chose
(counting it again in the running mean) and stops after 1000 steps; here each image is
picked at most once, so every class fills its quota.

Other departures from DER's code: a new extractor starts from a fresh initialisation
(DER's code copies the previous extractor's weights); the paper's ResNet-18 recipe
(SGD lr 0.1, 170 epochs) is not the default `train`.

Backbones: mlp, convnet, vgg16_bn (chain backbones, as the masks need).
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from clrun.config import FRACTION, NON_NEGATIVE, POSITIVE, checked
from clrun.data.stream import Task
from clrun.methods.base import Method, MethodConfig
from clrun.methods.parts.gate_training import compensate, steepness
from clrun.methods.parts.replay import Memory, ReplayConfig, ReplayPolicy
from clrun.models import build_backbone
from clrun.models.gating import GatedLayer, Gates, gated_layers
from clrun.models.layers import Linear
from clrun.results import Footprint, count_params, module_bytes, tensor_bytes
from clrun.train import Optimizer, OptimizerConfig, Schedule, Step, TrainConfig, embed


@dataclass
class DERConfig(MethodConfig):
    """DER (Yan, Xie & He 2021): a new feature extractor per task, earlier ones frozen, a classifier on them all;
    pruned channel masks, classifier re-balancing, a herding memory."""

    # each extractor's width as a multiple of backbone.width (DER: the full backbone)
    extractor_width: float = checked(POSITIVE, 1.0)
    aux_weight: float = checked(NON_NEGATIVE, 1.0)  # weight of the auxiliary (new classes + "old") loss (DER: 1)
    # lambda_s on L_S, the share of the new extractor's weights its masks keep
    sparsity_weight: float = checked(NON_NEGATIVE, 1.0)
    # gate steepness sigmoid(s e) at the end of each epoch (HAT-style annealing, as DER)
    s_max: float = checked(POSITIVE, 400.0)
    # after a task, channels whose gate at s_max is at most this are pruned (set to 0)
    prune_threshold: float = checked(FRACTION, 0.5)
    # the mask embeddings' own optimizer (DER's masks are HAT's: plain SGD, lr 0.05 in joansj/hat)
    gate_train: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(optimizer=Optimizer.sgd, lr=0.05, momentum=0.0)
    )
    rebalance: bool = True  # class scenario: after each task but the first, retrain the classifier alone (DER's code)
    # the re-balancing stage (DER's code, `decouple`): classifier re-initialised, SGD lr 0.1 x0.1 at epoch 15, 30 epochs
    rebalance_train: TrainConfig = field(
        default_factory=lambda: TrainConfig(
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


EMBEDDING_CLAMP = 6.0  # gate embeddings stay in [-6, 6] (HAT's thres_emb)
EMBEDDING_INIT = 0.1  # gate embeddings start here: sigmoid(s_max 0.1) = 1, every channel open


def kept_weight_share(layers: list[GatedLayer], masks: list[torch.Tensor]) -> torch.Tensor:
    """DER's sparsity loss L_S: the share of the gated layers' weights whose input and output units are open,
    sum_l K_l |m_{l-1}|_1 |m_l|_1 / sum_l K_l c_{l-1} c_l, K_l a layer's weights per (input, output) unit pair
    (kernel area; positions of a flattened conv); a layer's ungated input counts as open."""
    kept, total = 0, 0
    for gated, mask in zip(layers, masks, strict=True):
        weights = gated.layer.weight.numel()
        inputs = 1.0 if gated.input_gate is None else masks[gated.input_gate].mean()
        kept = kept + weights * inputs * mask.mean()
        total += weights
    return kept / total


class Extractors(nn.Module):
    """The extractors in task order with their channel gates; every one but the last stays in eval mode."""

    def __init__(self):
        super().__init__()
        self.nets = nn.ModuleList()
        self.gates: list[Gates] = []
        self.layers: list[list[GatedLayer]] = []  # per extractor, its gated layers
        self.masks: list[list[torch.Tensor]] = []  # per frozen extractor, its 0/1 gates per gated layer

    def append(self, net: nn.Module) -> None:
        layers = gated_layers(net, "der")
        self.nets.append(net)
        self.gates.append(Gates(layers))
        self.layers.append(layers)

    @property
    def out_features(self) -> int:
        return sum(net.out_features for net in self.nets)

    def forward(self, x: torch.Tensor, upto: int, soft: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Concatenated features of extractors 0..upto-1: frozen ones under their masks without gradient, the one
        in training (index len(masks)) under the `soft` gates."""
        features = []
        for i in range(upto):
            if i < len(self.masks):
                with torch.no_grad(), self.gates[i].use(self.masks[i]):
                    features.append(self.nets[i](x))
            else:
                with self.gates[i].use(soft):
                    features.append(self.nets[i](x))
        return torch.cat(features, dim=1)

    def train(self, mode: bool = True) -> "Extractors":
        super().train(mode)
        for net in self.nets[: len(self.masks)]:
            net.eval()  # frozen: batch norm on its running statistics, never updated
        return self


class DER(Method):
    config_class = DERConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.extractors = hw.prepare_model(Extractors())
        self.heads = nn.ModuleList()  # class: the one classifier; task: a head per task
        self.memory = Memory(cfg.replay.budget, cfg.replay.policy.value, len(stream.tasks))
        self.pruned: list[float] = []  # per task, the share of its extractor's gated units pruned
        with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
            backbone = build_backbone(OmegaConf.merge(backbone_cfg, {"pretrained": None}), stream.input_shape)
        gated_layers(backbone, "der")  # an unsupported backbone fails now, before any work
        self.base_params = count_params(backbone) + (backbone.out_features + 1) * stream.tasks[0].n_classes

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        return ("task", "class")

    @property
    def class_scenario(self) -> bool:
        return self.stream.scenario == "class"

    def add_task(self, task: Task) -> None:
        """A new extractor and the head(s) for `task`: class, a classifier over every class so far holding the old
        one's weights; task, the task's head on the features of extractors 0..task."""
        cfg = OmegaConf.merge(self.backbone_cfg, {"width": self.backbone_cfg.width * self.cfg.extractor_width})
        self.extractors.append(self.hw.prepare_model(build_backbone(cfg, self.stream.input_shape)))
        n_features = self.extractors.out_features
        if not self.class_scenario:
            self.heads.append(self.hw.prepare_model(Linear(n_features, task.n_classes)))
            return
        n_classes = self.stream.class_offset(task.index) + task.n_classes
        head = self.hw.prepare_model(Linear(n_features, n_classes))
        if len(self.heads):
            old = self.heads[0]
            with torch.no_grad():
                head.weight[: old.out_features, : old.in_features] = old.weight
                head.bias[: old.out_features] = old.bias
        self.heads = nn.ModuleList([head])

    def learn(self, task: Task) -> dict:
        cfg, k = self.cfg, task.index
        self.add_task(task)
        net, layers = self.extractors.nets[k], self.extractors.layers[k]
        device = self.hw.device
        embeddings = [nn.Parameter(torch.full((g.units,), EMBEDDING_INIT, device=device)) for g in layers]
        aux = self.hw.prepare_model(Linear(net.out_features, task.n_classes + 1)) if k else None
        head = self.heads[0 if self.class_scenario else k]
        params = [*net.parameters(), *head.parameters(), *(aux.parameters() if aux else [])]
        replay = self.class_scenario and len(self.memory) > 0
        replay_size = cfg.replay.batch_size or cfg.train.batch_size
        offset = self.stream.class_offset(k) if self.class_scenario else 0

        def anneal(step: Step) -> float:
            return steepness(cfg.s_max, step.epoch_progress)  # 1/s_max to s_max over each epoch

        def loss(x: torch.Tensor, y: torch.Tensor, step: Step) -> torch.Tensor:
            soft = [torch.sigmoid(anneal(step) * e) for e in embeddings]
            targets, aux_targets = y + offset, y
            if replay:
                old, y_old, t_old = self.memory.sample(replay_size, self.stream, self.hw)
                x = torch.cat([x, old])
                targets = torch.cat([targets, self.stream.targets(y_old, t_old)])
                aux_targets = torch.cat([aux_targets, torch.full_like(y_old, task.n_classes)])
            features = self.extractors(x, k + 1, soft)
            total = F.cross_entropy(head(features), targets)
            if aux is not None:
                total = total + cfg.aux_weight * F.cross_entropy(aux(features[:, -net.out_features :]), aux_targets)
            return total + cfg.sparsity_weight * kept_weight_share(layers, soft)

        def after_backward(step: Step, optimizers) -> None:
            compensate(embeddings, anneal(step), cfg.s_max)

        def after_step(step: Step) -> None:
            with torch.no_grad():
                for e in embeddings:
                    e.clamp_(-EMBEDDING_CLAMP, EMBEDDING_CLAMP)

        stats = self.fit(
            task,
            self.extractors,
            params,
            loss,
            groups=[(embeddings, cfg.gate_train)],
            after_backward=after_backward,
            after_step=after_step,
        )
        masks = [(torch.sigmoid(cfg.s_max * e.detach()) > cfg.prune_threshold).float() for e in embeddings]
        self.extractors.masks.append(masks)
        self.pruned.append(1 - float(torch.cat(masks).mean()))
        row = {**stats.row(), "pruned": self.pruned[-1], "kept_weights": float(kept_weight_share(layers, masks))}
        if self.class_scenario and k and cfg.rebalance and len(self.memory):
            self.rebalance(task)
        if self.class_scenario and cfg.replay.budget:
            self.memory.add(task, self.features)
        return row

    def balanced_subset(self, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        """The memory and `task`'s training images with global labels, every class cut at random to the smallest
        class's count (DER's code: `construct_balanced_subset`)."""
        x = torch.cat([self.memory.x, task.train.x])
        offset = self.stream.class_offset(task.index)
        y = torch.cat([self.stream.targets(self.memory.y, self.memory.t), task.train.y + offset])
        classes, counts = y.unique(return_counts=True)
        n = int(counts.min())
        keep = []
        for label in classes.tolist():
            index = torch.nonzero(y == label).squeeze(1)
            keep.append(index[torch.randperm(len(index), device=index.device)[:n]])
        keep = torch.cat(keep)
        return x[keep], y[keep]

    def rebalance(self, task: Task) -> None:
        """DER's classifier learning stage: the classifier re-initialised and trained alone on `balanced_subset`,
        every extractor frozen in eval mode, loss CE(logits / rebalance_temperature)."""
        head = self.heads[0]
        head.reset_parameters()
        self.extractors.eval()
        everything = len(self.extractors.nets)
        temperature = self.cfg.rebalance_temperature

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            return F.cross_entropy(head(self.extractors(x, everything)) / temperature, y)

        data = self.balanced_subset(task)
        self.fit(task, head, head.parameters(), loss, self.cfg.rebalance_train, "re-balancing", data=data, mixed=True)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Every extractor's features (under its mask, eval mode) of uint8 images, without augmentation."""
        self.extractors.eval()
        n = len(self.extractors.nets)
        return embed(lambda x: self.extractors(x, n), images, self.stream, self.hw, self.cfg.eval_batch_size)

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.extractors.eval()
        if not self.class_scenario:
            return self.heads[task](self.extractors(x, task + 1))
        offset = self.stream.class_offset(task)
        return self.predict_agnostic(x, len(self.heads))[0][:, offset : offset + self.stream.tasks[task].n_classes]

    def predict_agnostic(self, x: torch.Tensor, seen: int) -> tuple[torch.Tensor, None]:
        """The classifier's logits over every class seen (class scenario)."""
        self.extractors.eval()
        with torch.no_grad():
            return self.heads[0](self.extractors(x, len(self.extractors.nets))), None

    def summary(self) -> dict:
        """Share of the gated units pruned, over every extractor."""
        units = [sum(m.numel() for m in masks) for masks in self.extractors.masks]
        return {"pruned": sum(p * n for p, n in zip(self.pruned, units, strict=True)) / sum(units)}

    def state_dict(self) -> dict:
        return {
            "extractors": self.extractors.state_dict(),
            "masks": self.extractors.masks,
            "heads": self.heads.state_dict(),
            "memory": self.memory.state_dict(),
            "pruned": self.pruned,
        }

    def load_state_dict(self, state: dict) -> None:
        self.extractors = self.hw.prepare_model(Extractors())
        self.heads = nn.ModuleList()
        for task in self.stream.tasks[: len(state["masks"])]:
            self.add_task(task)
        self.extractors.load_state_dict(state["extractors"])
        self.extractors.masks = [[m.to(self.hw.device) for m in masks] for masks in state["masks"]]
        self.heads.load_state_dict(state["heads"])
        self.memory.load_state_dict(state["memory"], self.hw.device)
        self.pruned = state["pruned"]

    def footprint(self) -> Footprint:
        """Every extractor (pruned channels included: they are masked, not removed), their masks (bytes), the
        classifier(s) and the replay memory (bytes); the base is one backbone at backbone.width with one head."""
        masks = tensor_bytes(m for masks in self.extractors.masks for m in masks)
        footprint = Footprint(
            params=count_params(self.extractors) + count_params(self.heads),
            bytes=module_bytes(self.extractors) + module_bytes(self.heads) + masks,
            base_params=self.base_params,
        )
        return self.memory.add_to(footprint)
