"""Weighted coresets by gradient matching (GCR, Tiwari et al., CVPR 2022; `gcr`).

Followed: google-research/google-research, gradient_coresets_replay/utils/gradmatchstrategy.py (`select`,
`ompwrapper`), utils/dataselectionstrategy.py (`compute_gradients` with `linear_layer`, `get_budget_per_class`
with `keep_ratio`) and utils/helpers/omp_solvers.py (`orthogonalmp_reg_parallel`, the path the authors ran on a
GPU: ridge `lam` 0.5; their CPU path uses 0).

`candidate_gradients`: each candidate's gradient of the inner loss w (beta CE(f(x), y) + alpha MSE(f(x), z))
with respect to the last layer: d loss / d outputs, then its outer product with the features (the linear layer's
weight gradient), concatenated. `gradient_match`: non-negative orthogonal matching pursuit, picking at most `n`
columns whose non-negative weighted sum approximates the target. `select_coreset`: per class, a budget in
proportion to the class's share of the candidates (at least 1), the target the sum of the class's gradients;
classes OMP leaves short are filled with random candidates of weight 1, then the whole is filled likewise or cut
to the `n` rows of smallest weight (the code's `np.argsort(gammas)[:budget]`), and shuffled.
"""

import torch


def gradient_match(grads: torch.Tensor, target: torch.Tensor, n: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative OMP: indices (into the rows of `grads`, (N, d)) of at most `n` rows and their weights (> 0) so
    that sum_i w_i grads[i] approximates `target` (d). Each step adds the row most aligned with the residual and
    solves the ridge problem (G G^T + lam I) w = G target on the picks (the first pick: the projection over its
    squared norm), dropping the most negative weight while any is negative; stops when the best row is already
    picked or has no positive alignment (the authors' GPU solver; float64 here)."""
    grads, target = grads.double(), target.double()
    picks: list[int] = []
    weights = torch.zeros(0, dtype=torch.float64, device=grads.device)
    residual = target.clone()
    while len(picks) < n:
        projections = grads @ residual
        index = int(projections.argmax())
        if index in picks or (not picks and projections[index] <= 0):
            break
        picks.append(index)
        rows = grads[picks]
        if len(picks) == 1:
            weights = projections[index : index + 1] / (rows[0] @ rows[0])
        else:
            weights = _ridge(rows, target, lam)
            while len(picks) and weights.min() < 0:
                picks.pop(int(weights.argmin()))
                rows = grads[picks]
                weights = _ridge(rows, target, lam) if picks else weights[:0]
            if not picks:
                break
        residual = target - rows.T @ weights
    keep = torch.nonzero(weights > 0).squeeze(1)
    return torch.tensor(picks, dtype=torch.long, device=grads.device)[keep], weights[keep].float()


def _ridge(rows: torch.Tensor, target: torch.Tensor, lam: float) -> torch.Tensor:
    gram = rows @ rows.T + lam * torch.eye(len(rows), dtype=rows.dtype, device=rows.device)
    return torch.linalg.lstsq(gram, (rows @ target)[:, None]).solution[:, 0]


def candidate_gradients(
    outputs: torch.Tensor,
    features: torch.Tensor,
    y: torch.Tensor,
    logits: torch.Tensor,
    w: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Per-candidate last-layer gradients (N, O + O E) of w (beta CE(outputs, y) + alpha mean MSE(outputs, logits)):
    the gradient with respect to the outputs (O) and its outer product with the features (E), flattened output by
    output. `outputs` must depend on `features` through the last layer only; `features` is detached here."""
    loss = beta * torch.nn.functional.cross_entropy(outputs, y, reduction="none")
    loss = (loss + alpha * (outputs - logits).pow(2).mean(1)) * w
    (d_outputs,) = torch.autograd.grad(loss.sum(), outputs)
    d_weight = (d_outputs[:, :, None] * features.detach()[:, None, :]).flatten(1)
    return torch.cat([d_outputs, d_weight], dim=1)


def select_coreset(grads: torch.Tensor, labels: torch.Tensor, n: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """At most `n` (exactly min(n, N)) candidate indices with non-negative weights whose weighted gradient sum
    matches each class's gradient sum (`gradient_match` per class, a class budget max(1, int(n share))); random
    fills weigh 1; draws from torch's global RNG (CPU)."""
    if n >= len(labels):
        return torch.arange(len(labels)), torch.ones(len(labels))
    picks, weights = [], []
    classes, counts = labels.unique(return_counts=True)
    for label, count in zip(classes.tolist(), counts.tolist(), strict=True):
        members = torch.nonzero(labels == label).squeeze(1).cpu()
        quota = min(max(1, int(n * count / len(labels))), count)
        index, w = gradient_match(grads[members], grads[members].sum(0), quota, lam)
        index, w = index.cpu(), w.cpu()
        if len(index) < quota:  # OMP stopped early: random members of the class, weight 1
            rest = members.new_ones(count, dtype=torch.bool)
            rest[index] = False
            extra = torch.nonzero(rest).squeeze(1)[torch.randperm(int(rest.sum()))[: quota - len(index)]]
            index, w = torch.cat([index, extra]), torch.cat([w, torch.ones(len(extra))])
        picks.append(members[index])
        weights.append(w)
    picks, weights = torch.cat(picks), torch.cat(weights)
    if len(picks) < n:  # the quotas' floors left slots: random candidates, weight 1
        rest = torch.ones(len(labels), dtype=torch.bool)
        rest[picks] = False
        extra = torch.nonzero(rest).squeeze(1)[torch.randperm(int(rest.sum()))[: n - len(picks)]]
        picks, weights = torch.cat([picks, extra]), torch.cat([weights, torch.ones(len(extra))])
    order = torch.randperm(len(picks))
    picks, weights = picks[order], weights[order]
    if len(picks) > n:  # the quotas' minimum of 1 overshot: the code keeps the n smallest weights, shuffled
        keep = torch.argsort(weights, stable=True)[:n]
        keep = keep[torch.randperm(n)]
        picks, weights = picks[keep], weights[keep]
    return picks, weights
