"""The pure stage-2 rules on hand-made numbers (SIPO.md §3): strict dominance, max-sum pick, keep-rewrite."""
import itertools

import pytest
import torch

from sipo_fast.pipeline.stages.rules import (conflicting_mask, dominates, keep_rewrite, margin_counts, one_hot,
                                      select_pareto)


def T(x):
    return torch.tensor(x, dtype=torch.float32)


def test_dominance_strict_on_every_model():
    """K=2 models, r_a = [0, 1], r_b = [1, 0] -> a candidate must beat max(r_a, r_b) = [1, 1] in both.

    [2, 2] > [1, 1] everywhere -> True; [1, 2] ties model 0 -> False; [3, 0.5] loses model 1 -> False;
    [1.0001, 1.0001] -> True (strictly larger, however slightly).
    """
    cand = T([[[2, 2], [1, 2], [3, 0.5], [1.0001, 1.0001]]])
    out = dominates(cand, T([[0, 1]]), T([[1, 0]]))
    assert out.tolist() == [[True, False, False, True]]


def test_select_max_sum_and_one_per_prompt():
    """Prompt 0: survivors [2, 2] (sum 4) and [1.5, 3] (sum 4.5) -> index 2 chosen; [3, 0.5] fails.
    Prompt 1: r_a = r_b = [0, 0]; [0, 5] ties model 0 -> fails; [-1, 9] fails; [0.1, 0.1] survives -> index 2.
    Prompt 2: nothing beats [5, 5] -> -1 (dropped)."""
    cand = T([[[2, 2], [3, 0.5], [1.5, 3]],
              [[0, 5], [-1, 9], [0.1, 0.1]],
              [[4, 9], [9, 4], [5, 5]]])
    r_a = T([[0, 1], [0, 0], [5, 5]])
    r_b = T([[1, 0], [0, 0], [0, 0]])
    sel = select_pareto(cand, r_a, r_b)
    assert sel.survives.tolist() == [[True, False, True], [False, False, True], [False, False, False]]
    assert sel.chosen.tolist() == [2, 2, -1]
    assert sel.num_survivors == 3 and sel.prompts_covered == 2


def test_equal_sums_pick_the_lowest_index():
    """[3, 1] and [1, 3] both dominate [0, 0] with sum 4: the first (lower weight index) wins, every time."""
    sel = select_pareto(T([[[3, 1], [1, 3]]]), T([[0, 0]]), T([[0, 0]]))
    assert sel.chosen.tolist() == [0]
    sel = select_pareto(T([[[1, 3], [3, 1]]]), T([[0, 0]]), T([[0, 0]]))
    assert sel.chosen.tolist() == [0]


def test_valid_mask_excludes_missing_candidates():
    """The best-sum candidate [9, 9] is masked out (ragged prompt / empty text): the next survivor is chosen."""
    cand = T([[[9, 9], [2, 2], [3, 3]]])
    valid = torch.tensor([[False, True, True]])
    sel = select_pareto(cand, T([[0, 0]]), T([[1, 1]]), valid)
    assert sel.survives.tolist() == [[False, True, True]]
    assert sel.chosen.tolist() == [2]


def test_nan_reward_never_survives():
    sel = select_pareto(T([[[float("nan"), 5], [2, 2]]]), T([[0, 0]]), T([[1, 1]]))
    assert sel.survives.tolist() == [[False, True]]
    assert sel.chosen.tolist() == [1]


def _loop_select(cand, r_a, r_b):
    """Literal transcription of SIPO.md §3 with Python loops: the oracle for the randomised check."""
    chosen = []
    for p in range(cand.shape[0]):
        best, best_sum = -1, None
        for m in range(cand.shape[1]):
            ok = all(cand[p, m, k] > r_a[p, k] and cand[p, m, k] > r_b[p, k] for k in range(cand.shape[2]))
            if ok and (best_sum is None or cand[p, m].sum() > best_sum):
                best, best_sum = m, cand[p, m].sum()
        chosen.append(best)
    return chosen


@pytest.mark.parametrize("P,M,K", [(1, 1, 2), (7, 4, 6), (13, 5, 3), (5, 3, 1)])
def test_select_matches_loop_oracle_with_ties(P, M, K):
    # Small integers make ties (with the originals and between sums) common.
    g = torch.Generator().manual_seed(P * 100 + M * 10 + K)
    cand = torch.randint(-2, 3, (P, M, K), generator=g).float()
    r_a = torch.randint(-2, 2, (P, K), generator=g).float()
    r_b = torch.randint(-2, 2, (P, K), generator=g).float()
    assert select_pareto(cand, r_a, r_b).chosen.tolist() == _loop_select(cand, r_a, r_b)


def test_keep_rewrite_rule():
    """Keep the rewrite unless the original is >= on every model.
    row 0: original [1, 2] vs rewrite [3, 2]: original >= is [F, T] -> keep rewrite.
    row 1: [1, 2] vs [1, 2] (tie everywhere) -> keep original.
    row 2: [5, 5] vs [4, 6]: [T, F] -> keep rewrite.
    row 3: [5, 5] vs [4, 4]: original better everywhere -> keep original."""
    orig = T([[1, 2], [1, 2], [5, 5], [5, 5]])
    new = T([[3, 2], [1, 2], [4, 6], [4, 4]])
    assert keep_rewrite(orig, new).tolist() == [True, False, True, False]


def test_conflicting_mask_n_objectives():
    prefs = torch.tensor([[0, 0, 0], [0, 1, 0], [1, 1, 1], [1, 1, 0]])
    assert conflicting_mask(prefs).tolist() == [False, True, False, True]


def test_one_hot():
    assert one_hot(1, 3) == [0.0, 1.0, 0.0]


@pytest.mark.parametrize("bad", [
    lambda: dominates(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)),
    lambda: dominates(torch.zeros(2, 3, 4), torch.zeros(2, 3), torch.zeros(2, 4)),
    lambda: keep_rewrite(torch.zeros(3, 2), torch.zeros(3, 3)),
    lambda: conflicting_mask(torch.zeros(4, 1)),
])
def test_shape_errors(bad):
    with pytest.raises(ValueError):
        bad()


def test_dominance_is_invariant_to_positive_beta():
    """Implicit rewards scale with β > 0; the filter's decisions must not depend on it."""
    g = torch.Generator().manual_seed(0)
    cand, r_a, r_b = torch.randn(6, 4, 5, generator=g), torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    base = select_pareto(cand, r_a, r_b).chosen
    for beta in (0.1, 0.5, 3.0):
        assert torch.equal(select_pareto(cand * beta, r_a * beta, r_b * beta).chosen, base)


def test_every_permutation_of_candidates_picks_the_same_response():
    """The pick is a property of the rewards, not of the order (given distinct sums)."""
    cand = T([[[2, 2], [3, 0.5], [1.5, 3], [1.2, 1.3]]])
    r_a, r_b = T([[0, 1]]), T([[1, 0]])
    for perm in itertools.permutations(range(4)):
        chosen = select_pareto(cand[:, list(perm)], r_a, r_b).chosen.item()
        assert perm[chosen] == 2


def test_margin_counts_weaker_and_stronger():
    """r_a = [0, 1], r_b = [1, 0]: weaker [0, 0], stronger [1, 1]. Candidates [2, 2], [0.5, 0.5], [-1, 5] and a
    masked [9, 9]. Beat the weaker: model a 2 ([2, 0.5]), model b 3, all 2. Beat the stronger: model a 1, model
    b 2 ([2, 5]), all 1 (the survivor). Rate 1/3; best min-margin vs the stronger: [2, 2] -> min(1, 1) = 1."""
    cand = T([[[2, 2], [0.5, 0.5], [-1, 5], [9, 9]]])
    valid = torch.tensor([[True, True, True, False]])
    out = margin_counts(cand, T([[0, 1]]), T([[1, 0]]), valid, ["a", "b"])
    assert out["beat_weaker_per_model"] == {"a": 2, "b": 3} and out["beat_weaker_all"] == 2
    assert out["beat_stronger_per_model"] == {"a": 1, "b": 2} and out["beat_stronger_all"] == 1
    assert out["survival_rate"] == pytest.approx(1 / 3) and out["best_margin_vs_stronger"] == pytest.approx(1.0)
    assert select_pareto(cand, T([[0, 1]]), T([[1, 0]]), valid).num_survivors == out["beat_stronger_all"]
