import math

import numpy as np
import pytest

from clrun import metrics

nan = float("nan")

# R[i, j]: accuracy on task j after training task i; NaN above the diagonal (not measured).
R = np.array(
    [
        [0.90, nan, nan],
        [0.70, 0.80, nan],
        [0.60, 0.85, 0.95],
    ]
)


def test_acc_is_unweighted_mean_of_last_row():
    assert metrics.acc(R) == pytest.approx((0.60 + 0.85 + 0.95) / 3)


def test_bwt_compares_final_with_just_learned():
    # task 0: 0.60 - 0.90 = -0.30; task 1: 0.85 - 0.80 = +0.05
    assert metrics.bwt(R) == pytest.approx((-0.30 + 0.05) / 2)


def test_forgetting_uses_best_earlier_accuracy():
    # task 0: max(0.90, 0.70) - 0.60 = 0.30; task 1: max(0.80) - 0.85 = -0.05
    assert metrics.forgetting(R) == pytest.approx((0.30 - 0.05) / 2)


def test_forgetting_takes_max_over_rows_not_diagonal():
    R2 = np.array([[0.5, nan, nan], [0.9, 0.8, nan], [0.4, 0.8, 0.7]])
    assert metrics.forgetting(R2) == pytest.approx(((0.9 - 0.4) + (0.8 - 0.8)) / 2)
    assert metrics.bwt(R2) == pytest.approx(((0.4 - 0.5) + (0.8 - 0.8)) / 2)


def test_acc_all_steps_is_the_lower_triangle_mean_with_the_diagonal():
    assert metrics.acc_all_steps(R) == pytest.approx((0.90 + 0.70 + 0.80 + 0.60 + 0.85 + 0.95) / 6)


def test_bwt_all_steps_averages_every_earlier_task_after_every_step():
    # (1, 0): 0.70 - 0.90; (2, 0): 0.60 - 0.90; (2, 1): 0.85 - 0.80, over T(T-1)/2 = 3 terms
    assert metrics.bwt_all_steps(R) == pytest.approx((-0.20 - 0.30 + 0.05) / 3)
    assert metrics.bwt(R) != pytest.approx(metrics.bwt_all_steps(R))  # the last row only


def test_survey_fwt_is_the_upper_triangle_mean_and_nan_when_unmeasured():
    assert math.isnan(metrics.fwt_all_steps(R))
    R3 = np.array([[0.9, 0.3, 0.25], [0.8, 0.9, 0.4], [0.7, 0.8, 0.9]])
    assert metrics.fwt_all_steps(R3) == pytest.approx((0.3 + 0.25 + 0.4) / 3)  # no baseline subtracted


def test_memory_efficiency_from_the_sizes_after_each_task():
    assert metrics.memory_efficiency([2.0, 2.0, 2.0]) == 1.0  # no growth
    assert metrics.memory_efficiency([2.0, 4.0, 8.0]) == pytest.approx((1 + 0.5 + 0.25) / 3)
    assert metrics.memory_efficiency([2.0, 1.0]) == 1.0  # capped at 1 when the model shrinks


def test_compute_efficiency_counts_every_mac_spent():
    plain = [100.0, 100.0, 100.0]
    assert metrics.compute_efficiency(plain, plain) == 1.0
    # task 2 trained 4 candidates of the same cost, then the chosen one again: 1/5 of its MACs made the model
    assert metrics.compute_efficiency(plain, [100.0, 200.0, 500.0]) == pytest.approx((1 + 0.5 + 0.2) / 3)
    assert math.isnan(metrics.compute_efficiency(plain, [100.0, nan, 100.0]))  # a task not counted


def test_fwt_nan_when_future_tasks_never_measured():
    assert math.isnan(metrics.fwt(R, np.array([0.2, 0.2, 0.2])))


def test_fwt_with_measured_upper_diagonal():
    R3 = np.array([[0.9, 0.3, 0.25], [0.8, 0.9, 0.4], [0.7, 0.8, 0.9]])
    b = np.array([0.1, 0.2, 0.2])
    # j=1: 0.3 - 0.2; j=2: 0.4 - 0.2
    assert metrics.fwt(R3, b) == pytest.approx((0.1 + 0.2) / 2)


def test_nan_entries_are_left_out():
    R4 = np.array([[0.9, nan, nan], [nan, 0.8, nan], [0.5, nan, 0.7]])
    assert metrics.acc(R4) == pytest.approx((0.5 + 0.7) / 2)
    assert metrics.bwt(R4) == pytest.approx(0.5 - 0.9)  # task 1's final accuracy is missing
    assert metrics.forgetting(R4) == pytest.approx(0.9 - 0.5)


def test_single_task_has_no_backward_metrics():
    R1 = np.array([[0.8]])
    assert metrics.acc(R1) == pytest.approx(0.8)
    assert math.isnan(metrics.bwt(R1))
    assert math.isnan(metrics.forgetting(R1))


def test_expansion_and_size():
    assert metrics.expansion(300, 100) == 3.0
    assert metrics.model_mb(3 * 2**20) == 3.0


def test_forgetting_ignores_accuracies_from_before_the_task_was_learned():
    # domain scenario: the whole matrix is measured; task 2 scored 0.9 by chance before being learned
    R = np.array([[0.8, 0.5, 0.9], [0.7, 0.9, 0.9], [0.6, 0.8, 0.6]])
    assert metrics.forgetting(R) == pytest.approx(((0.8 - 0.6) + (0.9 - 0.8)) / 2)
