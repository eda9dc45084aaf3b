"""Memory aware synapses (Aljundi et al. 2018).

After each task, a parameter's importance is the mean over the task's training images of
|d ||f(x)||^2 / d theta|, f the task's output (its logits) as the scenario defines it, in eval mode, per
sample as the paper defines it (the original code, rahafaljundi/MAS-Memory-Aware-Synapses, takes the
squared L2 norm in eval mode too, but of batch gradients). FACIL and Avalanche use the unsquared norm in
train mode instead. Importance adds up over
tasks (the original's sum, not FACIL's alpha-average); the anchor moves to the current parameters; the
penalty is lambda * sum_i Omega_i (theta_i - anchor_i)^2.
"""

import torch

from clrun.data.stream import Task
from clrun.methods.regularization import Regularization, Tensors, sample_mean


def squared_norm(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the squared L2 norm of the output, with weight 1."""
    norm = logits.square().sum(1, keepdim=True)
    return norm, torch.ones_like(norm)


class MAS(Regularization):
    @property
    def penalty_weight(self) -> float:
        return self.cfg.mas_lambda

    def importance_of(self, task: Task, names: list[str]) -> Tensors:
        """Mean |gradient of the squared output norm| on `importance_samples` of the task's training images."""
        images = self.sample_images(task, self.cfg.importance_samples)
        return sample_mean(self.model, names, images, self.prepare, self.output_head(task), squared_norm, torch.abs)

    def consolidate(self, task: Task, trained: dict[str, torch.nn.Parameter]) -> None:
        omega, anchor = (self.importance[0], self.anchors[0]) if self.importance else ({}, {})
        for name, added in self.importance_of(task, list(trained)).items():
            omega[name] = omega[name] + added if name in omega else added
            anchor[name] = trained[name].detach().clone()
        self.importance, self.anchors = [omega], [anchor]
