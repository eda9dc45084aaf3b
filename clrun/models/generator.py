"""DGMw's generator (Ostapenko et al., CVPR 2019; SAP machine-learning-dgm, networks/net_DGMw.py): a DCGAN-style
stack of transposed convolutions whose every weight is multiplied by a per-task mask, grown after each task.

z (N, nz) -> three masked 4x4 transposed convolutions (1x1 -> 4x4 -> 8x8 -> 16x16; 4, 2 and 1 x `ngf` channels),
each followed by the task's own batch norm and a ReLU -> the task's own unmasked output layer (16x16 -> 32x32,
`channels`) -> tanh. Task t reads the first `task_widths[t]` channels of each layer: the widths the layers had when
it trained, so channels added later never reach it. `grow` adds channels so that as many weights are free after
a task as before it (the code's `extand`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from clrun.models.layers import BatchNorm2d

KERNEL = 4
LAYERS = ((1, 0), (2, 1), (2, 1))  # (stride, padding) of the masked layers
OUTPUT = (2, 1)  # of each task's output layer
NEW_STD = 0.02  # weights a growth adds: N(0, 0.02) (the code's weights_init)


class MaskedGenerator(nn.Module):
    """Weight-masked transposed convolutions (weights laid out (in, out, k, k)), per-task batch norms and output
    layers; `forward` takes the task's masks, one per layer in the shape its weights had at the task."""

    def __init__(self, nz: int, ngf: int, channels: int) -> None:
        super().__init__()
        self.nz, self.channels = nz, channels
        sizes = [nz, 4 * ngf, 2 * ngf, ngf]
        gain = nn.init.calculate_gain("relu")  # the code's weights_init_g: Xavier-uniform with ReLU gain
        self.weights = nn.ParameterList(
            nn.Parameter(nn.init.xavier_uniform_(torch.empty(c_in, c_out, KERNEL, KERNEL), gain=gain))
            for c_in, c_out in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.norms = nn.ModuleList()  # per task, one batch norm per layer at its widths
        self.outputs = nn.ModuleList()  # per task, its output layer
        self.task_widths: list[list[int]] = []  # per task, each layer's output channels when it trained

    def widths(self) -> list[int]:
        """Each masked layer's output channels now."""
        return [w.shape[1] for w in self.weights]

    def add_task(self) -> int:
        """Batch norms and an output layer at the current widths for a new task; return its index."""
        self._append(self.widths())
        if len(self.norms) == 1:  # the code initialises only its first batch norms N(1, 0.02)
            for norm in self.norms[0]:
                nn.init.normal_(norm.weight, 1.0, 0.02)
        return len(self.task_widths) - 1

    def _append(self, widths: list[int]) -> None:
        device = self.weights[0].device
        self.norms.append(nn.ModuleList(BatchNorm2d(c) for c in widths).to(device))
        self.outputs.append(nn.ConvTranspose2d(widths[-1], self.channels, KERNEL, *OUTPUT, bias=False).to(device))
        self.task_widths.append(list(widths))

    def task_params(self, task: int) -> list[nn.Parameter]:
        """What training task `task` moves: the shared weights, its batch norms and output layer."""
        return [*self.weights, *self.norms[task].parameters(), *self.outputs[task].parameters()]

    def forward(self, z: torch.Tensor, task: int, masks: list[torch.Tensor]) -> torch.Tensor:
        """Images in [-1, 1], (N, channels, 32, 32), from noise z (N, nz) under task `task`'s masks."""
        x, c_in = z[:, :, None, None], self.nz
        for weight, mask, (stride, padding), norm, c_out in zip(
            self.weights, masks, LAYERS, self.norms[task], self.task_widths[task], strict=True
        ):
            x = F.relu(norm(F.conv_transpose2d(x, weight[:c_in, :c_out] * mask, None, stride, padding)))
            c_in = c_out
        return torch.tanh(self.outputs[task](x))

    @torch.no_grad()
    def grow(self, reserved: list[int]) -> list[int]:
        """Add output channels (and the inputs they feed) so that each layer gains at least `reserved[i]` weights,
        the number the last task reserved in it (the code's `extand`: the inputs a wider layer below adds count
        first); return the channels added per layer."""
        added, grown_in = [], 0
        for i, weight in enumerate(self.weights):
            c_in, c_out = weight.shape[:2]
            area = KERNEL * KERNEL
            out = max(math.ceil((reserved[i] - grown_in * c_out * area) / ((c_in + grown_in) * area)), 0)
            new = torch.empty(c_in + grown_in, c_out + out, KERNEL, KERNEL, device=weight.device).normal_(0, NEW_STD)
            new[:c_in, :c_out] = weight
            self.weights[i] = nn.Parameter(new)
            added.append(out)
            grown_in = out
        return added

    def resize(self, shapes: list[torch.Size], task_widths: list[list[int]]) -> None:
        """Take the weight shapes and per-task parts of a saved generator (before `load_state_dict`)."""
        for i, shape in enumerate(shapes):
            self.weights[i] = nn.Parameter(self.weights[i].new_empty(shape))
        self.norms, self.outputs, self.task_widths = nn.ModuleList(), nn.ModuleList(), []
        for widths in task_widths:
            self._append(widths)
