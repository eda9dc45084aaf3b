"""CPG: Compacting, Picking and Growing (Hung et al., NeurIPS 2019); PAE is CPG without picking.

Each task t (owner tag t + 1) runs ivclab/CPG's CIFAR-100 pipeline
(experiment1/CPG_cifar100_scratch_mul_1.5.sh; cpg.md §2.2, §3.1):

1. **Train.** The task takes every free weight. It trains them together with its
   batch norm, biases and head under `train`. From the second task on, with
   `picking`, it also trains a real-valued picking mask over earlier tasks' frozen
   weights under `mask_train` (Adam). The mask starts at `mask_init`, above
   `threshold`, so every earlier weight starts picked.
2. **Goal and growth.** The task's final-epoch test accuracy must reach its goal
   (`clrun.methods.goals`; CPG validates on the test split) and its final-epoch
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
   still meets the goal (`allow_acc_loss` 0). If no step meets it, the task stays
   unpruned. A task still below its goal at the maximum width is pruned anyway, to
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
- The pruning loop stops at the first step that misses the goal. CPG runs every
  step, stopping only on training accuracy, and keeps the largest step that met the
  goal. The two differ only when accuracy comes back at a higher sparsity after
  missing the goal.
- At the maximum width, a task that meets its goal but not `min_train_acc` is
  pruned normally. CPG's script would widen the network past its maximum there.
- The least sparsity forced on a task below its goal is rounded to 6 decimals. CPG
  compares `0.3 >= 1 - 0.7 = 0.30000000000000004`, which is false, and so prunes one
  step more.
- Goals are compared with unrounded accuracies. CPG rounds pruning accuracies to 4
  decimals in record.txt.
"""

import copy

import torch
from omegaconf import OmegaConf

from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.goals import load_goals
from clrun.methods.sharing import WeightSharingMethod, phase_totals
from clrun.models.sharing import SharedNet


def cubic_sparsity(initial: float, target: float, progress: float) -> float:
    """Zhu and Gupta's gradual-pruning schedule s = s_f + (s_i - s_f)(1 - p)^3, with p clipped to [0, 1]."""
    p = min(1.0, max(0.0, progress))
    return target + (initial - target) * (1.0 - p) ** 3


def forced_sparsity(remaining_tasks: int) -> float:
    """CPG's least sparsity for a task below its goal at the maximum width: 1 - round(1 / (remaining + 1), 1).

    Rounded to 6 decimals so that the target 0.3 counts as reaching 1 - 0.7 (CPG's float compare does not).
    """
    return round(1.0 - round(1.0 / (remaining_tasks + 1), 1), 6)


def _check_config(cfg) -> None:
    """One-line errors for CPG values out of range, before any work."""

    def require(key: str, ok: bool, expected: str) -> None:
        if not ok:
            raise ClrunError(f"method.{key}={OmegaConf.select(cfg, key)} is invalid: it must be {expected}")

    s = list(cfg.sparsities)
    require(
        "sparsities",
        all(0 < v < 1 for v in s) and all(a < b for a, b in zip(s, s[1:], strict=False)),
        "an increasing list of fractions in (0, 1)",
    )
    require("pruning_interval", cfg.pruning_interval >= 0, "at least 0")
    require("pruning_frequency", cfg.pruning_frequency >= 1, "at least 1")
    require("retrain_patience", cfg.retrain_patience >= 1, "at least 1")
    require("max_multiplier", cfg.max_multiplier >= 1.0, "at least 1.0")
    require("grow_step", cfg.grow_step > 0, "positive")
    require("threshold", cfg.threshold >= 0, "non-negative")
    require("min_train_acc", cfg.min_train_acc < 1.0, "below 1.0")
    for phase in ("prune_train", "retrain"):
        require(f"{phase}.epochs", cfg[phase].epochs >= 1, "at least 1")
        require(f"{phase}.batch_size", cfg[phase].batch_size >= 1, "at least 1")
        require(f"{phase}.lr", cfg[phase].lr > 0, "positive")
    for phase in ("mask_train", "retrain_mask"):
        require(f"{phase}.lr", cfg[phase].lr >= 0, "non-negative")


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


class CPG(WeightSharingMethod):
    """CPG, and PAE with `picking: false` (conf/method/cpg.yaml, conf/method/pae.yaml)."""

    def __init__(self, cfg, backbone_cfg, stream, hw):
        _check_config(cfg)
        goals = load_goals(cfg.goals, [task.name for task in stream.tasks])  # fails before any work
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.goals = goals

    # ---- the recipe ------------------------------------------------------------------
    def learn(self, task: Task, progress) -> dict:
        cfg, tag = self.cfg, task.index + 1
        phases: dict[str, list[dict]] = {"train": [], "prune": [], "retrain": []}  # train_phase rows per phase

        # 1-2. train; widen and train again while the goal is missed and the width allows
        start = self.snapshot() if self.goals is not None and not self._at_max() else None
        growths = 0
        while True:
            train_acc, acc = self._train(task, progress, phases["train"])
            goal = acc if self.goals is None else self.goals[task.index]
            # at the maximum width this stops even when only min_train_acc failed (CPG would grow past the maximum)
            if self.goals is None or (train_acc > cfg.min_train_acc and acc >= goal) or self._at_max():
                break
            self._grow(start, min(self.net.multiplier + cfg.grow_step, cfg.max_multiplier), task.index == 0)
            growths += 1
        del start
        below_goal = acc < goal  # only possible at the maximum width: prune anyway, to a least sparsity

        # 3. compact; 4. retrain the picking masks. A task owning no weights skips both (CPG's exit 5).
        owns = int(self.net.owner_counts()[tag]) > 0
        sparsity, least, kept_acc, steps = 0.0, float("nan"), acc, 0
        if owns:
            sparsity, least, kept_acc, steps = self._compact(task, progress, acc, goal, below_goal, phases["prune"])
        retrained = False
        if cfg.retrain_pass and owns and self.net.picks():
            retrained, kept_acc = self._retrain(task, progress, kept_acc, phases["retrain"])

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
            **phase_totals([row for rows in phases.values() for row in rows]),
            "train_loss": phases["train"][-1]["train_loss"],
            **{f"{name}_phase_epochs": phase_totals(rows)["epochs"] for name, rows in phases.items()},  # all attempts
            **{f"{name}_phase_s": phase_totals(rows)["train_s"] for name, rows in phases.items()},
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

    # ---- phases ----------------------------------------------------------------------
    def _train(self, task: Task, progress, phase: list[dict]) -> tuple[float, float]:
        """Step 1: give the free weights to the task, train; return (final-epoch train acc, test acc)."""
        cfg, tag = self.cfg, task.index + 1
        picking = cfg.picking and task.index > 0
        self.net.begin_task(tag, picking=picking, mask_init=cfg.mask_init, threshold=cfg.threshold)
        head = self.add_head(task)
        assert head == task.index, "a task's head index must equal its task index"
        mask_cfg = cfg.mask_train
        if not int(self.net.owner_counts()[tag]):
            mask_cfg = _masks_never_stop(mask_cfg)  # nothing else to train: keep the masks learning
        label = f"train x{self.net.multiplier:g}"
        train_acc = self._fit(task, cfg.train, progress, label, phase, mask_cfg=mask_cfg)
        return train_acc, self.current_accuracy(task, task.test)

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
        self, task: Task, progress, acc: float, goal: float, below_goal: bool, phase: list[dict]
    ) -> tuple[float, float, float, int]:
        """Step 3: gradual pruning; return (kept sparsity, least sparsity or NaN, its accuracy, steps run)."""
        cfg, tag = self.cfg, task.index + 1
        least = float("nan")
        if below_goal:
            least = forced_sparsity(len(self.stream) - (task.index + 1))
            if least <= 0:  # the last task may keep all its weights (CPG exits before the first step)
                return 0.0, least, acc, 0
        kept, kept_acc, kept_state = 0.0, acc, self._state()
        current, steps = True, 0  # whether the live network is the kept one
        for target in cfg.sparsities:
            train_acc, step_acc = self._prune_step(task, progress, kept, target, phase)
            steps += 1
            # CPG records a step only above min_train_acc and stops there (exit 6); we also stop at the first step
            # that misses the goal, while CPG runs every step and keeps the largest that meets it.
            if train_acc <= cfg.min_train_acc or (not below_goal and step_acc < goal):
                current = False
                break
            kept, kept_acc = target, step_acc
            if below_goal and target >= least:
                break
            if target != cfg.sparsities[-1]:
                kept_state = self._state()
        if not current:
            self._restore(kept_state, tag)
        return kept, least, kept_acc, steps

    def _prune_step(
        self, task: Task, progress, initial: float, target: float, phase: list[dict]
    ) -> tuple[float, float]:
        """One sparsity step from `initial` to `target`; return (final-epoch train acc, test acc)."""
        cfg, tag = self.cfg, task.index + 1
        steps_per_epoch = -(-len(task.train) // cfg.prune_train.batch_size)
        ramp = min(cfg.pruning_interval, cfg.prune_train.epochs) * steps_per_epoch
        if ramp == 0:
            self.net.prune(tag, target)  # no ramp: one-shot to the target

        def after_step(step: int) -> None:
            # t = iterations done; the last update is at the ramp's end, so the step reaches its target exactly.
            # Deviation: the pruned weights leave the forward pass at once (CPG: at the end of the epoch).
            if step <= ramp and (step % cfg.pruning_frequency == 0 or step == ramp):
                self.net.prune(tag, cubic_sparsity(initial, target, step / ramp))

        label = f"prune {initial:g}->{target:g}"
        train_acc = self._fit(task, cfg.prune_train, progress, label, phase, after_step=after_step)
        return train_acc, self.current_accuracy(task, task.test)

    def _retrain(self, task: Task, progress, acc: float, phase: list[dict]) -> tuple[bool, float]:
        """Step 4: CPG's picking-mask retrain pass; return (whether it was kept, the kept accuracy)."""
        cfg, tag = self.cfg, task.index + 1
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

        self._fit(task, cfg.retrain, progress, "retrain", phase, mask_cfg=cfg.retrain_mask, after_epoch=after_epoch)
        self._restore(before if best is None else best, tag)
        return (False, acc) if best is None else (True, best_acc)

    # ---- helpers ---------------------------------------------------------------------
    def _fit(self, task: Task, train_cfg, progress, label: str, phase: list[dict], **options) -> float:
        """`train_phase`, keeping its row in `phase`; returns the last epoch's train accuracy."""
        row = self.train_phase(task, train_cfg, progress, label, **options)
        phase.append(row)
        return row["train_acc"]

    def _state(self) -> dict[str, torch.Tensor]:
        """A copy of every tensor of the network (weights, owner map, picks, batch norm, heads)."""
        return {key: value.detach().clone() for key, value in self.net.state_dict().items()}

    def _restore(self, state: dict[str, torch.Tensor], tag: int) -> None:
        self.net.load_state_dict(state)
        self.net.refresh_masks(tag)
