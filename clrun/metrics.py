"""Continual-learning metrics: pure functions of the accuracy matrix.

R[i, j] is the test accuracy on task j after training on tasks 0..i (T x T);
entries that were not measured are NaN and are left out of every mean.
A metric with no defined term is NaN.
"""

import numpy as np


def _nanmean(values) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def acc(R: np.ndarray) -> float:
    """Final average accuracy: mean_j R[T-1, j], unweighted over tasks."""
    R = np.asarray(R, dtype=float)
    return _nanmean(R[-1])


def bwt(R: np.ndarray) -> float:
    """Backward transfer: mean_{j<T-1} (R[T-1, j] - R[j, j]); negative means forgetting."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    return _nanmean([R[T - 1, j] - R[j, j] for j in range(T - 1)])


def forgetting(R: np.ndarray) -> float:
    """Forgetting: mean_{j<T-1} (max_{j<=i<T-1} R[i, j] - R[T-1, j]) (accuracies before task j was
    learned, measured in the domain scenario, do not count)."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    terms = []
    for j in range(T - 1):
        earlier = R[j : T - 1, j]
        best = np.nanmax(earlier) if not np.isnan(earlier).all() else np.nan
        terms.append(best - R[T - 1, j])
    return _nanmean(terms)


def fwt(R: np.ndarray, initial: np.ndarray) -> float:
    """Forward transfer: mean_{j>0} (R[j-1, j] - b_j), b_j the initial model's accuracy on task j.

    Only terms where R[j-1, j] was measured count: a multi-head task-incremental
    method cannot predict a task before its head exists, so there FWT is NaN.
    """
    R = np.asarray(R, dtype=float)
    initial = np.asarray(initial, dtype=float)
    return _nanmean([R[j - 1, j] - initial[j] for j in range(1, R.shape[0])])


def acc_all_steps(R: np.ndarray) -> float:
    """The survey's A (Diaz-Rodriguez et al.; its eq. 7): mean of R[i, j] over j <= i, the accuracy averaged over
    every step of the stream."""
    R = np.asarray(R, dtype=float)
    return _nanmean(R[np.tril_indices(R.shape[0])])


def fwt_all_steps(R: np.ndarray) -> float:
    """The survey's FWT (its eq. 10): mean of R[i, j] over j > i, tasks not learned yet, with no baseline
    subtracted (unlike `fwt`); NaN where those entries were not measured (task-incremental heads)."""
    R = np.asarray(R, dtype=float)
    return _nanmean(R[np.triu_indices(R.shape[0], k=1)])


def bwt_all_steps(R: np.ndarray) -> float:
    """The survey's BWT over all steps (its eq. 11): mean of R[i, j] - R[j, j] over j < i (`bwt` takes the
    last row only)."""
    R = np.asarray(R, dtype=float)
    return _nanmean([R[i, j] - R[j, j] for i in range(R.shape[0]) for j in range(i)])


def memory_efficiency(sizes) -> float:
    """The survey's MS (its eq. 12): min(1, mean_i size_0 / size_i) of the stored model's size after each task;
    1 means no growth."""
    sizes = np.asarray(sizes, dtype=float)
    return float(np.minimum(1.0, np.mean(sizes[0] / sizes))) if sizes.size else float("nan")


def compute_efficiency(plain_macs, spent_macs) -> float:
    """The survey's CE (its eq. 13): min(1, mean_t plain_t / spent_t), `plain_t` the MACs that training task t's
    final model once under its recipe costs (epsilon x one forward+backward pass over the task), `spent_t` every
    MAC spent learning task t (every phase, every candidate a search trains). NaN where a task was not counted."""
    ratios = np.asarray(plain_macs, dtype=float) / np.asarray(spent_macs, dtype=float)
    return float(np.minimum(1.0, ratios.mean())) if ratios.size else float("nan")


def expansion(stored_params: int, base_params: int) -> float:
    """Expansion ratio: stored parameters / parameters of one backbone with one head."""
    return stored_params / base_params


def model_mb(stored_bytes: int) -> float:
    """Model size in MB (2**20 bytes) of everything that must be stored."""
    return stored_bytes / 2**20


# ---- face verification ------------------------------------------------------------------------------------------

VERIFICATION_THRESHOLDS = np.arange(0, 4, 0.01)  # CPG's `fv_evaluate` grid over its angular distance


def verification_folds(n_pairs: int, n_folds: int = 10) -> np.ndarray:
    """Each pair's fold: the pairs in order cut into `n_folds` contiguous parts, the first n_pairs % n_folds one
    larger (scikit-learn's unshuffled KFold, which CPG's `fv_evaluate` uses; LFW's 6000 pairs give its ten official
    folds of 600)."""
    if not 2 <= n_folds <= n_pairs:
        raise ValueError(f"{n_pairs} pairs cannot be cut into {n_folds} folds (need 2 <= folds <= pairs)")
    sizes = np.full(n_folds, n_pairs // n_folds)
    sizes[: n_pairs % n_folds] += 1
    return np.repeat(np.arange(n_folds), sizes)


def verification_accuracy(similarity, same, n_folds: int = 10) -> tuple[float, float, np.ndarray]:
    """Face-verification accuracy over folds, as CPG's `fv_evaluate` (cosine form, `distance_metric=1`) computes it
    on LFW: fold k tests on the k-th tenth of the pairs (`verification_folds`) with the threshold that classifies the
    other folds' pairs best (the smallest of equals); returns (mean, population std, per-fold accuracies).

    `similarity`: each pair's cosine similarity; `same`: whether it shows one person. A pair is predicted the same
    when its distance arccos(clip(similarity, 0, 1)) * 4 / pi is below the threshold, the thresholds being 0, 0.01,
    ..., 3.99 (`VERIFICATION_THRESHOLDS`; negative similarities all sit at distance 2)."""
    similarity = np.asarray(similarity, dtype=np.float64)
    same = np.asarray(same, dtype=bool)
    if similarity.shape != same.shape or similarity.ndim != 1:
        raise ValueError(f"similarity {similarity.shape} and same {same.shape} must be two vectors of one length")
    distance = np.arccos(np.clip(similarity, 0.0, 1.0)) * 4 / np.pi
    folds = verification_folds(len(same), n_folds)
    correct = (distance[None, :] < VERIFICATION_THRESHOLDS[:, None]) == same[None, :]  # thresholds x pairs
    per_fold = np.stack([correct[:, folds == k].sum(1) for k in range(n_folds)], axis=1)  # thresholds x folds
    sizes = np.bincount(folds, minlength=n_folds)
    accuracies = np.empty(n_folds)
    for k in range(n_folds):
        best = int(np.argmax(per_fold.sum(1) - per_fold[:, k]))  # the others' correct count; the first of equals
        accuracies[k] = per_fold[best, k] / sizes[k]
    return float(accuracies.mean()), float(accuracies.std()), accuracies
