"""The demo's gates (G1-G3), the fixed and robust hypervolume references and paired per-weight differences,
on hand-computed cases (the arithmetic is in each docstring)."""
import math

import numpy as np
import pytest

from sipo_fast.eval.gates import (data_correlation, endpoint_separation, filter_lift, implicit_reward_accuracy,
                                  pair_correlation, truly_dominates, wilson_interval)
from sipo_fast.eval.pareto import fixed_reference, front_points, hypervolume
from sipo_fast.eval.stats import bootstrap_ci, paired_differences


def test_pair_correlation_hand_computed():
    """d1 = (1, 2, 3, 4), d2 = (2, 1, 4, 3): centred (−1.5, −.5, .5, 1.5) and (−.5, −1.5, 1.5, .5);
    Σ products = .75 + .75 + .75 + .75 = 3, Σ squares = 5 each, r = 3/5 = 0.6."""
    g = pair_correlation([1, 2, 3, 4], [2, 1, 4, 3])
    assert g["r"] == pytest.approx(0.6)
    assert g["passed"] is False and g["n"] == 4
    assert g["lo"] <= g["r"] <= g["hi"]
    g = pair_correlation([1, 2, 3], [3, 2, 1])  # r = −2 / √(2·2) = −1
    assert g["r"] == pytest.approx(-1.0) and g["passed"] is True


def test_pair_correlation_interval_covers_and_narrows():
    rng = np.random.default_rng(1)
    x = rng.normal(size=400)
    y = -0.5 * x + rng.normal(size=400)  # true r = −0.5/√1.25 = −0.447
    g = pair_correlation(x, y, seed=0)
    # the percentile bootstrap agrees with Fisher's z interval tanh(atanh r ± 1.96/√(n − 3)) to a few hundredths
    z, half = math.atanh(g["r"]), 1.959964 / math.sqrt(400 - 3)
    assert g["lo"] == pytest.approx(math.tanh(z - half), abs=0.03)
    assert g["hi"] == pytest.approx(math.tanh(z + half), abs=0.03)
    assert g["lo"] < g["r"] < g["hi"] < 0 and g["below_zero"] is True
    assert pair_correlation(x, y, seed=0) == g  # seeded: the same interval every time
    with pytest.raises(ValueError, match="at least 3"):
        pair_correlation([1, 2], [2, 1])


def test_data_correlation_reads_score_columns():
    rows = [{"relevance_0": 0.1, "relevance_1": 0.2, "tone_0": 0.5, "tone_1": 0.2},   # Δ = (+.1, −.3)
            {"relevance_0": 0.3, "relevance_1": 0.1, "tone_0": 0.2, "tone_1": 0.6},   # Δ = (−.2, +.4)
            {"relevance_0": 0.2, "relevance_1": 0.5, "tone_0": 0.6, "tone_1": 0.5}]   # Δ = (+.3, −.1)
    want = pair_correlation([0.1, -0.2, 0.3], [-0.3, 0.4, -0.1])["r"]
    assert data_correlation(rows)["r"] == pytest.approx(want) and want < 0
    with pytest.raises(ValueError, match="offensive_0"):
        data_correlation(rows, keys=("relevance", "offensive"))


def test_endpoint_separation_hand_computed():
    """Objective 0: w1 − w0 = (2, 3, 1), mean 2, s = 1, half-width 4.303/√3 = 2.484 → covers 0.
    Objective 1: w1 − w0 = (−1, −1.1, −0.9), mean −1, s = 0.1, half-width 0.2484 → separated."""
    w0 = np.array([[0, 1.0], [0, 1.1], [0, 0.9]])
    w1 = np.array([[2, 0.0], [3, 0.0], [1, 0.0]])
    g = endpoint_separation(w0, w1)
    assert g["diff"] == pytest.approx([2.0, -1.0])
    assert g["half_width"] == pytest.approx([2.484, 0.2484], abs=1e-3)
    assert g["separated"] == [False, True] and g["passed"] is False
    assert endpoint_separation(w0, w1 + [[3, 0]] * 3)["passed"] is True  # objective 0: mean 5 ± 2.484
    with pytest.raises(ValueError, match=r"\[P, N\]"):
        endpoint_separation(w0, w1[:2])


def test_wilson_interval_hand_computed():
    """8 of 10, z = 1.96: centre (0.8 + 0.19208)/1.38416 = 0.7167, half 1.96·√(0.016 + 0.009604)/1.38416
    = 0.2266 → (0.490, 0.943)."""
    lo, hi = wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    assert wilson_interval(0, 5)[0] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_implicit_reward_accuracy_counts_strict_wins():
    """Margins 0.3, −0.1, 0.2, 0.0: two strictly positive → 0.5; a tie is not a win (TRL's accuracies)."""
    g = implicit_reward_accuracy([1.3, 0.9, 1.2, 1.0], [1.0, 1.0, 1.0, 1.0])
    assert g["accuracy"] == 0.5 and g["correct"] == 2 and g["passed"] is False
    assert g["lo"] < 0.5 < g["hi"]
    assert implicit_reward_accuracy([1, 1, 1, 1, 0], [0, 0, 0, 0, 1])["passed"] is True  # 0.8 ≥ 0.7
    with pytest.raises(ValueError, match="equally many"):
        implicit_reward_accuracy([1, 2], [1])


def test_truly_dominates_is_strict_on_every_objective():
    cand = [[0.5, 0.5], [0.5, 0.5], [0.5, 0.5]]
    a = [[0.4, 0.4], [0.4, 0.5], [0.6, 0.1]]   # beats; ties on objective 1; loses on objective 0
    b = [[0.3, 0.2], [0.1, 0.1], [0.1, 0.1]]
    assert truly_dominates(cand, a, b).tolist() == [True, False, False]


def test_filter_lift_hand_computed():
    """10 candidates, 4 truly dominate; 5 survive, 3 of them dominating → (3/5) / (4/10) = 1.5."""
    truly = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    survived = [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
    g = filter_lift(truly, survived)
    assert g["lift"] == pytest.approx(1.5) and g["share_survivors"] == pytest.approx(0.6)
    assert g["share_all"] == pytest.approx(0.4) and g["survivors"] == 5 and g["passed"] is True
    random_pick = filter_lift(truly, [1, 0, 0, 0, 1, 1, 0, 0, 0, 0])  # 1/3 ÷ 0.4 = 0.833
    assert random_pick["lift"] == pytest.approx(1 / 3 / 0.4) and random_pick["passed"] is False
    none = filter_lift(truly, [0] * 10)
    assert math.isnan(none["lift"]) and none["passed"] is False


def test_fixed_reference_and_hypervolume_do_not_move_with_an_outlier():
    """π_ref at (0.5, 0.7), margin (0.1, 0.2) → reference (0.4, 0.5). Front (0.6, 0.8), (0.7, 0.6):
    HV = (0.7−0.4)(0.6−0.5) + (0.6−0.4)(0.8−0.6) = 0.03 + 0.04 = 0.07, whatever other method is compared."""
    ref = fixed_reference([0.5, 0.7], [0.1, 0.2])
    assert ref.tolist() == pytest.approx([0.4, 0.5])
    assert hypervolume([[0.6, 0.8], [0.7, 0.6]], ref) == pytest.approx(0.07)
    assert fixed_reference([1.0, 2.0], 0.5).tolist() == [0.5, 1.5]
    with pytest.raises(ValueError, match="margin"):
        fixed_reference([1.0, 2.0], -0.1)


def test_front_points_mean_median_trimmed():
    """One weight, one objective, prompts (0.9, 0.8, 0.1): mean 0.6, median 0.8; five prompts
    (0, 1, 2, 3, 10) trimmed 20% drops 0 and 10 → mean of (1, 2, 3) = 2."""
    x = np.array([[[0.9], [0.8], [0.1]]])
    assert front_points(x, "mean")[0, 0] == pytest.approx(0.6)
    assert front_points(x, "median")[0, 0] == pytest.approx(0.8)
    y = np.array([[[0.0], [1.0], [2.0], [3.0], [10.0]]])
    assert front_points(y, "trimmed", trim=0.2)[0, 0] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="stat"):
        front_points(x, "mode")


def test_paired_differences_t_and_bootstrap():
    """a = (3, 5, 4), b = (1, 2, 3) → d = (2, 3, 1): mean 2, t half-width 2.484 → [−0.484, 4.484]."""
    a = np.array([[[3.0], [5.0], [4.0]]])
    b = np.array([[[1.0], [2.0], [3.0]]])
    g = paired_differences(a, b)
    assert g["mean"][0, 0] == pytest.approx(2.0)
    assert (g["lo"][0, 0], g["hi"][0, 0]) == pytest.approx((-0.484, 4.484), abs=1e-3)
    assert g["significant"][0, 0] == False  # noqa: E712 (numpy bool)
    bs = paired_differences(a, b, method="bootstrap", seed=0)
    # resampled means of (2, 3, 1) lie in [1, 3]; the middle 95% spans most of it
    assert 1.0 <= bs["lo"][0, 0] < 2.0 < bs["hi"][0, 0] <= 3.0 and bs["significant"][0, 0]
    with pytest.raises(ValueError, match="same"):
        paired_differences(a, b[:, :2])


def test_bootstrap_ci_is_seeded_and_needs_two_samples():
    x = np.arange(20.0)
    assert bootstrap_ci(np.mean, x, seed=3) == bootstrap_ci(np.mean, x, seed=3)
    lo, hi = bootstrap_ci(np.mean, x, seed=3)
    assert lo < 9.5 < hi
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_ci(np.mean, [1.0])
