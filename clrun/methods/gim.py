"""GIM, Gated Incremental Memories (Cossu, Carta & Bacciu, IJCNN 2020, arXiv 2004.04077).

Followed: AndreaCossu/ContinualLearning-SequentialProcessing (core/AugmentedLSTM.py, core/LSTMAutoencoder.py,
tasks/mnist/utils_single.py, mnist.py).

- **Modules.** Each task adds a module (`backbone=lstm`: an LSTM reading the image row by row, the paper's
  A-LSTM; `backbone=mlp`: an MLP) and a linear head over the task's classes. Module k reads the input and the
  previous module's output, [x_t; h_t of module k-1] at every step for the LSTM ([x; h] for the MLP), so task k
  runs modules 0..k and reads module k's head. Earlier modules, heads and gates never train again, and none reads
  a later module, so earlier tasks' outputs are bit-identical.
- **Gates.** Each task trains an LSTM autoencoder on its inputs as row sequences (encoder LSTM, then a decoder LSTM
  started from the encoder's final state and fed zeros, a linear layer back to the input; MSE). Without a task id
  (class, domain) the gate with the lowest reconstruction error picks the module whose head answers.
- **Recipe** (mnist.py): modules Adam 3e-5, batch 32, 2 epochs, gradient norm clipped at 5; autoencoders 500
  units, Adam 1e-4, batch 32.

Departures. The code picks one module per test batch of 32 images from a single task (the batch's mean error);
by default here each image picks its own (`selection_batch: 1`), as the class scenario gives no task-pure
batches; `selection_batch=32` is the code's rule. The code trains the autoencoder step by step beside the module
on the same batches and holds out 25% as validation; here the gate is its own phase on the whole training split.
The paper's split MNIST reads 784 pixels one at a time with a shared 2-unit output (domain scenario: digit mod 2);
`backbone=lstm` reads 28 rows of 28 pixels, and every scenario works (class: the picked module's head over its
task's classes). LMN modules and the code's accuracy threshold for adding a module (1.01: always) are not ported.
"""

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from clrun.config import AT_LEAST_1, POSITIVE, Rule, checked
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Method, MethodConfig
from clrun.models import MultiHead, build_backbone
from clrun.models.backbones import RowLSTM, rows
from clrun.models.layers import Linear
from clrun.results import Footprint, count_params, module_bytes
from clrun.train import FitStats, Step, TrainConfig, eval_batches

MODULES = ("lstm", "mlp")  # the backbones a module can be


@dataclass
class GIMConfig(MethodConfig):
    """GIM (Cossu et al. 2020): a module per task reading the previous one, picked by per-task LSTM autoencoders."""

    # the code's module recipe: Adam 3e-5, batch 32, 2 epochs (mnist.py)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=3e-5, batch_size=32))
    # gradient-norm clip of the module's training (mnist.py's max_grad_norm; null: none)
    clip_grad_norm: Optional[float] = checked(Rule(POSITIVE.test, "null (no clipping) or positive"), 5.0)
    gate_hidden: int = checked(AT_LEAST_1, 500)  # the autoencoders' LSTM units (hidden_size_autoencoder)
    # the autoencoders' training: Adam 1e-4 (lr_ae), batch 32, 2 epochs
    gate_train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, batch_size=32))
    # images whose summed errors pick one module together, consecutive in an evaluation batch: 1, each image its
    # own; 32, the code's test batches (task-pure there and in clrun's evaluation, so optimistic)
    selection_batch: int = checked(AT_LEAST_1, 1)


class SequenceAutoencoder(nn.Module):
    """The gate (core/LSTMAutoencoder.py): an LSTM encodes the row sequence; a second LSTM, started from the
    encoder's final state and fed zeros, unrolls as many steps; a linear layer maps each step back to a row."""

    def __init__(self, n_inputs: int, hidden: int):
        super().__init__()
        self.encoder = nn.LSTM(n_inputs, hidden, batch_first=True)
        self.decoder = nn.LSTM(hidden, hidden, batch_first=True)
        self.output = Linear(hidden, n_inputs)

    def error(self, x: torch.Tensor) -> torch.Tensor:
        """Mean squared reconstruction error of each image of `x` read as rows, (N,)."""
        sequence = rows(x)
        _, state = self.encoder(sequence)
        steps, _ = self.decoder(sequence.new_zeros(*sequence.shape[:2], self.decoder.hidden_size), state)
        return (self.output(steps) - sequence).float().pow(2).mean((1, 2))


class GIM(Method):
    config_class = GIMConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        if backbone_cfg.name not in MODULES:
            raise ClrunError(f"gim: backbone.name={backbone_cfg.name}: its modules are lstm (the paper's) or mlp")
        if backbone_cfg.pretrained is not None:
            raise ClrunError("gim: backbone.pretrained: each module reads its predecessor, so none loads a backbone")
        self.columns = nn.ModuleList()
        self.heads = MultiHead()
        self.gates = nn.ModuleList()

    @classmethod
    def supported_scenarios(cls, cfg) -> tuple[str, ...]:
        return ("task", "class", "domain")

    def new_column(self) -> nn.Module:
        """The next task's module: the backbone, widened to read the previous module's output beside the input."""
        c, h, w = self.stream.input_shape
        extra = self.columns[-1].out_features if self.columns else 0
        shape = (1, h, c * w + extra) if self.backbone_cfg.name == "lstm" else (1, 1, c * h * w + extra)
        column = self.hw.prepare_model(build_backbone(self.backbone_cfg, shape))
        self.heads.init = column.init  # `backbone.init`'s rule for the heads too
        return column

    def new_gate(self) -> SequenceAutoencoder:
        c, _, w = self.stream.input_shape
        return self.hw.prepare_model(SequenceAutoencoder(c * w, self.cfg.gate_hidden))

    def features(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """Module `task`'s features: modules 0..task in turn, each reading the input and its predecessor's output."""
        carried = None
        for column in self.columns[: task + 1]:
            if isinstance(column, RowLSTM):
                carried = column.sequence(rows(x) if carried is None else torch.cat([rows(x), carried], 2))
            else:
                carried = column(x.flatten(1) if carried is None else torch.cat([x.flatten(1), carried], 1))
        return carried[:, -1] if carried.dim() == 3 else carried

    @torch.no_grad()
    def gate_errors(self, x: torch.Tensor) -> torch.Tensor:
        """Every gate's reconstruction error of each prepared image, (tasks, N)."""
        self.gates.eval()
        return torch.stack([gate.error(x) for gate in self.gates])

    def learn(self, task: Task) -> dict:
        cfg = self.cfg
        gate = self.new_gate()
        self.gates.append(gate)
        gate_stats = self.fit(
            task, gate, gate.parameters(), lambda x, y, step: gate.error(x).mean(), cfg.gate_train, "gate"
        )
        column = self.new_column()
        self.columns.append(column)
        head = self.heads.add(column.out_features, task.n_classes)
        self.heads.to(self.hw.device)
        params = [*column.parameters(), *self.heads.heads[head].parameters()]

        def loss(x: torch.Tensor, y: torch.Tensor, step: Step) -> torch.Tensor:
            return F.cross_entropy(self.heads(self.features(x, head), head), y)

        def clip(step: Step, optimizers) -> None:
            if cfg.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)

        stats = self.fit(task, column, params, loss, phase="module", after_backward=clip)
        for part in (gate, column, self.heads.heads[head]):
            part.requires_grad_(False)
        return {
            **FitStats.total([gate_stats, stats]).row(),
            "train_loss": stats.loss,
            "gate_loss": gate_stats.loss,
            "train_selection": self.train_selection(task),
        }

    def train_selection(self, task: Task) -> float:
        """Share of the task's training images whose own gate has the lowest error of the gates learned so far."""
        batches = eval_batches((task.train.x,), self.stream, self.hw, self.cfg.eval_batch_size, task.index)
        right = sum(int((self.gate_errors(x).argmin(0) == task.index).sum()) for (x,) in batches)
        return right / len(task.train)

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.columns.eval()
        return self.heads(self.features(x, task), task)

    def infer_task(self, x: torch.Tensor, logits: list[torch.Tensor]) -> torch.Tensor:
        """The module whose gate reconstructs best: per image, or per `selection_batch` consecutive images."""
        errors = self.gate_errors(x)[: len(logits)]
        group = torch.arange(errors.shape[1], device=errors.device) // self.cfg.selection_batch
        summed = errors.new_zeros(len(errors), int(group[-1]) + 1).index_add_(1, group, errors)
        return summed.argmin(0)[group]

    def state_dict(self) -> dict:
        parts = {"columns": self.columns, "heads": self.heads, "gates": self.gates}
        return {"n_tasks": len(self.columns), **{key: part.state_dict() for key, part in parts.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.columns, self.heads, self.gates = nn.ModuleList(), MultiHead(), nn.ModuleList()
        for task in self.stream.tasks[: state["n_tasks"]]:
            self.columns.append(self.new_column())
            self.heads.add(self.columns[-1].out_features, task.n_classes)
            self.gates.append(self.new_gate())
        self.heads.to(self.hw.device)
        for part, key in ((self.columns, "columns"), (self.heads, "heads"), (self.gates, "gates")):
            part.load_state_dict(state[key])
            part.requires_grad_(False)

    def footprint(self) -> Footprint:
        """Every module, head and gate; the base is task 0's module and head."""
        parts = (self.columns, self.heads, self.gates)
        return Footprint(
            params=sum(count_params(p) for p in parts),
            bytes=sum(module_bytes(p) for p in parts),
            base_params=count_params(self.columns[0]) + count_params(self.heads.heads[0]),
        )
