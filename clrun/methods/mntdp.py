"""MNTDP-D (Veniat, Denoyer & Ranzato, ICLR 2021): modular networks with a task-driven prior, deterministic search.

Followed: TomVeniat/MNTDP `src/modules/PSSN_llmodel.py` (`get_candidate_models`: the kNN prior) and its
ExhaustiveSearch, as digested in methods-tail.md §3. The backbone is cut into blocks (`clrun.models.blocks`:
ResNets as MNTDP's stem, four stages, head; plain backbones one block per weight layer); every block keeps a
library of modules, and task t's path names one module per block plus its own head. For a new task t:

1. prior: for every earlier task k, the training images of t (at most `knn_samples`) go through k's frozen path
   (all but its head); a kNN (`neighbors`, Euclidean, majority vote) fitted on those features scores t's
   validation images (at most `knn_samples`); the best-scoring task k* is the source (ties: the later task);
2. candidates: k*'s modules for the first i blocks, fresh modules for the rest (forward connections only, so a
   path switches from old to new at most once), i = 0 .. L (i = L: only a new head); the first task has one;
3. every candidate is trained through `Trainer.fit` at every (`lrs` x `weight_decays`) point of the grid (the
   official {1e-2, 1e-3} x {0, 1e-4, 1e-5}, Adam, batch 256), and the one with the best validation accuracy is
   kept: its new modules join the library; the others are discarded.

Earlier modules never train and run in eval mode, so every earlier task's logits stay bit-identical. Departure:
clrun streams have no validation split, so `val_share` of each task's training images is held out for the kNN
score and the selection (0: both on the training images); the official code selects on the stream's own
validation split and early-stops (≤300 epochs), here each candidate trains `train` as configured.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from clrun.config import AT_LEAST_1, Rule, checked
from clrun.data.stream import Split, Task
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.models import build_backbone
from clrun.models.blocks import Path, cut_blocks
from clrun.models.layers import Linear
from clrun.results import Footprint, count_params, module_bytes
from clrun.train import FitStats, accuracy, embed

NON_EMPTY = Rule(lambda v: len(v) > 0 and all(x >= 0 for x in v), "a non-empty list of non-negative numbers")


@dataclass
class MNTDPConfig(PerTaskMethodConfig):
    """MNTDP-D (Veniat et al. 2021): kNN task prior, candidate paths reusing a prefix of its modules, all trained."""

    neighbors: int = checked(AT_LEAST_1, 15)  # k of the kNN prior (MNTDP: 15; 5 on S_long)
    knn_samples: int = checked(AT_LEAST_1, 1000)  # images the kNN is fitted on and scored on, at most (1000)
    # share of each task's training images held out to score the kNN and select the candidate (0: training images)
    val_share: float = checked(Rule(lambda v: 0 <= v < 1, "in [0, 1)"), 0.2)
    lrs: list[float] = checked(NON_EMPTY, factory=lambda: [0.01, 0.001])  # learning rates searched (MNTDP's grid)
    weight_decays: list[float] = checked(NON_EMPTY, factory=lambda: [0.0, 1e-4, 1e-5])  # weight decays searched
    # reuse at most this many of the source's blocks (null: all; 0: independent models, each grid-searched)
    max_reuse: Optional[int] = checked(Rule(lambda v: v is None or v >= 0, "null or at least 0"), None)


def knn_accuracy(train: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, truth: torch.Tensor, k: int) -> float:
    """Accuracy on `query` of a k-nearest-neighbour vote (Euclidean; ties to the lowest label, as scikit-learn's
    `KNeighborsClassifier` the official code uses) over `train` features with `labels`."""
    k = min(k, len(train))
    nearest = torch.cdist(query, train).topk(k, largest=False).indices
    votes = F.one_hot(labels[nearest], int(labels.max()) + 1).sum(1)
    return (votes.argmax(1) == truth).float().mean().item()


class MNTDP(Method):
    config_class = MNTDPConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.n_blocks = len(self.new_blocks())
        self.library = torch.nn.ModuleList(torch.nn.ModuleList() for _ in range(self.n_blocks))
        self.heads = torch.nn.ModuleList()
        self.paths: list[list[int]] = []  # per task, its module index in each block

    def new_blocks(self) -> list[torch.nn.Module]:
        """Freshly initialised modules for every block (a new backbone, cut)."""
        backbone = build_backbone(self.backbone_cfg, self.stream.input_shape)
        self.out_features = backbone.out_features
        return [self.hw.prepare_model(block) for block in cut_blocks(backbone, self.backbone_cfg.name)]

    def path(self, task: int) -> Path:
        blocks = [self.library[i][m] for i, m in enumerate(self.paths[task])]
        return Path(blocks, self.heads[task], self.n_blocks)

    def holdout(self, task: Task) -> tuple[Split, Split]:
        """The task's training images split into (train, validation): `val_share` held out at random."""
        n_val = int(len(task.train) * self.cfg.val_share)
        if n_val == 0:
            return task.train, task.train
        order = torch.randperm(len(task.train)).to(task.train.y.device)
        val, train = order[:n_val], order[n_val:]
        return Split(task.train.x[train], task.train.y[train]), Split(task.train.x[val], task.train.y[val])

    def prior(self, task: Task, train: Split, val: Split) -> tuple[int, list[float]]:
        """The earlier task whose frozen features give the best kNN accuracy on the task's validation images."""
        n, scores = self.cfg.knn_samples, []
        for k in range(task.index):
            features = self.path(k).eval().features
            fitted = embed(features, train.x[:n], self.stream, self.hw, self.cfg.eval_batch_size, task.index)
            query = embed(features, val.x[:n], self.stream, self.hw, self.cfg.eval_batch_size, task.index)
            scores.append(knn_accuracy(fitted, train.y[:n], query, val.y[:n], self.cfg.neighbors))
        best = max(scores)
        return max(k for k, s in enumerate(scores) if s == best), scores

    def train_candidate(self, task: Task, reuse: list[int], lr: float, weight_decay: float, train: Split, val: Split):
        """Train a path of the given earlier modules then fresh ones; its FitStats, validation accuracy, new parts."""
        fresh = self.new_blocks()[len(reuse) :]
        head = self.hw.prepare_model(Linear(self.out_features, task.n_classes))
        old = [self.library[i][m] for i, m in enumerate(reuse)]
        path = Path(old + fresh, head, len(reuse))
        recipe = self.cfg.train.copy()
        recipe.lr, recipe.weight_decay = lr, weight_decay
        params = [p for module in (*fresh, head) for p in module.parameters()]

        def loss(x: torch.Tensor, y: torch.Tensor, step) -> torch.Tensor:
            return F.cross_entropy(path(x), y)

        phase = f"reuse {len(reuse)}, lr {lr:g}, wd {weight_decay:g}"
        stats = self.fit(task, path, params, loss, recipe, phase, data=(train.x, train.y))
        path.eval()
        score = accuracy(path, val, self.stream, self.hw, self.cfg.eval_batch_size, task.index)
        return stats, score, fresh, head

    def learn(self, task: Task) -> dict:
        cfg = self.cfg
        train, val = self.holdout(task)
        source, scores = (-1, []) if task.index == 0 else self.prior(task, train, val)
        most = 0 if source < 0 else self.n_blocks if cfg.max_reuse is None else min(cfg.max_reuse, self.n_blocks)
        phases: list[FitStats] = []
        best = None
        for i in range(most + 1):
            reuse = self.paths[source][:i] if source >= 0 else []
            for lr in cfg.lrs:
                for weight_decay in cfg.weight_decays:
                    stats, score, fresh, head = self.train_candidate(task, reuse, lr, weight_decay, train, val)
                    phases.append(stats)
                    if best is None or score > best[0]:
                        best = (score, reuse, fresh, head, lr, weight_decay)
        score, reuse, fresh, head, lr, weight_decay = best
        path = list(reuse)
        for i, module in enumerate(fresh, start=len(reuse)):
            module.requires_grad_(False)
            self.library[i].append(module)
            path.append(len(self.library[i]) - 1)
        head.requires_grad_(False)
        self.heads.append(head)
        self.paths.append(path)
        new = sum(count_params(m) for m in (*fresh, head))
        figures = {"source": source, "reused": len(reuse), "val_acc": score, "lr": lr, "weight_decay": weight_decay}
        figures |= {"candidates": len(phases), "new_params": new, "knn_best": max(scores, default=float("nan"))}
        return {**FitStats.total(phases).row(), **figures}

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        return self.path(task).eval()(x)

    def state_dict(self) -> dict:
        return {"library": self.library.state_dict(), "heads": self.heads.state_dict(), "paths": self.paths}

    def load_state_dict(self, state: dict) -> None:
        counts = [1 + max(path[i] for path in state["paths"]) for i in range(self.n_blocks)]
        for i, count in enumerate(counts):
            self.library[i] = torch.nn.ModuleList(self.new_blocks()[i] for _ in range(count))
        self.heads = torch.nn.ModuleList(
            self.hw.prepare_model(Linear(self.out_features, task.n_classes))
            for task in self.stream.tasks[: len(state["paths"])]
        )
        self.library.load_state_dict(state["library"])
        self.heads.load_state_dict(state["heads"])
        self.library.requires_grad_(False)
        self.heads.requires_grad_(False)
        self.paths = [list(path) for path in state["paths"]]

    def footprint(self) -> Footprint:
        """Every module of the library and every head; the base is task 0's path (one backbone and its head)."""
        stored = count_params(self.library) + count_params(self.heads)
        base = count_params(self.path(0))
        return Footprint(params=stored, bytes=module_bytes(self.library) + module_bytes(self.heads), base_params=base)

    def summary(self) -> dict:
        return {"modules": sum(len(block) for block in self.library)}
