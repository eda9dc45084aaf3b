"""How HAT trains gated layers (Serra et al., ICML 2018; joansj/hat), for HAT and the methods that borrow its gates
(CCGN's frozen channels, DER's channel masks): gradient factors that keep what earlier tasks use, the embeddings'
gradient compensation, and the steepness schedule."""

import torch
from torch import nn

from clrun.models.gating import GatedLayer
from clrun.models.layers import Conv2d

COSH_CLAMP = 50.0  # joansj/hat's thres_cosh: s e is clamped inside cosh


def gradient_factors(
    layers: list[GatedLayer], cumulative: list[torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per gated layer, what its weight and bias gradients are multiplied by: 1 - min(a^{<t} of the output unit,
    a^{<t} of the input unit) (first layer: the output unit's) and 1 - a^{<t} of the output unit."""
    factors = []
    for gated, out in zip(layers, cumulative, strict=True):
        used = out[:, None]
        if gated.input_gate is not None:
            inputs = cumulative[gated.input_gate].repeat_interleave(gated.input_repeat)
            used = torch.minimum(used, inputs[None, :])
        if isinstance(gated.layer, Conv2d):
            used = used[:, :, None, None]
        factors.append((1 - used, 1 - out))
    return factors


def restrict_gradients(
    params: list[torch.Tensor],
    weight_decay: float,
    layers: list[GatedLayer],
    factors: list[tuple[torch.Tensor, torch.Tensor]] | None,
) -> None:
    """Add weight decay to the gradients by hand, then scale the gated layers' gradients by `factors`
    (`gradient_factors`), so that neither decay nor the step moves what earlier tasks hold."""
    if weight_decay:
        for p in params:
            p.grad.add_(p.detach(), alpha=weight_decay)
    if factors is not None:
        for gated, (weight_factor, bias_factor) in zip(layers, factors, strict=True):
            gated.layer.weight.grad.mul_(weight_factor)
            if gated.layer.bias is not None:
                gated.layer.bias.grad.mul_(bias_factor)


def compensate(embeddings: list[nn.Parameter], s: float, s_max: float) -> None:
    """HAT's gradient compensation of gate embeddings: times s_max (cosh(clamp(s e)) + 1) / (s (cosh(e) + 1)), so
    they keep learning while s is small or large."""
    for e in embeddings:
        value = e.detach()
        e.grad.mul_(s_max / s * (torch.cosh((s * value).clamp(-COSH_CLAMP, COSH_CLAMP)) + 1))
        e.grad.div_(torch.cosh(value) + 1)


def steepness(s_max: float, progress: float) -> float:
    """The gate steepness s at `progress` (0 to 1) through an epoch: 1/s_max to s_max, linearly."""
    return 1 / s_max + (s_max - 1 / s_max) * progress
