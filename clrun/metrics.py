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


def lower_triangle_mean(R: np.ndarray) -> float:
    """Mean of R[i, j] over j <= i: the average accuracy over the whole stream."""
    R = np.asarray(R, dtype=float)
    return _nanmean(R[np.tril_indices(R.shape[0])])


def expansion(stored_params: int, base_params: int) -> float:
    """Expansion ratio: stored parameters / parameters of one backbone with one head."""
    return stored_params / base_params


def model_mb(stored_bytes: int) -> float:
    """Model size in MB (2**20 bytes) of everything that must be stored."""
    return stored_bytes / 2**20
