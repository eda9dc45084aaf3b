"""HN: a task-conditioned hypernetwork (von Oswald, Henning, Grewe & Sacramento, ICLR 2020; chrhenning/hypercl).

A hypernetwork h(e, Theta) maps a learned task embedding e_t to the weights of the target network:
`target: all` = every weight of backbone and head; `target: heads` = the task's head only, the
backbone then being one shared network trained as in fine-tuning (nothing protects it). Learning
task t trains Theta and e_t on the task's cross-entropy plus the output regulariser

    beta / t * sum_{j<t} || h(e_j, Theta + dTheta) - h(e_j, Theta*) ||^2

where h(e_j, Theta*) is computed once before the task (eval mode) and dTheta is the step the
optimizer is about to take on the task loss alone (hypercl's lookahead, its default; `lookahead:
false` drops it). Earlier embeddings are frozen. The head has as many outputs as the largest task
and each task reads its first n_classes. Task scenario; class and domain with `task_id` (the
embedding whose network is most certain answers, HNET+ENT with `entropy`).

Batch norm under `target: all`: the hypernetwork generates the BN weights and biases like every
other weight; running statistics are kept per task (fresh when the task starts, its own at test),
so no task overwrites another's.
"""

from dataclasses import dataclass
from enum import Enum
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from clrun.config import AT_LEAST_1, NON_NEGATIVE, Rule, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.methods.parts.hypernet_reg import Lookahead, embeddings_state, load_embeddings_state, output_regulariser
from clrun.models import build_backbone
from clrun.models.hypernetwork import HyperNetwork, param_shapes
from clrun.models.layers import Linear
from clrun.results import Footprint, count_params, module_bytes, tensor_bytes


class HNTarget(Enum):
    heads = "heads"  # the hypernetwork generates each task's head; the backbone is shared and trained
    all = "all"  # the hypernetwork generates every weight of backbone and head


@dataclass
class HNConfig(PerTaskMethodConfig):
    """Task-conditioned hypernetwork (von Oswald et al. 2020) with the output regulariser on earlier embeddings.

    Defaults: chrhenning/hypercl's split-MNIST recipe (mnist/train_args_default.py); permuted MNIST in comments."""

    target: HNTarget = HNTarget.all
    embedding_dim: int = checked(AT_LEAST_1, 96)  # task embedding size (hypercl: 96 split, 24 permuted)
    # hypernetwork hidden units, ReLU (hypercl: 10,10)
    hidden: list[int] = checked(
        Rule(lambda v: all(h >= 1 for h in v), "a list of positive unit counts"), factory=lambda: [10, 10]
    )
    beta: float = checked(NON_NEGATIVE, 0.01)  # output regulariser weight (hypercl: 0.01 split, 0.1 permuted)
    lookahead: bool = True  # regularise at Theta + the optimizer's candidate step (hypercl's default dTheta)
    # generate the target weights in chunks of this size (0: at once; hypercl: 42000 / 78000)
    chunk_size: int = checked(Rule(NON_NEGATIVE.test, "non-negative (0: no chunking)"), 42000)
    chunk_embedding_dim: int = checked(AT_LEAST_1, 96)  # size of the learned chunk embeddings (hypercl: 96 / 8)


class HNModel(nn.Module):
    """What `hn` trains and stores: the hypernetwork, one embedding per task and, with `target: heads`,
    the shared backbone."""

    def __init__(self, hypernet: HyperNetwork, backbone: nn.Module | None) -> None:
        super().__init__()
        self.hypernet = hypernet
        self.embeddings = nn.ParameterList()
        self.backbone = backbone


class HN(Method):
    config_class = HNConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        if cfg.target.value == "all" and backbone_cfg.pretrained:
            raise ClrunError(
                "method hn with target=all generates every backbone weight, so backbone.pretrained has no use; "
                "use method.target=heads or backbone.pretrained=null"
            )
        backbone = build_backbone(backbone_cfg, stream.input_shape)
        head = Linear(backbone.out_features, max(task.n_classes for task in stream.tasks))
        self.base_params = count_params(backbone) + (backbone.out_features + 1) * stream.tasks[0].n_classes
        generate_all = cfg.target.value == "all"
        target = nn.Sequential(backbone, head) if generate_all else head
        hypernet = HyperNetwork(
            cfg.embedding_dim,
            list(cfg.hidden),
            param_shapes(target),
            chunk_size=cfg.chunk_size,
            chunk_embedding_dim=cfg.chunk_embedding_dim,
        )
        self.model = hw.prepare_model(HNModel(hypernet, None if generate_all else backbone))
        self.fresh_buffers = {name: buffer.clone() for name, buffer in target.named_buffers()}  # BN statistics
        self.target = target.to("meta")  # structure only: it runs on generated tensors through functional_call
        self.buffers: list[dict[str, torch.Tensor]] = []  # per task: the target's running statistics

    def _logits(self, x: torch.Tensor, task: int) -> torch.Tensor:
        hypernet = self.model.hypernet
        inputs = x if self.model.backbone is None else self.model.backbone(x)
        tensors = {**hypernet.split(hypernet(self.model.embeddings[task])), **self.buffers[task]}
        return functional_call(self.target, tensors, (inputs,))[:, : self.stream.tasks[task].n_classes]

    @torch.no_grad()
    def _targets(self, task: int) -> list[torch.Tensor]:
        """h(e_j, Theta*) for each task j before `task`, in eval mode (none when beta is 0)."""
        if self.cfg.beta == 0:
            return []
        self.model.eval()
        return [self.model.hypernet(embedding) for embedding in self.model.embeddings[:task]]

    def _regularise(self, targets: list[torch.Tensor], step, optimizers: list[torch.optim.Optimizer]) -> None:
        """Add the output regulariser's gradient to Theta's, after the task loss's backward pass and before
        the step (hypercl's calc_fix_target_reg; at Theta + the candidate step with `lookahead`)."""
        lookahead = Lookahead.optimizer if self.cfg.lookahead else Lookahead.none
        earlier = list(self.model.embeddings[: len(targets)])
        with torch.enable_grad():
            reg = output_regulariser(self.model.hypernet, earlier, targets, optimizers[0], self.cfg.beta, lookahead)
            reg.backward()

    def learn(self, task: Task) -> dict:
        """Train Theta and a new embedding on the task; `train_loss` is the task's cross-entropy alone (the
        regulariser's gradient joins it right before each step)."""
        index = task.index
        embedding = nn.Parameter(torch.randn(self.cfg.embedding_dim, device=self.hw.device))  # hypercl: N(0, 1)
        self.model.embeddings.append(embedding)
        self.buffers.append({name: b.to(self.hw.device, copy=True) for name, b in self.fresh_buffers.items()})
        targets = self._targets(index)
        self.target.train()
        params = [p for p in self.model.parameters() if p.requires_grad]  # earlier embeddings are frozen
        stats = self.fit(
            task,
            self.model,
            params,
            lambda x, y, step: F.cross_entropy(self._logits(x, index), y),
            after_backward=partial(self._regularise, targets) if targets else None,
        )
        embedding.requires_grad_(False)
        return stats.row()

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.model.eval()
        self.target.eval()
        return self._logits(x, task)

    def state_dict(self) -> dict:
        return embeddings_state(self.model, self.buffers)

    def load_state_dict(self, state: dict) -> None:
        self.buffers = load_embeddings_state(self.model, state, self.cfg.embedding_dim, self.hw.device, False)

    def footprint(self) -> Footprint:
        """Hypernetwork, embeddings (and the shared backbone with `target: heads`), plus per-task statistics."""
        statistics = tensor_bytes(b for task in self.buffers for b in task.values())
        return Footprint(count_params(self.model), module_bytes(self.model) + statistics, self.base_params)
