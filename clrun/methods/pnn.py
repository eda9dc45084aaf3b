"""Progressive neural networks (Rusu et al. 2016): a new column per task, earlier columns frozen.

Task k's column is a fresh backbone (at `column_width` times backbone.width)
with its own head and lateral adapters from the activations of columns
0..k-1 into each of its layers but the first (`clrun.models.columns`); task k
predicts with column k alone, so earlier tasks' logits never change. Columns
are full width by default, as in Rusu et al. and mammoth: the method's real
cost then shows in its expansion (about T columns plus laterals growing
quadratically in T); joansj/hat's capacity-matched baseline uses narrow columns
(column_width = 1.117 / T) so that everything adds up to about one network.

Task scenario; the class and domain scenarios with `task_id`.
Backbones: mlp, convnet, vgg16_bn (plain feed-forward ones). With
`backbone.pretrained`, every column starts from it (at column_width 1 only).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from clrun.config import POSITIVE, checked
from clrun.data.stream import Task
from clrun.methods.base import Method, PerTaskMethodConfig
from clrun.models import build_backbone
from clrun.models.columns import Column, ProgressiveNet, layer_sequence
from clrun.results import Footprint, count_params, module_bytes


@dataclass
class PNNConfig(PerTaskMethodConfig):
    """Progressive neural networks (Rusu et al. 2016): a column per task, earlier columns frozen, lateral adapters."""

    # each column's width as a multiple of backbone.width: 1 = full columns (Rusu et al., mammoth);
    # joansj/hat's capacity-matched baseline: 1.117 / n_tasks
    column_width: float = checked(POSITIVE, 1.0)


class PNN(Method):
    config_class = PNNConfig

    def __init__(self, cfg, backbone_cfg, stream, hw):
        super().__init__(cfg, backbone_cfg, stream, hw)
        self.net = ProgressiveNet()
        with torch.device("meta"):  # shapes only: no memory, no random numbers drawn
            backbone = build_backbone(OmegaConf.merge(backbone_cfg, {"pretrained": None}), stream.input_shape)
        layer_sequence(backbone, backbone_cfg.name)  # an unsupported backbone fails now, before any work
        n_classes = stream.tasks[0].n_classes
        self.base_params = count_params(backbone) + (backbone.out_features + 1) * n_classes

    def new_column(self, task: Task) -> Column:
        """Column for `task`, with laterals from every column so far."""
        cfg = OmegaConf.merge(self.backbone_cfg, {"width": self.backbone_cfg.width * self.cfg.column_width})
        backbone = build_backbone(cfg, self.stream.input_shape)
        column = Column(backbone, self.backbone_cfg.name, task.n_classes, earlier=len(self.net.columns))
        return self.hw.prepare_model(column)

    def learn(self, task: Task) -> dict:
        self.net.columns.append(self.new_column(task))
        net, k = self.net, task.index
        column = net.columns[k].parameters()  # the new column, its head and its laterals; nothing earlier
        return self.fit(task, net, column, lambda x, y, step: F.cross_entropy(net(x, k), y)).row()

    def predict(self, x: torch.Tensor, task: int) -> torch.Tensor:
        self.net.eval()
        return self.net(x, task)

    def state_dict(self) -> dict:
        return {"net": self.net.state_dict(), "n_tasks": len(self.net.columns)}

    def load_state_dict(self, state: dict) -> None:
        self.net = ProgressiveNet()
        for task in self.stream.tasks[: state["n_tasks"]]:
            self.net.columns.append(self.new_column(task))
        self.net.load_state_dict(state["net"])

    def footprint(self) -> Footprint:
        """Every column with its head and laterals; the base is one backbone at backbone.width with one head."""
        return Footprint(params=count_params(self.net), bytes=module_bytes(self.net), base_params=self.base_params)
