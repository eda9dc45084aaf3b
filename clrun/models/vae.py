"""The symmetric fully connected variational autoencoder deep generative replay samples from.

As van de Ven's MNIST generator (GMvandeVen/continual-learning, `vae_models.py` `AutoEncoder` at 86802a8, the
2019 code): encoder flatten -> Linear + ReLU per hidden layer -> (mean, log-variance) of z; decoder z -> the hidden
layers in reverse, Linear + ReLU each -> one logit per pixel (a Bernoulli per pixel, sigmoid for the image); a
standard normal prior. Its loss is the 2019 code's with `average=True`: the per-pixel binary cross-entropy averaged
over pixels, plus the analytic KL divergence to the prior divided by the number of pixels, both averaged over the
batch. Departures: no classifier layer on the encoder (the reference's `lamda_pl` is 0 for DGR's generator, so it
never trains); the decoder outputs logits and the loss is `binary_cross_entropy_with_logits` (the same value as
sigmoid then BCE, and safe under autocast).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(sizes: list[int]) -> nn.Sequential:
    """Linear + ReLU for each consecutive pair of `sizes`."""
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), nn.ReLU()]
    return nn.Sequential(*layers)


class VAE(nn.Module):
    """A VAE on images of `input_shape` (C, H, W) with pixels in [0, 1]: `hidden` units per encoder layer (the
    decoder mirrors them) and a latent z of `z_dim`."""

    def __init__(self, input_shape: tuple[int, int, int], hidden: list[int], z_dim: int) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        self.z_dim = z_dim
        pixels = math.prod(self.input_shape)
        hidden = [int(h) for h in hidden]
        self.encoder = nn.Sequential(nn.Flatten(), _mlp([pixels, *hidden]))
        top = hidden[-1] if hidden else pixels
        self.to_mean = nn.Linear(top, z_dim)
        self.to_logvar = nn.Linear(top, z_dim)
        reverse = hidden[::-1]
        self.decoder = nn.Sequential(_mlp([z_dim, *reverse]), nn.Linear(reverse[-1] if reverse else z_dim, pixels))

    @property
    def pixels(self) -> int:
        return math.prod(self.input_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Per-pixel logits (N, C, H, W) for latents z."""
        return self.decoder(z).view(len(z), *self.input_shape)

    def sample(self, n: int) -> torch.Tensor:
        """`n` images (N, C, H, W) in [0, 1] decoded from z drawn from the prior (torch's global RNG on the model's
        device); no gradients."""
        device = self.to_mean.weight.device
        with torch.no_grad():
            return torch.sigmoid(self.decode(torch.randn(n, self.z_dim, device=device)).float())

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """The VAE loss of a batch of images in [0, 1]: mean per-pixel BCE + KL / pixels, averaged over the batch."""
        hidden = self.encoder(images)
        mean, logvar = self.to_mean(hidden).float(), self.to_logvar(hidden).float()
        z = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        logits = self.decode(z).float().flatten(1)
        recon = F.binary_cross_entropy_with_logits(logits, images.flatten(1).float(), reduction="none").mean(1)
        kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(1) / self.pixels
        return (recon + kl).mean()
