"""XdG: context-dependent gating (Masse, Grant & Freedman, PNAS 2018), as van de Ven et al. run it.

Each task gets a fixed random binary gate on every hidden layer that silences
round(gating x units) of its units (or conv channels; `gate_conv: false` gates the
hidden linear layers only, as van de Ven's CIFAR runs), after the nonlinearity, the
same at training and test (`clrun.models.gating`). The output heads are not gated.
Nothing in the gates is learned. The gates of all tasks are drawn up front from a
generator seeded with `mask_seed` (null: torch's initial seed, which clrun sets to the
run's seed), and kept in the checkpoint.

Underneath is one shared model trained as `finetune`, or with `regularizer: ewc` / `si`
as `clrun.methods.ewc` / `clrun.methods.si` train it (offline EWC without replay; SI as
van de Ven runs it), every pass gated by the current task's gate (the Fisher and the
path integral too). Units that tasks share still drift, so XdG does not claim zero
forgetting. Task scenario; class and domain with `task_id` (each task's gate gives its
own output).

Batch norm (convnet, vgg16_bn): the affine parameters are shared (and regularised) like
every weight, but each task predicts with the running statistics measured under its own
gate, kept when it ends: a gate changes what every later batch norm sees (two split-MNIST
tasks, convnet width 0.5, gating 0.5: task 0 fell from 100% to 46% with the statistics
shared, to 95% with its own).
"""

import torch
from omegaconf import OmegaConf
from torch.func import functional_call

from clrun.config import EWCConfig, MethodConfig, SIConfig
from clrun.data.stream import Task
from clrun.errors import ClrunError
from clrun.methods.base import Footprint, Method
from clrun.methods.ewc import EWC
from clrun.methods.finetune import Finetune
from clrun.methods.si import SI
from clrun.models.gating import GatedLayer, Gates, batch_norm_state, gated_layers
from clrun.models.layers import Linear

INNER = {"none": (Finetune, MethodConfig), "ewc": (EWC, EWCConfig), "si": (SI, SIConfig)}


def inner_config(cfg):
    """The config of the method under the gates: fine-tuning, EWC or SI with XdG's training and penalty keys."""
    method_class, schema = INNER[cfg.regularizer.value]
    values = {
        "_target_": f"{method_class.__module__}.{method_class.__name__}",
        "name": cfg.name,
        "train": cfg.train,
        "eval_batch_size": cfg.eval_batch_size,
    }
    if cfg.regularizer.value == "ewc":
        values |= {"ewc_lambda": cfg.ewc_lambda, "fisher_samples": cfg.fisher_samples}
    if cfg.regularizer.value == "si":
        values |= {"si_c": cfg.si_c, "epsilon": cfg.epsilon}
    return OmegaConf.merge(OmegaConf.structured(schema), values)


def draw_masks(layers: list[GatedLayer], n_tasks: int, gating: float, seed: int) -> list[list[torch.Tensor]]:
    """Per task, per layer: a bool mask keeping all but round(gating x units) units chosen at random
    (van de Ven: int(gating x units); round avoids 0.29 x 100 = 28.99...)."""
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for _ in range(n_tasks):
        task = []
        for layer in layers:
            keep = torch.ones(layer.units, dtype=torch.bool)
            keep[torch.randperm(layer.units, generator=generator)[: round(gating * layer.units)]] = False
            task.append(keep)
        masks.append(task)
    return masks


class XdG(Method):
    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        method_class, _ = INNER[cfg.regularizer.value]
        self.inner = method_class(inner_config(cfg), backbone_cfg, stream, hw)
        self._attach()
        seed = torch.initial_seed() if cfg.mask_seed is None else cfg.mask_seed
        self.masks = draw_masks(self.layers, len(stream), cfg.gating, seed)
        self.statistics: list[dict[str, torch.Tensor]] = []  # per learned task: batch-norm statistics under its gate

    def _attach(self) -> None:
        """Hook the gates onto the inner model's hidden layers (again after it is rebuilt by a reload)."""
        layers = gated_layers(self.inner.model.backbone, "xdg")
        self.layers = [g for g in layers if self.cfg.gate_conv or isinstance(g.layer, Linear)]
        if not self.layers:
            raise ClrunError(
                f"method xdg: gate_conv=false leaves no hidden linear layer to gate in {self.backbone_cfg.name}"
            )
        self.gates = Gates(self.layers)

    def task_gates(self, task: int) -> list[torch.Tensor]:
        """Task `task`'s gates as 0/1 floats on the device."""
        return [mask.to(self.hw.device, torch.float32) for mask in self.masks[task]]

    def learn(self, task: Task, progress) -> dict:
        with self.gates.use(self.task_gates(task.index)):
            row = self.inner.learn(task, progress)
        self.statistics.append(batch_norm_state(self.inner.model, statistics_only=True))
        return row

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        """The inner model's output for `task` (as its `predict`), under the task's gate and batch-norm statistics."""
        self.inner.model.eval()
        with self.gates.use(self.task_gates(task)):
            return functional_call(self.inner.model, self.statistics[task], (x, task))

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict(), "masks": self.masks, "statistics": self.statistics}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])
        self._attach()
        self.masks = state["masks"]
        self.statistics = [{k: v.to(self.hw.device) for k, v in task.items()} for task in state["statistics"]]

    def footprint(self) -> Footprint:
        """The inner method's footprint plus, per learned task, its gates as bits and its batch-norm statistics."""
        footprint = self.inner.footprint()
        learned = len(self.statistics)
        stored = sum(-(-mask.numel() // 8) for task in self.masks[:learned] for mask in task)
        stored += sum(t.numel() * t.element_size() for task in self.statistics for t in task.values())
        return Footprint(footprint.params, footprint.bytes + stored, footprint.base_params)
