"""GCR: Gradient Coreset based Replay buffer selection (Tiwari, Killamsetty, Iyer, Shenoy, CVPR 2022).

Followed: the authors' code, google-research/google-research gradient_coresets_replay/: models/gcr.py (`observe`,
imported by utils/main.py; read as utils/gcr.py), utils/coreset.py (`Coreset`: the candidate reservoir, the
weighted buffer, `add_buffer_data`, `get_data`), utils/training.py (the selection after each task with the model
just trained), utils/main.py (defaults) and the selection in `clrun.methods.parts.coreset`.

The memory is two parts of one `replay.budget`: a candidate reservoir (`pool_share` of it; the code's
`reservoir_size`) filled during the task by reservoir sampling with the logits at insertion and weight 1
(`LogitMemory`, `reservoir_slots`; with more than one epoch only images the model classifies right, as the code),
and the weighted coreset (the rest, C rows; the code's `buffer_size`, `WeightedLogitMemory`). After task k (0-based)
with the model just trained: each earlier task's rows are re-selected down to C // (k + 1) (the candidates: its
coreset rows, with their weights in the inner loss), and the new task gets the remaining C - k (C // (k + 1))
rows, selected from the reservoir (all of it, weight 1, when it holds no more); the reservoir is then emptied.
Selection: `select_coreset` (per class, non-negative OMP matching the sum of the candidates' last-layer gradients of
beta CE + alpha MSE). Each step on a batch (x, y):

    outputs = f(x)                             every output over every class of the stream (`DarkReplay.outputs`)
    loss = CE(outputs, y)
         + alpha sum_i w_i MSE_i(f(x'), z') / sum_i w_i    (x', z', w'): a draw of `replay.batch_size` rows
         + beta  sum_i w_i CE_i(f(x''), y'') / sum_i w_i   a second, independent draw
    then the batch goes to the reservoir with `outputs` detached.

A draw (the code's `get_data`) mixes the reservoir's current-task rows, from its first min(held, ceil(C / (k + 1)))
slots, in proportion seen this task / seen in all (all of them during task 0), and the coreset's rows; each part
without replacement. The output layer, the task scenario's prediction and the class scenario's prediction among the
classes seen are `dark_er`'s (`clrun.methods.parts.dark_replay`). Defaults: the code's utils/main.py (lr 0.03, batch
32, minibatch 32, alpha 0.1, beta 0.5, 1 epoch, OMP ridge 0.5 as its GPU solver); it has no seq-MNIST values.

Departures: the code holds its reservoir (200) beside a buffer of `buffer_size`; here both count in the one budget
(the code's buffer 200 is `replay.budget=400`, the default `pool_share` 0.5). Its supervised-contrastive term
(`gamma`, default 0 in utils/main.py, needing the backbone's `contrastive_forward`) is not implemented. The selection
runs in eval mode (the code: a copy of the network in train mode; the same for networks without batch norm) on the
images as training prepares them (the code's `transform`). A task smaller than its share is kept whole (the code
asserts). OMP picks with no positive alignment stop the pursuit (the code would keep a negative first weight).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from clrun.config import NON_NEGATIVE, Rule, checked
from clrun.data.stream import Task
from clrun.methods.parts.coreset import candidate_gradients, select_coreset
from clrun.methods.parts.dark_replay import DarkReplay, DarkReplayConfig
from clrun.methods.parts.replay import LogitMemory, ReplayConfig, ReplayPolicy, WeightedLogitMemory
from clrun.results import Footprint
from clrun.train import Optimizer, TrainConfig

SHARE = Rule(lambda v: 0 < v < 1, "between 0 and 1, exclusive")


@dataclass
class GCRConfig(DarkReplayConfig):
    """GCR: a weighted coreset of the tasks seen, chosen by gradient matching, replayed with DER++'s terms weighted
    by the coreset weights; the code's utils/main.py defaults."""

    train: TrainConfig = field(
        default_factory=lambda: TrainConfig(optimizer=Optimizer.sgd, lr=0.03, momentum=0.0, batch_size=32, epochs=1)
    )
    # budget: coreset + candidate reservoir; batch_size: rows per draw (the code's minibatch_size)
    replay: ReplayConfig = field(
        default_factory=lambda: ReplayConfig(budget=200, policy=ReplayPolicy.reservoir, batch_size=32)
    )
    alpha: float = checked(NON_NEGATIVE, 0.1)  # weight of the weighted logit MSE (and in the selection's loss)
    beta: float = checked(NON_NEGATIVE, 0.5)  # weight of the weighted buffer CE (and in the selection's loss)
    pool_share: float = checked(SHARE, 0.5)  # share of the budget for the current task's candidate reservoir
    omp_lambda: float = checked(NON_NEGATIVE, 0.5)  # ridge of OMP's least squares (the code: 0.5 GPU, 0 CPU)


class GCR(DarkReplay):
    config_class = GCRConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        pool = round(cfg.replay.budget * cfg.pool_share)
        self.pool = LogitMemory(pool)  # the current task's candidates
        self.memory = WeightedLogitMemory(cfg.replay.budget - pool)  # the weighted coreset
        self.tasks_held = 0  # tasks in the coreset (the code's task_num)
        self.seen_before = 0  # training images offered in earlier tasks (the code's total_seen_examples)

    def draw(self, n: int) -> tuple[torch.Tensor, ...]:
        """n rows (fewer while less is held): the reservoir's and the coreset's, prepared for training, with global
        labels, stored logits and weights (the code's `get_data`)."""
        window = min(len(self.pool), math.ceil(self.memory.budget / (self.tasks_held + 1)))
        from_pool = min(n, window)
        if self.tasks_held:
            share = self.pool.seen / (self.seen_before + self.pool.seen)
            from_pool = min(from_pool, int(n * share))
        parts = [(self.pool, torch.randperm(window)[:from_pool], None)]
        if self.tasks_held:
            parts.append((self.memory, torch.randperm(len(self.memory))[: n - from_pool], self.memory.w))
        rows = [[], [], [], [], []]
        for memory, index, w in parts:
            index = index.to(self.hw.device)
            rows[0].append(memory.x[index] if len(memory) else None)
            rows[1].append(memory.y[index] + self.offsets[memory.t[index]] if len(memory) else None)
            rows[2].append(memory.t[index] if len(memory) else None)
            rows[3].append(memory.logits[index] if len(memory) else None)
            rows[4].append(torch.ones(len(index), device=self.hw.device) if w is None else w[index])
        images, y, t, logits = (torch.cat([v for v in column if v is not None]) for column in rows[:4])
        w = torch.cat(rows[4])
        x = self.hw.to_input(self.stream.prepare(images, train=True, task=t))
        return x, y, logits, w

    def learn(self, task: Task) -> dict:
        alpha, beta, budget = self.cfg.alpha, self.cfg.beta, self.cfg.replay.budget
        draw_size = self.cfg.replay.batch_size or self.cfg.train.batch_size
        offset, filtered = self.offsets[task.index], self.cfg.train.epochs > 1

        def loss(x: torch.Tensor, y: torch.Tensor, images: torch.Tensor, step) -> torch.Tensor:
            outputs = self.outputs(x)
            total = F.cross_entropy(outputs, y + offset)
            if len(self.pool) or len(self.memory):
                if alpha:
                    replayed, _, logits, w = self.draw(draw_size)
                    rows = F.mse_loss(self.outputs(replayed), logits, reduction="none").mean(1)
                    total = total + alpha * (rows * w / w.sum()).sum()
                if beta:
                    replayed, labels, _, w = self.draw(draw_size)
                    rows = F.cross_entropy(self.outputs(replayed), labels, reduction="none")
                    total = total + beta * (rows * w / w.sum()).sum()
            if budget:
                keep = outputs.argmax(1) == y + offset if filtered else slice(None)
                self.pool.insert(images[keep], y[keep], torch.full_like(y[keep], task.index), outputs[keep])
            return total

        data = (task.train.x, task.train.y, task.train.x)
        stats = self.fit(task, self.model, list(self.model.parameters()), loss, data=data)
        if budget:
            self.refresh()
        return stats.row()

    def refresh(self) -> None:
        """After a task (the code's `add_buffer_data`): each earlier task's coreset re-selected to C // (k + 1)
        rows, the new task's share selected from the reservoir; the reservoir emptied."""
        k, coreset = self.tasks_held, self.memory
        per_task = coreset.budget // (k + 1)
        parts = []
        for held in range(k if len(coreset) else 0):
            index = torch.nonzero(coreset.t == held).squeeze(1)
            parts.append(self.select(coreset, index, coreset.w[index], per_task))
        if len(self.pool):
            index = torch.arange(len(self.pool), device=self.hw.device)
            parts.append(self.select(self.pool, index, None, coreset.budget - k * per_task))
        if parts:
            x, y, t, logits, w = (torch.cat(column) for column in zip(*parts, strict=True))
            coreset.keep(x, y, t, logits, w)
        self.tasks_held += 1
        self.seen_before += self.pool.seen
        self.pool.clear()

    def select(self, memory: LogitMemory, index: torch.Tensor, w, n: int) -> tuple[torch.Tensor, ...]:
        """`n` of `memory`'s rows `index` (all of them, weight 1, when they are no more), chosen by `select_coreset`
        with the current model; their images, labels, tasks, logits and new weights."""
        x, y, t, logits = memory.x[index], memory.y[index], memory.t[index], memory.logits[index]
        if n >= len(index):
            return x, y, t, logits, torch.ones(len(index), device=self.hw.device)
        w = torch.ones(len(index), device=self.hw.device) if w is None else w
        labels = y + self.offsets[t]
        self.model.eval()
        grads = []
        for start in range(0, len(index), self.cfg.eval_batch_size):
            rows = slice(start, start + self.cfg.eval_batch_size)
            inputs = self.hw.to_input(self.stream.prepare(x[rows], train=True, task=t[rows]))
            with torch.no_grad():
                features = self.model.features(inputs)
                outputs = self.head_outputs(features)
            with torch.enable_grad():
                outputs.requires_grad_(True)
                grads.append(
                    candidate_gradients(
                        outputs, features, labels[rows], logits[rows], w[rows], self.cfg.alpha, self.cfg.beta
                    )
                )
        self.model.train()
        picks, weights = select_coreset(torch.cat(grads).float(), labels.cpu(), n, self.cfg.omp_lambda)
        picks = picks.to(self.hw.device)
        return x[picks], y[picks], t[picks], logits[picks], weights.to(self.hw.device)

    def state_dict(self) -> dict:
        state = {**super().state_dict(), "pool": self.pool.state_dict()}
        return {**state, "tasks_held": self.tasks_held, "seen_before": self.seen_before}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.pool.load_state_dict(state["pool"], self.hw.device)
        self.tasks_held, self.seen_before = state["tasks_held"], state["seen_before"]

    def footprint(self) -> Footprint:
        return self.pool.add_to(super().footprint())
