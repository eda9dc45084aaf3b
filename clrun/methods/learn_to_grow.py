"""Learn to Grow (Li, Zhou, Wu, Socher & Xiong, ICML 2019, arXiv 1904.00310): per-layer reuse, adapt or new.

The backbone is cut into stages (a weight layer and what follows it up to the next: batch norm, ReLU,
pooling). Layer l holds the copies S_l grown so far, every one frozen (eval mode, no gradient) once its
task is learned. Task 0 trains one copy of every layer. A later task first searches, per layer, among
2|S_l| + 1 choices: `reuse` copy j as it is, `adapt` copy j (a task-specific adapter added in parallel to
its weight layer's output: a 1x1 convolution for a convolution, as the paper; a rank-`adapter_rank` linear
map for a linear layer; zero output at first) or `new` (a fresh copy). The search is DARTS-style, first
order: a super-network mixes each layer's choices by softmax(alpha_l); one `Trainer.fit` phase trains, per
step, the candidates' weights and the task's head (`search` recipe) on a batch of one part of the task's
training images (`search_split`) and alpha (its own optimizer, `alpha`) on a batch of the other part with
cross-entropy plus `size_penalty` x the alpha-weighted parameters the choices add, normalised by the
backbone's parameter count (so a whole new network costs `size_penalty`). The two updates use the same
weights (DARTS steps alpha first, then the weights with the new alpha). Then each layer takes its argmax
choice, the other candidates are dropped, and the picked new copies and adapters are retrained with the
task's head (`train` recipe; from the search's weights as LLSEU's port does, or re-initialised with
`retrain_from=scratch` as DARTS retrains). Each task predicts with its own picks and head; everything it
uses stays frozen, so earlier tasks' logits are bit-identical. `tasks.parquet` records per layer the
choice (`layer<l>`: new, reuse, adapt), the copy it reuses or adapts (`layer<l>_copy`) and its softmax
weight (`layer<l>_weight`), the counts `n_new`, `n_reuse`, `n_adapt`, `added_params` and the search's
final `size_penalty` term.

No official code; the third-party port WenjinW/LLSEU (src/approaches/ltg.py, src/models/alexnet_ltg.py)
gave the search/retrain split (half the training images for the weights, half for alpha), alpha's optimizer
(Adam 0.01, weight decay 3e-4) and the size penalty's coefficient (1). Departures from that port: the size
penalty is normalised (the port adds raw parameter counts); linear layers may adapt (the port offers them
reuse and new only); the adapter is added to the weight layer's output before batch norm and ReLU (the port
adds a separately activated 1x1 branch); alpha's Adam uses torch's default betas (the port: 0.5, 0.999); no
gradient clipping and no best-epoch restore. Task scenario; class and domain with `task_id`. Backbones:
mlp, convnet, vgg16_bn.
"""

import copy
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clrun.config import AT_LEAST_1, NON_NEGATIVE, Rule, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.models import build_backbone
from clrun.models.columns import cut_stages, layer_sequence
from clrun.models.layers import Conv2d, Linear
from clrun.results import Footprint, count_params, module_bytes
from clrun.train import FitStats, Optimizer, OptimizerConfig, TrainConfig, accuracy

CHOICES = ("reuse", "adapt", "new")


class RetrainFrom(Enum):
    search = "search"  # the picked new copies, adapters and head go on from their searched weights (LLSEU)
    scratch = "scratch"  # they are re-initialised before the retraining (DARTS' retraining)


@dataclass
class LearnToGrowConfig(PerTaskMethodConfig):
    """Learn to Grow (Li et al. 2019): a softmax search per layer over reuse / adapt / new, then retraining."""

    # the super-network's weights during the search (`train`: the retraining of the picked architecture)
    search: TrainConfig = field(default_factory=TrainConfig)
    # alpha's own optimizer (LLSEU: Adam 0.01, weight decay 3e-4)
    alpha: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(optimizer=Optimizer.adam, lr=0.01, weight_decay=3e-4)
    )
    size_penalty: float = checked(NON_NEGATIVE, 1.0)  # beta: the loss a whole new backbone's parameters cost
    # share of the task's training images the weights train on during the search; alpha trains on the rest
    search_split: float = checked(Rule(lambda v: 0 < v < 1, "in (0, 1)"), 0.5)
    adapter_rank: int = checked(AT_LEAST_1, 16)  # a linear layer's adapter: rank (a convolution's: 1x1, full)
    retrain_from: RetrainFrom = RetrainFrom.search


def relu_out_of_place(module: nn.Module) -> nn.Module:
    """`module` with its ReLUs out of place (a layer's output feeds both its reuse and its adapt branch)."""
    for sub in module.modules():
        if isinstance(sub, nn.ReLU):
            sub.inplace = False
    return module


class Adapter(nn.Module):
    """Added to a frozen weight layer's output: a 1x1 convolution (the layer's stride) for a convolution, a
    rank-`rank` linear map for a linear layer; its last layer starts at zero, so adapt starts as reuse."""

    def __init__(self, layer: nn.Module, rank: int):
        super().__init__()
        if isinstance(layer, nn.Conv2d):
            self.down = nn.Identity()
            self.up = Conv2d(layer.in_channels, layer.out_channels, 1, stride=layer.stride)
        else:
            self.down = Linear(layer.in_features, rank, bias=False)
            self.up = Linear(rank, layer.out_features)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class GrowingNet(nn.Module):
    """The grown network: per layer its copies (`copies[i][j]`: Sequential(weight layer, what follows)) and
    adapters, a head per task, and each task's picks (`picks[t][i]` = (copy, adapter or -1)). Copies and
    adapters of learned tasks (`frozen[i]`: the first so many copies) run in eval mode."""

    def __init__(self, prefix: nn.Module, layers: int):
        super().__init__()
        self.prefix = prefix  # parameter-free modules before the first weight layer (mlp: flatten)
        self.copies = nn.ModuleList(nn.ModuleList() for _ in range(layers))
        self.adapters = nn.ModuleList(nn.ModuleList() for _ in range(layers))
        self.heads = nn.ModuleList()
        self.picks: list[list[tuple[int, int]]] = []
        self.frozen = [0] * layers

    def forward(self, x: torch.Tensor, task: int) -> torch.Tensor:
        h = self.prefix(x)
        for i, (j, a) in enumerate(self.picks[task]):
            layer, rest = self.copies[i][j]
            z = layer(h)
            h = rest(z if a < 0 else z + self.adapters[i][a](h))
        return self.heads[task](h)

    def train(self, mode: bool = True) -> "GrowingNet":
        super().train(mode)
        for copies, n in zip(self.copies, self.frozen, strict=True):
            for block in copies[:n]:
                block.eval()  # batch norm on its own task's statistics, never updated
        return self

    def freeze(self) -> None:
        """Freeze everything there is: copies, adapters and heads."""
        self.requires_grad_(False)
        self.frozen = [len(copies) for copies in self.copies]


class SuperNet(nn.Module):
    """One task's search: every layer's choices mixed by softmax(alpha_l) — reuse and adapt of each frozen
    copy, and a fresh copy — then the task's head."""

    def __init__(self, net: GrowingNet, fresh: list[nn.Module], adapters: list[list[Adapter]], task: int):
        super().__init__()
        self.net, self.task = net, task
        self.fresh = nn.ModuleList(fresh)
        self.adapters = nn.ModuleList(nn.ModuleList(a) for a in adapters)
        sizes = [count_params(block) for block in fresh]
        total = sum(sizes)
        # per layer, what each choice adds, as a share of the backbone: reuse 0, adapt, new
        self.costs = [
            torch.tensor([0.0] * len(a) + [count_params(x) / total for x in a] + [size / total])
            for a, size in zip(adapters, sizes, strict=True)
        ]

    def forward(self, x: torch.Tensor, alphas: list[torch.Tensor]) -> torch.Tensor:
        h = self.net.prefix(x)
        for copies, fresh, adapters, alpha in zip(self.net.copies, self.fresh, self.adapters, alphas, strict=True):
            weights, n = alpha.softmax(0), len(copies)
            out = weights[-1] * fresh(h)
            for j, (layer, rest) in enumerate(copies):
                z = layer(h)
                out = out + weights[j] * rest(z) + weights[n + j] * rest(z + adapters[j](h))
            h = out
        return self.net.heads[self.task](h)

    def growth(self, alphas: list[torch.Tensor]) -> torch.Tensor:
        """The alpha-weighted parameters the choices add, as a share of the backbone's."""
        return sum((a.softmax(0) * c.to(a.device)).sum() for a, c in zip(alphas, self.costs, strict=True))


class LearnToGrow(Method):
    config_class = LearnToGrowConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        prefix, stages = self.stages()
        self.net = self.hw.prepare_model(GrowingNet(prefix, len(stages)))

    def stages(self) -> tuple[nn.Module, list[nn.Sequential]]:
        """A freshly initialised backbone cut into stages, Sequential(weight layer, what follows), ReLUs out of
        place; and the modules before the first stage."""
        backbone = build_backbone(self.backbone_cfg, self.stream.input_shape)
        try:
            modules = layer_sequence(backbone, self.backbone_cfg.name)
        except ClrunError:
            raise ClrunError(
                "method learn_to_grow chooses per layer of plain feed-forward backbones only (mlp, convnet, "
                f"vgg16_bn); backbone.name={self.backbone_cfg.name} has skip connections"
            ) from None
        self.out_features = backbone.out_features
        prefix, stages = cut_stages([relu_out_of_place(m) for m in modules])
        return prefix, [self.hw.prepare_model(nn.Sequential(layer, rest)) for layer, rest in stages]

    def new_adapter(self, layer: int) -> Adapter:
        return self.hw.prepare_model(Adapter(self.net.copies[layer][0][0], self.cfg.adapter_rank))

    def add_head(self, task: Task) -> None:
        self.net.heads.append(self.hw.prepare_model(Linear(self.out_features, task.n_classes)))

    def learn(self, task: Task) -> dict:
        cfg, net, k = self.cfg, self.net, task.index
        self.add_head(task)
        fresh = self.stages()[1]
        phases: list[FitStats] = []
        if k == 0:  # nothing to reuse: every layer new
            choices, weights, penalty = [0] * len(fresh), [1.0] * len(fresh), float("nan")
            adapters: list[list[Adapter]] = [[] for _ in fresh]
        else:
            adapters = [[self.new_adapter(i) for _ in copies] for i, copies in enumerate(net.copies)]
            supernet = SuperNet(net, fresh, adapters, k)
            alphas = [nn.Parameter(1e-3 * torch.randn(2 * len(c) + 1, device=self.hw.device)) for c in net.copies]
            phases.append(self.search(task, supernet, alphas))
            with torch.no_grad():
                penalty = cfg.size_penalty * supernet.growth(alphas).item()
                choices = [a.argmax().item() for a in alphas]
                weights = [a.softmax(0)[c].item() for a, c in zip(alphas, choices, strict=True)]
        row, picks, trained = {}, [], [net.heads[k]]
        for i, c in enumerate(choices):
            n = len(net.copies[i])
            kind, j = ("new", n) if c == 2 * n else ("adapt", c - n) if c >= n else ("reuse", c)
            adapter = -1
            if kind == "new":
                net.copies[i].append(fresh[i])
                trained.append(fresh[i])
            elif kind == "adapt":
                net.adapters[i].append(adapters[i][j])
                trained.append(adapters[i][j])
                adapter = len(net.adapters[i]) - 1
            picks.append((j, adapter))
            row |= {f"layer{i}": kind, f"layer{i}_copy": j, f"layer{i}_weight": weights[i]}
        net.picks.append(picks)
        if cfg.retrain_from == RetrainFrom.scratch:
            self.reinitialise(picks, trained)
        params = [p for module in trained for p in module.parameters()]
        phases.append(self.fit(task, net, params, lambda x, y, step: F.cross_entropy(net(x, k), y), phase="retrain"))
        net.freeze()
        kinds = [row[f"layer{i}"] for i in range(len(picks))]
        counts = {f"n_{kind}": kinds.count(kind) for kind in CHOICES}
        added = sum(count_params(module) for module in trained)
        return {**FitStats.total(phases).row(), **row, **counts, "added_params": added, "size_penalty": penalty}

    def search(self, task: Task, supernet: SuperNet, alphas: list[nn.Parameter]) -> FitStats:
        """One phase of first-order DARTS: per step, the weights on a batch of their part of the training images
        with alpha held, alpha (its own optimizer) on a batch of the other part with the weights held."""
        cfg, k, (x, y) = self.cfg, task.index, (task.train.x, task.train.y)
        order = torch.randperm(len(y), device=y.device)
        n = min(max(round(cfg.search_split * len(y)), 1), len(y) - 1)
        own, other = order[:n], order[n:]
        other = other[torch.arange(n, device=y.device) % len(other)]  # cycled: one alpha batch per weight batch

        def loss(x: torch.Tensor, y: torch.Tensor, x_alpha: torch.Tensor, y_alpha: torch.Tensor, step):
            x_alpha = self.hw.to_input(self.stream.prepare(x_alpha, train=True, task=k))
            weights_loss = F.cross_entropy(supernet(x, [a.detach() for a in alphas]), y)
            held = {name: p.detach() for name, p in supernet.named_parameters() if p.requires_grad}
            alpha_loss = F.cross_entropy(functional_call(supernet, held, (x_alpha, alphas)), y_alpha)
            return weights_loss + alpha_loss + cfg.size_penalty * supernet.growth(alphas)

        validate = None
        if cfg.search.schedule.value == "plateau":  # the super-network's test accuracy

            def validate() -> float:
                supernet.eval()
                predict = lambda images: supernet(images, alphas)  # noqa: E731
                return accuracy(predict, task.test, self.stream, self.hw, cfg.eval_batch_size, k)

        params = [p for p in supernet.parameters() if p.requires_grad]
        return self.fit(
            task,
            supernet,
            params,
            loss,
            recipe=cfg.search,
            phase="search",
            data=(x[own], y[own], x[other], y[other]),
            groups=[(alphas, cfg.alpha)],
            validate=validate,
        )

    def reinitialise(self, picks: list[tuple[int, int]], trained: list[nn.Module]) -> None:
        """`retrain_from=scratch`: the picked new copies and adapters and the task's head start over."""
        fresh = self.stages()[1]
        for i, (j, a) in enumerate(picks):
            if self.net.copies[i][j] in trained:
                self.net.copies[i][j].load_state_dict(fresh[i].state_dict())
            if a >= 0:
                self.net.adapters[i][a].load_state_dict(self.new_adapter(i).state_dict())
        self.net.heads[-1].reset_parameters()

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.net.eval()
        return self.net(x, task)

    def state_dict(self) -> dict:
        net = self.net
        return {
            "net": net.state_dict(),
            "picks": [list(picks) for picks in net.picks],
            "copies": [len(c) for c in net.copies],
            "adapters": [len(a) for a in net.adapters],
        }

    def load_state_dict(self, state: dict) -> None:
        prefix, stages = self.stages()
        net = self.hw.prepare_model(GrowingNet(prefix, len(stages)))
        self.net = net
        for i, (n_copies, n_adapters) in enumerate(zip(state["copies"], state["adapters"], strict=True)):
            net.copies[i].extend(copy.deepcopy(stages[i]) for _ in range(n_copies))
            net.adapters[i].extend(self.new_adapter(i) for _ in range(n_adapters))
        for task in self.stream.tasks[: len(state["picks"])]:
            self.add_head(task)
        net.load_state_dict(state["net"])
        net.picks = [[tuple(p) for p in picks] for picks in state["picks"]]
        net.freeze()

    def footprint(self) -> Footprint:
        """Every copy, adapter and head; the base is one copy of each layer with task 0's head."""
        net = self.net
        base = sum(count_params(copies[0]) for copies in net.copies) + count_params(net.heads[0])
        return Footprint(params=count_params(net), bytes=module_bytes(net), base_params=base)
