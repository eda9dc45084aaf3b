"""CPG: Compacting, Picking and Growing (Hung et al., NeurIPS 2019); PAE is CPG without picking.

Each task t (owner tag t + 1) runs ivclab/CPG's CIFAR-100 pipeline
(experiment1/CPG_cifar100_scratch_mul_1.5.sh, with its CPG_cifar100_main_normal.py and utils/prune.py):

1. **Train.** The task takes every free weight. It trains them together with its
   batch norm, biases and head under `train`. From the second task on, with
   `picking`, it also trains a real-valued picking mask over earlier tasks' frozen
   weights under `mask_train` (Adam). The mask starts at `mask_init`, above
   `threshold`, so every earlier weight starts picked.
2. **Goal and growth.** The task's final-epoch test accuracy must reach its goal less
   `acc_margin` (`clrun.methods.parts.goals`; CPG validates on the test split) and its final-epoch
   training accuracy must exceed `min_train_acc`. If either fails and the parameter
   multiplier is below `max_multiplier`, the network goes back to where the task
   started. It is widened by `grow_step` (channels by the square root) and the task
   trains again. The first task instead restarts from a fresh network at the wider
   width. The multiplier then stays for every later task. Without goals
   (`goals: null`) the goal is the accuracy just reached, so nothing grows.
3. **Compact.** Gradual magnitude pruning, one step per target in `sparsities`.
   Each step starts at the previous target and trains under `prune_train` with the
   picking masks frozen. Over the first `pruning_interval` epochs the sparsity of
   the task's pool follows Zhu and Gupta's cubic ramp, and the owner map is
   recomputed every `pruning_frequency` iterations. The remaining epochs train at
   the target. The sparsity is measured per layer over the pool: the task's own
   weights plus the free ones. The kept sparsity is the largest step whose accuracy
   still meets the goal, less `acc_margin` (0 on CIFAR): every step runs, each from the one
   before, until training accuracy fails `min_train_acc` (`stop_at_first_miss`
   stops at the first step below the goal instead, quicker). If no step meets it,
   the task stays unpruned. A task still below its goal at the maximum width is pruned anyway, to
   at least `1 - round(1 / (remaining tasks + 1), 1)`, which leaves room for the
   tasks after it.
4. **Retrain** (tasks >= 2, CPG only). The picking masks are reset to `mask_init`,
   and the task trains its kept weights and masks under `retrain` / `retrain_mask`,
   stopping after `retrain_patience` epochs without gain. The best epoch is kept
   only if it beats the accuracy measured right after the reset.
5. **Freeze.** `end_task` stores the task's width, private tensors and binary picks.
   The released weights are zeroed, and the next task starts from them.

Deviations from the official code (each is also noted where it happens):
- A weight pruned in the middle of an epoch leaves the forward pass at once, because
  the owner map drives the forward mask. CPG keeps such a weight live until the
  `apply_mask` at the end of the epoch (the zeroing line in utils/prune.py is
  commented out).
- The ramp counts t as iterations done (1-based). It updates at every multiple of
  `pruning_frequency` and also at the ramp's last iteration, so every step ends
  exactly at its target. CPG's last update is at the last multiple of the frequency
  before the end, a hair below the target when the ramp length is not such a
  multiple. The ramp spans min(`pruning_interval`, `prune_train.epochs`) epochs.
- At the maximum width, a task that meets its goal but not `min_train_acc` is
  pruned normally. CPG's script would widen the network past its maximum there.
- The least sparsity forced on a task below its goal is rounded to 6 decimals. CPG
  compares `0.3 >= 1 - 0.7 = 0.30000000000000004`, which is false, and so prunes one
  step more.
- Goals are compared with unrounded accuracies. CPG rounds pruning accuracies to 4
  decimals in record.txt.
"""

import copy
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from omegaconf import OmegaConf

from clrun.config import AT_LEAST_1, FRACTION, NON_NEGATIVE, POSITIVE, Rule, checked
from clrun.data.stream import Task
from clrun.methods.parts.goals import load_goals
from clrun.methods.parts.weight_sharing import WeightSharingConfig, WeightSharingMethod, cpg_recipe
from clrun.models.shared_net import SharedNet
from clrun.train import FitStats, Optimizer, OptimizerConfig, Schedule, TrainConfig


def _phase(**changes) -> TrainConfig:
    """A pruning or retraining phase of CPG's recipe: a constant learning rate, with `changes`."""
    return cpg_recipe(schedule=Schedule.constant, milestones=[], **changes)


def _increasing_fractions(values) -> bool:
    return all(0 < v < 1 for v in values) and all(a < b for a, b in zip(values, values[1:], strict=False))


@dataclass
class CPGConfig(WeightSharingConfig):
    """CPG (ivclab/CPG experiment1/CPG_cifar100_scratch_mul_1.5.sh); PAE is this with picking off and max 2.0."""

    train: TrainConfig = field(default_factory=cpg_recipe)
    # picking masks during `train` (epochs follow `train`)
    mask_train: OptimizerConfig = field(
        default_factory=lambda: OptimizerConfig(
            optimizer=Optimizer.adam,
            lr=5e-4,
            schedule=Schedule.multistep,
            milestones=[50, 70],
            gammas=[0.2, 0.0],
        )
    )
    prune_train: TrainConfig = field(default_factory=lambda: _phase(epochs=20, lr=1e-3))
    sparsities: list[float] = checked(
        Rule(_increasing_fractions, "an increasing list of fractions in (0, 1)"),
        factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95],
    )
    pruning_interval: int = checked(Rule(NON_NEGATIVE.test, "at least 0"), 4)  # epochs of the cubic sparsity ramp
    pruning_frequency: int = checked(AT_LEAST_1, 10)  # iterations between mask updates during the ramp
    retrain: TrainConfig = field(default_factory=lambda: _phase(epochs=30, lr=1e-3))
    # picking masks in the retrain pass (epochs follow `retrain`)
    retrain_mask: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(optimizer=Optimizer.adam, lr=1e-4))
    retrain_patience: int = checked(AT_LEAST_1, 5)  # stop the retrain pass after this many epochs without a gain
    # stop pruning at the first step below the goal (CPG runs every step and keeps the largest that meets it)
    stop_at_first_miss: bool = False
    retrain_pass: bool = True  # the picking-mask retrain pass after pruning (tasks >= 2)
    picking: bool = True  # learn picking masks over earlier tasks' weights (false: PAE, use them all)
    mask_init: float = 1e-2
    threshold: float = checked(NON_NEGATIVE, 5e-3)
    # largest parameter multiplier growth may reach (channels scale by its sqrt)
    max_multiplier: float = checked(Rule(lambda v: v >= 1.0, "at least 1.0"), 1.5)
    grow_step: float = checked(POSITIVE, 0.5)  # multiplier added per growth
    # a training or pruning result counts only above this training accuracy (CPG's CIFAR code; null: no such check,
    # as CPG's fine-grained and face code)
    min_train_acc: Optional[float] = checked(Rule(lambda v: v < 1.0, "below 1.0"), 0.95)
    # a task meets its goal at accuracy >= goal - acc_margin, for growth and pruning (CPG's face and fine-grained
    # scripts' --acc_margin / 0.005; its CIFAR code: 0)
    acc_margin: float = checked(FRACTION, 0.0)
    # the train and pruning phases keep their epoch of best test accuracy (a pruning step: from the ramp's end on),
    # as CPG's fine-grained and face code keep their best-validation checkpoint; false: the final epoch (its CIFAR
    # code)
    keep_best: bool = False
    # accuracy goals: a number, a JSON file {task: acc}, or a run folder (clrun.methods.parts.goals); null: the
    # task's unpruned accuracy
    goals: Optional[str] = None


def cubic_sparsity(initial: float, target: float, progress: float) -> float:
    """Zhu and Gupta's gradual-pruning schedule s = s_f + (s_i - s_f)(1 - p)^3, with p clipped to [0, 1]."""
    p = min(1.0, max(0.0, progress))
    return target + (initial - target) * (1.0 - p) ** 3


def forced_sparsity(remaining_tasks: int) -> float:
    """CPG's least sparsity for a task below its goal at the maximum width: 1 - round(1 / (remaining + 1), 1).

    Rounded to 6 decimals so that the target 0.3 counts as reaching 1 - 0.7 (CPG's float compare does not).
    """
    return round(1.0 - round(1.0 / (remaining_tasks + 1), 1), 6)


def _masks_never_stop(mask_cfg):
    """`mask_cfg` without the milestones that set the learning rate to 0.

    CPG keeps training the masks (`stop_lr_mask = False`) when the task owns no weights to train.
    """
    if mask_cfg.schedule.value != "multistep":
        return mask_cfg
    if mask_cfg.gammas:
        kept = [(m, g) for m, g in zip(mask_cfg.milestones, mask_cfg.gammas, strict=True) if g > 0]
        return OmegaConf.merge(mask_cfg, {"milestones": [m for m, _ in kept], "gammas": [g for _, g in kept]})
    return mask_cfg if mask_cfg.gamma > 0 else OmegaConf.merge(mask_cfg, {"milestones": []})


class BestEpoch:
    """A phase's `validate` that keeps a copy of the network at its best test accuracy, from epoch `first` on."""

    def __init__(self, method: "CPG", task: Task, first: int = 1):
        self.method, self.task, self.first = method, task, first
        self.epochs, self.accuracy, self.state = 0, -math.inf, None

    def __call__(self) -> float:
        self.epochs += 1
        measured = self.method.current_accuracy(self.task, self.task.test)
        if self.epochs >= self.first and measured > self.accuracy:
            self.accuracy, self.state = measured, self.method._state()
        return measured


class CPG(WeightSharingMethod):
    """CPG, and PAE with `picking: false` (conf/method/cpg.yaml, conf/method/pae.yaml)."""

    config_class = CPGConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        goals = load_goals(cfg.goals, [task.name for task in stream.tasks])  # fails before any work
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.goals = goals

    # ---- the recipe ------------------------------------------------------------------
    def learn(self, task: Task) -> dict:
        cfg, tag = self.task_cfg(task), task.index + 1
        phases: dict[str, list[FitStats]] = {"train": [], "prune": [], "retrain": []}  # every training run

        # 1-2. train; widen and train again while the goal is missed and the width allows
        start = self.snapshot() if self.goals is not None and not self._at_max() else None
        growths = 0
        while True:
            train_acc, acc = self._train(task, cfg, phases["train"])
            goal = acc if self.goals is None else self.goals[task.index]
            needed = goal - cfg.acc_margin  # what meets the goal
            # at the maximum width this stops even when only min_train_acc failed (CPG would grow past the maximum)
            if self.goals is None or (self._trained(train_acc, cfg) and acc >= needed) or self._at_max():
                break
            if not self.trains(task):  # a pretrained task does not grow (CPG's ImageNet task)
                break
            self._grow(start, min(self.net.multiplier + cfg.grow_step, cfg.max_multiplier), task.index == 0)
            growths += 1
        del start
        # only possible at the maximum width (or for a pretrained task, which prunes as usual): prune anyway, to a
        # least sparsity
        below_goal = acc < needed and self.trains(task)

        # 3. compact; 4. retrain the picking masks. A task owning no weights skips both (CPG's exit 5).
        # a task without training images (ImageNet without its train folder) cannot be pruned either: it keeps all
        owns = int(self.net.owner_counts()[tag]) > 0 and len(task.train) > 0
        sparsity, least, kept_acc, steps = 0.0, float("nan"), acc, 0
        if owns:
            sparsity, least, kept_acc, steps = self._compact(task, cfg, acc, needed, below_goal, phases["prune"])
        retrained = False
        if cfg.retrain_pass and owns and self.net.picks():
            retrained, kept_acc = self._retrain(task, cfg, kept_acc, phases["retrain"])

        # 5. freeze
        earlier = int(self.net.owner_counts()[1:tag].sum())
        shares = self.shares(tag)
        record = self.net.end_task(tag)
        picked = sum(int(p.sum()) for p in record["pick"].values())
        if earlier == 0:
            picked_share = float("nan")
        else:
            picked_share = picked / earlier if cfg.picking else 1.0  # PAE uses every earlier weight

        return {
            **FitStats.total([stats for runs in phases.values() for stats in runs]).row(),
            "train_loss": FitStats.total(phases["train"]).loss,  # NaN for the pretrained task (not trained)
            **{f"{name}_phase_epochs": FitStats.total(runs).epochs for name, runs in phases.items()},  # all attempts
            **{f"{name}_phase_s": FitStats.total(runs).seconds for name, runs in phases.items()},
            **shares,
            "picked_share": picked_share,
            "growths": growths,
            "goal": float(goal),
            "acc_before_prune": float(acc),
            "sparsity": float(sparsity),
            "least_sparsity": float(least),
            "prune_steps": steps,
            "retrained": retrained,
            "acc_kept": float(kept_acc),
        }

    def _at_max(self) -> bool:
        return self.net.multiplier >= self.cfg.max_multiplier - 1e-9

    @staticmethod
    def _trained(train_acc: float, cfg) -> bool:
        """Whether a phase's final-epoch training accuracy counts (`min_train_acc`; null: always)."""
        return cfg.min_train_acc is None or train_acc > cfg.min_train_acc

    # ---- phases ----------------------------------------------------------------------
    def _train(self, task: Task, cfg, phase: list[FitStats]) -> tuple[float, float]:
        """Step 1: give the free weights to the task, train; return (final-epoch train acc, test acc)."""
        tag = task.index + 1
        picking = cfg.picking and task.index > 0
        self.net.begin_task(tag, picking=picking, mask_init=cfg.mask_init, threshold=cfg.threshold)
        head = self.add_head(task)
        assert head == task.index, "a task's head index must equal its task index"
        mask_cfg = cfg.mask_train
        if not int(self.net.owner_counts()[tag]):
            mask_cfg = _masks_never_stop(mask_cfg)  # nothing else to train: keep the masks learning
        if not self.trains(task):  # the pretrained network, as it is
            return math.nan, self.current_accuracy(task, task.test)
        best = BestEpoch(self, task) if cfg.keep_best else None
        label = f"train x{self.net.multiplier:g}"
        stats, train_acc = self.train_phase(task, cfg.train, label, mask_cfg=mask_cfg, validate=best)
        phase.append(stats)
        return train_acc, self._kept_accuracy(task, best)

    def _grow(self, start: SharedNet, multiplier: float, first: bool) -> None:
        """Step 2: go back to the network the task started from, at parameter multiplier `multiplier`."""
        net = copy.deepcopy(start)
        if first and not self.backbone_cfg.pretrained:
            # CPG retrains the first task from scratch at the wider width: a fresh backbone, nothing to copy
            # (with a pretrained backbone, `grow` copies the pretrained weights into the top-left block)
            net.rebuild(multiplier)
        else:
            net.grow(multiplier)
        self.net = self.hw.prepare_model(net)  # device and memory format for the new tensors

    def _compact(
        self, task: Task, cfg, acc: float, needed: float, below_goal: bool, phase: list[FitStats]
    ) -> tuple[float, float, float, int]:
        """Step 3: gradual pruning, keeping steps whose accuracy is at least `needed`; return (kept sparsity, least
        sparsity or NaN, its accuracy, steps run)."""
        tag = task.index + 1
        least = float("nan")
        if below_goal:
            least = forced_sparsity(len(self.stream) - (task.index + 1))
            if least <= 0:  # the last task may keep all its weights (CPG exits before the first step)
                return 0.0, least, acc, 0
        kept, kept_acc, kept_state = 0.0, acc, self._state()
        current, steps, initial = True, 0, 0.0  # current: whether the live network is the kept one
        for target in cfg.sparsities:
            train_acc, step_acc = self._prune_step(task, cfg, initial, target, phase)
            initial, steps = target, steps + 1  # each step starts from the one before, kept or not (CPG's)
            if not self._trained(train_acc, cfg):  # CPG records no such step and stops (exit 6)
                current = False
                break
            if not below_goal and step_acc < needed:
                current = False
                if cfg.stop_at_first_miss:
                    break
                continue
            kept, kept_acc, current = target, step_acc, True
            if below_goal and target >= least:
                break
            if target != cfg.sparsities[-1]:
                kept_state = self._state()
        if not current:
            self._restore(kept_state, tag)
        return kept, least, kept_acc, steps

    def _prune_step(self, task: Task, cfg, initial: float, target: float, phase: list[FitStats]) -> tuple[float, float]:
        """One sparsity step from `initial` to `target`; return (final-epoch train acc, test acc)."""
        tag = task.index + 1
        steps_per_epoch = -(-len(task.train) // cfg.prune_train.batch_size)
        ramp = min(cfg.pruning_interval, cfg.prune_train.epochs) * steps_per_epoch
        if ramp == 0:
            self.net.prune(tag, target)  # no ramp: one-shot to the target

        def after_step(step) -> None:
            # t = iterations done; the last update is at the ramp's end, so the step reaches its target exactly.
            # Deviation: the pruned weights leave the forward pass at once (CPG: at the end of the epoch).
            done = step.number + 1
            if done <= ramp and (done % cfg.pruning_frequency == 0 or done == ramp):
                self.net.prune(tag, cubic_sparsity(initial, target, done / ramp))

        # CPG's fine-grained and face code keep a step's best epoch once the ramp is done
        best = BestEpoch(self, task, first=min(cfg.pruning_interval, cfg.prune_train.epochs)) if cfg.keep_best else None
        label = f"prune {initial:g}->{target:g}"
        stats, train_acc = self.train_phase(task, cfg.prune_train, label, after_step=after_step, validate=best)
        phase.append(stats)
        return train_acc, self._kept_accuracy(task, best)

    def _retrain(self, task: Task, cfg, acc: float, phase: list[FitStats]) -> tuple[bool, float]:
        """Step 4: CPG's picking-mask retrain pass; return (whether it was kept, the kept accuracy)."""
        tag = task.index + 1
        before = self._state()
        self.net.reset_picks()
        best_acc = self.current_accuracy(task, task.test)  # CPG's baseline: measured with the re-initialised picks
        best, stale = None, 0

        def after_epoch(epochs_done: int) -> bool:
            nonlocal best, best_acc, stale
            epoch_acc = self.current_accuracy(task, task.test)
            self.net.train()
            if epoch_acc > best_acc:
                best, best_acc, stale = self._state(), epoch_acc, 0
            else:
                stale += 1
            return stale >= cfg.retrain_patience  # early stop

        stats, _ = self.train_phase(task, cfg.retrain, "retrain", mask_cfg=cfg.retrain_mask, after_epoch=after_epoch)
        phase.append(stats)
        self._restore(before if best is None else best, tag)
        return (False, acc) if best is None else (True, best_acc)

    # ---- helpers ---------------------------------------------------------------------
    def _kept_accuracy(self, task: Task, best: Optional["BestEpoch"]) -> float:
        """The test accuracy a phase leaves: its best epoch's, restored (`keep_best`), else the final epoch's."""
        if best is None or best.state is None:
            return self.current_accuracy(task, task.test)
        self._restore(best.state, task.index + 1)
        return best.accuracy

    def _state(self) -> dict[str, torch.Tensor]:
        """A copy of every tensor of the network (weights, owner map, picks, batch norm, heads)."""
        return {key: value.detach().clone() for key, value in self.net.state_dict().items()}

    def _restore(self, state: dict[str, torch.Tensor], tag: int) -> None:
        self.net.load_state_dict(state)
        self.net.refresh_masks(tag)
