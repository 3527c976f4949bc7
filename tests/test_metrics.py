import math

import numpy as np
import pytest

from continual_transformer.experiment import metrics

NAN = math.nan
R = np.array([
    [0.9, NAN, NAN],
    [0.7, 0.8, NAN],
    [0.6, 0.8, 0.5],
])


def test_acc_is_mean_of_last_row():
    assert metrics.average_accuracy(R) == pytest.approx((0.6 + 0.8 + 0.5) / 3)


def test_bwt_is_mean_change_since_learning():
    assert metrics.backward_transfer(R) == pytest.approx(((0.6 - 0.9) + (0.8 - 0.8)) / 2)


def test_forgetting_uses_best_earlier_accuracy():
    R2 = np.array([[0.5, NAN, NAN], [0.9, 0.7, NAN], [0.6, 0.4, 0.8]])
    # task 0: best 0.9 (after task 1), final 0.6; task 1: best 0.7, final 0.4
    assert metrics.forgetting(R2) == pytest.approx((0.3 + 0.3) / 2)


def test_no_forgetting_when_rows_repeat():
    R3 = np.array([[0.8, NAN], [0.8, 0.9]])
    assert metrics.backward_transfer(R3) == 0.0
    assert metrics.forgetting(R3) == 0.0


def test_fwt_ignores_first_task():
    assert metrics.forward_transfer([NAN, 0.6, 0.5], [NAN, 0.5, 0.5]) == pytest.approx(0.05)


def test_single_task_has_zero_transfer():
    assert metrics.backward_transfer([[0.7]]) == 0.0
    assert metrics.forgetting([[0.7]]) == 0.0


def test_invalid_matrices_are_refused():
    with pytest.raises(ValueError, match="square"):
        metrics.average_accuracy(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN on or below the diagonal"):
        metrics.average_accuracy(np.array([[NAN, NAN], [0.1, 0.2]]))
