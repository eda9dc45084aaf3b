"""Gradient projection against episodic memories: GEM's quadratic program and A-GEM's closed form.

GEM (Lopez-Paz & Ranzato 2017; facebookresearch/GradientEpisodicMemory, model/gem.py `project2cone2`) keeps
the update g~ closest to the proposed gradient g such that <g~, g_k> >= 0 for every earlier task's memory
gradient g_k (the rows of G). The code solves the dual with quadprog:

    min_v 1/2 v'(GG' + eps I)v + (Gg)'v  s.t.  v >= margin,    then g~ = G'v + g,

margin = `memory_strength` (the paper's gamma, 0.5 in the code; 0 gives the paper's exact projection) and
eps = 1e-3 (the code's ridge). `solve_box_qp` is an exact active-set solver of this small problem (Lawson and
Hanson's NNLS iteration on the shifted variable u = v - margin >= 0), in float64 as the code solves it, so no
dependency is needed. A-GEM (Chaudhry et al. 2019; facebookresearch/agem, model/model.py) projects onto the
half-space of one reference gradient: g - (g.g_ref / g_ref.g_ref) g_ref when g.g_ref < 0.
"""

from collections.abc import Sequence

import torch


def flat_grad(params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """The parameters' `.grad` as one vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])


def flat_gradient(loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """d loss / d params as one vector (zeros for parameters the loss does not reach); `.grad` left untouched."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params, strict=True)]
    )


def write_grad(params: Sequence[torch.nn.Parameter], vector: torch.Tensor) -> None:
    """Set every parameter's `.grad` to its slice of `vector` (also those that had none, e.g. an earlier task's
    head that the current batch does not reach but a memory gradient does)."""
    start = 0
    for p in params:
        piece = vector[start : start + p.numel()].view_as(p).to(p.dtype)
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.copy_(piece)
        start += p.numel()


def solve_box_qp(P: torch.Tensor, q: torch.Tensor, lower: float = 0.0, tol: float = 1e-12) -> torch.Tensor:
    """The exact minimiser of 1/2 v'Pv + q'v subject to v >= lower (elementwise), P symmetric positive definite.

    With u = v - lower: min 1/2 u'Pu + c'u, u >= 0, c = q + P lower 1, solved by Lawson and Hanson's active-set
    iteration (NNLS): free the coordinate with the most negative gradient, solve the free block exactly, step back
    to the boundary when a free coordinate would turn negative; it ends in finitely many steps at the KKT point
    (Pu + c >= 0, u >= 0, u'(Pu + c) = 0). Float64 throughout."""
    P, q = P.double(), q.double()
    n = len(q)
    c = q + lower * P.sum(1)
    u = torch.zeros(n, dtype=torch.float64, device=P.device)
    free = torch.zeros(n, dtype=torch.bool, device=P.device)
    scale = max(1.0, float(c.abs().max()) if n else 1.0)
    for _ in range(10 * n + 10):
        w = -(P @ u + c)  # the negative gradient
        candidates = torch.where(free, -torch.inf, w)
        if n == 0 or bool(free.all()) or float(candidates.max()) <= tol * scale:
            break
        free[int(candidates.argmax())] = True
        while True:
            s = torch.zeros_like(u)
            index = torch.nonzero(free).squeeze(1)
            s[index] = torch.linalg.solve(P[index][:, index], -c[index])
            if bool((s[index] > 0).all()):
                u = s
                break
            blocking = free & (s <= 0)
            gap = u[blocking] - s[blocking]  # >= 0; 0 only where u = s = 0 (then no step)
            alpha = torch.where(gap > 0, u[blocking] / gap.clamp(min=1e-300), torch.zeros_like(gap)).min()
            u = u + alpha * (s - u)
            free &= u > tol * scale
            u = torch.where(free, u, torch.zeros_like(u))
            if not bool(free.any()):
                break
    return u + lower


def gem_project(g: torch.Tensor, G: torch.Tensor, margin: float = 0.5, eps: float = 1e-3) -> torch.Tensor:
    """GEM's update from the proposed gradient `g` (p) and the memory gradients `G` (t x p): g~ = G'v + g, v the
    dual QP's solution (`solve_box_qp`), computed in float64 and returned in g's dtype. The caller projects only
    when some g.g_k < 0, as the code does."""
    Gd, gd = G.double(), g.double()
    P = Gd @ Gd.T
    P = 0.5 * (P + P.T) + eps * torch.eye(len(G), dtype=torch.float64, device=G.device)
    v = solve_box_qp(P, Gd @ gd, margin)
    return (Gd.T @ v + gd).to(g.dtype)


def agem_project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """A-GEM's update: g itself (the same tensor) when g.g_ref >= 0, else g - (g.g_ref / g_ref.g_ref) g_ref. The
    products are taken in float64: a float32 g_ref.g_ref underflows to 0 once the memory's loss is tiny (a reference
    gradient of 1e-23 per coordinate), and the float32 quotient would be NaN."""
    gd, refd = g.double(), g_ref.double()
    dot = gd @ refd
    if dot >= 0:
        return g
    return (gd - (dot / (refd @ refd)) * refd).to(g.dtype)
