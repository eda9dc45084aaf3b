"""The face tasks' model parts (CPG's Table 4, after SphereFace, Liu et al. CVPR 2017): the A-Softmax classifier
`AngleLinear` and its loss `angle_loss`, the face-verification head `FaceHead` (embedding layer + AngleLinear), and
CPG's class weights for expression.

SphereFace's code (clcarwin/sphereface_pytorch, `net_sphere.py`) and CPG's copy of it (ivclab/CPG
`models/spherenet.py`, `utils/manager.py`) are the reference; this is a re-implementation.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from clrun.models.layers import HEAD_STD, Linear

# cos(m theta) as a polynomial of cos(theta) (Chebyshev polynomials of the first kind), m = 0..5
CHEBYSHEV = (
    lambda c: torch.ones_like(c),
    lambda c: c,
    lambda c: 2 * c**2 - 1,
    lambda c: 4 * c**3 - 3 * c,
    lambda c: 8 * c**4 - 8 * c**2 + 1,
    lambda c: 16 * c**5 - 20 * c**3 + 5 * c,
)
LAMBDA_MAX, LAMBDA_MIN = 1500.0, 5.0  # SphereFace's annealing of the A-Softmax target logit


class AngleLinear(nn.Module):
    """A-Softmax's classifier: for features x and class weights w_j (each renormalised to unit length), the pair
    (|x| cos(theta_j), |x| phi(theta_j)) with cos(theta_j) = x.w_j / (|x| |w_j|) clamped to [-1, 1] and
    phi(theta) = (-1)^k cos(m theta) - 2k, k = floor(m theta / pi): a monotone decreasing extension of cos(m theta)
    over [0, pi]. `weight` is (out_features, in_features), as a `Linear`'s."""

    def __init__(self, in_features: int, out_features: int, m: int = 4):
        super().__init__()
        if m not in range(len(CHEBYSHEV)):
            raise ValueError(f"AngleLinear: m must be in 0..{len(CHEBYSHEV) - 1}, got {m}")
        self.in_features, self.out_features, self.m = in_features, out_features, m
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, 0.0, HEAD_STD)  # CPG's `add_dataset` (SphereFace: uniform, renormalised)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(|x| cos(theta), |x| phi(theta)), each (N, out_features)."""
        w = F.normalize(self.weight, dim=1)
        x_norm = x.norm(dim=1, keepdim=True)
        cos = (x @ w.t() / x_norm.clamp_min(1e-12)).clamp(-1.0, 1.0)
        cos_m = CHEBYSHEV[self.m](cos)
        k = torch.floor(self.m * torch.acos(cos.detach()) / math.pi)  # constant per sample: no gradient (SphereFace)
        phi = (1.0 - 2.0 * torch.remainder(k, 2)) * cos_m - 2.0 * k  # (-1)^k cos(m theta) - 2k
        return cos * x_norm, phi * x_norm

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, m={self.m}"


def angle_lambda(iteration: int) -> float:
    """SphereFace's weight of the plain cosine at the target, after `iteration` loss evaluations (1-based):
    max(5, 1500 / (1 + 0.1 iteration))."""
    return max(LAMBDA_MIN, LAMBDA_MAX / (1.0 + 0.1 * iteration))


def angle_logits(cos: torch.Tensor, phi: torch.Tensor, target: torch.Tensor, iteration: int) -> torch.Tensor:
    """A-Softmax's logits: `cos` everywhere but at the target class, where it is cos - cos / (1 + lambda) +
    phi / (1 + lambda), lambda = `angle_lambda(iteration)`."""
    at_target = F.one_hot(target, cos.shape[1]).to(cos.dtype)
    return cos + at_target * (phi - cos) / (1.0 + angle_lambda(iteration))


def angle_loss(outputs: tuple[torch.Tensor, torch.Tensor], target: torch.Tensor, iteration: int) -> torch.Tensor:
    """SphereFace's `AngleLoss` with gamma 0: mean cross-entropy of `angle_logits`. `iteration` is the 1-based
    count of loss evaluations that its `it` counter holds (CPG creates the loss afresh for every training run, so a
    phase's step number + 1)."""
    cos, phi = outputs
    return F.cross_entropy(angle_logits(cos.float(), phi.float(), target, iteration), target)


class FaceHead(nn.Module):
    """CPG's face-verification head: the embedding layer Linear(in_features, embedding) (the backbone's flattened
    trunk in; SphereFace's fc5), then `AngleLinear(embedding, n_classes, m)`. Called, it returns the logits
    |x| cos(theta) (what `predict` ranks classes by); `embed` gives the embedding (what verification compares),
    `angular` the (cos, phi) pair `angle_loss` takes."""

    def __init__(self, in_features: int, n_classes: int, embedding: int = 512, m: int = 4):
        super().__init__()
        self.embedding = Linear(in_features, embedding)
        nn.init.normal_(self.embedding.weight, 0.0, HEAD_STD)  # CPG's `add_dataset`: N(0, 0.01), bias 0
        nn.init.zeros_(self.embedding.bias)
        self.angle = AngleLinear(embedding, n_classes, m)

    @property
    def out_features(self) -> int:
        return self.angle.out_features

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        return self.embedding(features)

    def angular(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.angle(self.embedding(features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.angular(features)[0]


def class_weights(counts) -> torch.Tensor:
    """Cross-entropy class weights (N - n_c) / n_c from class counts n_c, N their sum (CPG's expression task, with
    AffectNet's training counts)."""
    counts = torch.as_tensor(counts, dtype=torch.float64)
    if counts.ndim != 1 or not len(counts) or bool((counts <= 0).any()):
        raise ValueError(f"class counts must be a non-empty list of positive numbers, got {counts.tolist()}")
    return ((counts.sum() - counts) / counts).float()
