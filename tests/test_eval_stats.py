"""Confidence intervals, direction handling, average gain and weight grids (sipo_fast.eval.stats)."""
import math

import numpy as np
import pytest

from sipo_fast.eval.stats import average_gain, mean_ci, to_maximisation, weight_grid

T_975_2 = 4.302652729911275  # Student t, 97.5% quantile, 2 degrees of freedom (from a t table)


def test_mean_ci_hand_computed():
    """[1, 2, 3]: mean 2, s = 1, half-width t_{.975,2}·1/√3 = 4.3027/1.7321 = 2.4841."""
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert float(mean) == 2.0
    assert float(half) == pytest.approx(T_975_2 / math.sqrt(3), rel=1e-9)


def test_mean_ci_columns_and_single_sample():
    x = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0]])
    mean, half = mean_ci(x, axis=0)
    np.testing.assert_allclose(mean, [2.0, 10.0])
    np.testing.assert_allclose(half, [T_975_2 / math.sqrt(3), 0.0], rtol=1e-9)  # no spread: zero width
    m1, h1 = mean_ci([4.0])
    assert float(m1) == 4.0 and math.isnan(float(h1))  # unknown spread is NaN, not 0


def test_mean_ci_covers_the_true_mean_95_percent_of_the_time():
    """4000 samples of size 5 from N(3, 2²): the interval should contain 3 in ≈95% of them (±3 s.e.)."""
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(5, 4000))
    mean, half = mean_ci(x, axis=0)
    hit = (np.abs(mean - 3.0) <= half).mean()
    assert abs(hit - 0.95) < 3 * math.sqrt(0.95 * 0.05 / 4000)
    _, half90 = mean_ci(x, confidence=0.9, axis=0)
    assert (half90 < half).all()


def test_mean_ci_bad_input():
    with pytest.raises(ValueError, match="at least one"):
        mean_ci([])
    with pytest.raises(ValueError, match="confidence"):
        mean_ci([1.0, 2.0], confidence=95)


def test_to_maximisation_negates_costs_only():
    s = np.array([[0.5, 2.0], [0.1, -1.0]])
    np.testing.assert_array_equal(to_maximisation(s, [True, False]), [[0.5, -2.0], [0.1, 1.0]])
    np.testing.assert_array_equal(to_maximisation(s, [True, True]), s)
    with pytest.raises(ValueError, match="directions"):
        to_maximisation(s, [True])


def test_average_gain_hand_computed():
    """Method (1,2),(3,4) vs baseline (0,2),(2,5): gains (1+1)/2 = 1 and (0−1)/2 = −0.5."""
    np.testing.assert_allclose(average_gain([[1, 2], [3, 4]], [[0, 2], [2, 5]]), [1.0, -0.5])
    with pytest.raises(ValueError, match="same weights"):
        average_gain([[1, 2]], [[1, 2], [3, 4]])


def test_weight_grid():
    np.testing.assert_allclose(weight_grid(), [[0, 1], [0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2], [1, 0]])
    np.testing.assert_allclose(weight_grid(2, (0.3, 0.7), endpoints=False), [[0.3, 0.7], [0.7, 0.3]])
    g3 = weight_grid(3, (0.5,))
    assert g3.shape == (6, 3) and np.allclose(g3.sum(1), 1)  # C(2+2, 2) = 6 lattice points of step 1/2
    assert {tuple(r) for r in g3.tolist()} == {(0, 0, 1), (0, .5, .5), (0, 1, 0), (.5, 0, .5), (.5, .5, 0), (1, 0, 0)}
    assert weight_grid(3, (0.2, 0.4, 0.6, 0.8)).shape == (21, 3)
    interior = weight_grid(3, (0.25,), endpoints=False)
    assert (interior > 0).all() and interior.shape == (3, 3)  # (1,1,2)/4 and permutations
    with pytest.raises(ValueError, match="divide 1"):
        weight_grid(3, (0.3,))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        weight_grid(2, (1.5,))
