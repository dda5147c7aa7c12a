"""Scoring cache, weight sweeps and their determinism, on fake generators and scorers (no model needed)."""
import numpy as np
import pytest
import torch

from sipo_fast.eval.cache import CachedScorer, ScoreCache
from sipo_fast.eval.sweep import SweepResult, pooled, run_eval, score_responses, sweep_weights

WORDS = ["sun", "tree", "cat", "river", "stone", "cloud", "bird", "lamp"]


class CountingScorer:
    """score = number of words (higher better) or number of '!' (a cost: lower better); counts its work."""

    def __init__(self, name, cost=False):
        self.name, self.higher_is_better, self.cost = name, not cost, cost
        self.calls, self.rows = 0, 0

    def score(self, prompts, responses):
        self.calls += 1
        self.rows += len(responses)
        f = (lambda r: r.count("!")) if self.cost else (lambda r: len(r.replace("!", " ").split()))
        return torch.tensor([float(f(r)) for r in responses])


def sampling_generator(prompts, weights, seed=None):
    """Draws words from the *global* torch RNG (so only run_eval's seeding makes it repeatable): at weight w,
    round(6·w_0) words and round(6·w_1) '!'."""
    out = []
    for w in weights:
        row = []
        for _ in prompts:
            idx = torch.randint(len(WORDS), (int(round(6 * w[0])),)).tolist()
            row.append(" ".join(WORDS[i] for i in idx) + "!" * int(round(6 * w[1])))
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------- cache
def test_cache_scores_each_pair_once_and_persists(tmp_path):
    path = tmp_path / "eval" / "scores.sqlite"
    inner = CountingScorer("words")
    cached = CachedScorer(inner, ScoreCache(path))
    p, r = ["a", "a", "b", "a"], ["x y", "x y", "z", "q"]   # ("a","x y") twice in one call
    got = cached.score(p, r)
    assert got.tolist() == [2.0, 2.0, 1.0, 1.0]
    assert inner.calls == 1 and inner.rows == 3              # duplicates scored once, in one batch
    cached.score(p[::-1], r[::-1])
    assert inner.calls == 1                                  # all cached
    assert cached.score(["a", "c"], ["x y", "w w w"]).tolist() == [2.0, 3.0]
    assert inner.calls == 2 and inner.rows == 4              # only the new pair
    # a new process (new connection) sees the same scores without scoring
    again = CountingScorer("words")
    assert CachedScorer(again, ScoreCache(path)).score(["b"], ["z"]).tolist() == [1.0]
    assert again.calls == 0 and len(ScoreCache(path)) == 4


def test_cache_is_keyed_by_scorer_name():
    cache = ScoreCache()
    a, b = CountingScorer("words"), CountingScorer("bangs", cost=True)
    assert CachedScorer(a, cache).score(["p"], ["hi there!!"]).tolist() == [2.0]
    assert CachedScorer(b, cache).score(["p"], ["hi there!!"]).tolist() == [2.0]
    assert a.calls == 1 and b.calls == 1
    # the prompt is part of the key: the same response to another prompt is scored again
    CachedScorer(a, cache).score(["other"], ["hi there!!"])
    assert a.calls == 2


def test_cache_bad_scorers():
    with pytest.raises(ValueError, match="higher_is_better"):
        CachedScorer(object(), ScoreCache())

    class Short(CountingScorer):
        def score(self, prompts, responses):
            return torch.zeros(len(responses) - 1)

    with pytest.raises(ValueError, match="returned"):
        CachedScorer(Short("s"), ScoreCache()).score(["a", "b"], ["x", "y"])


# ------------------------------------------------------------------------------------------- sweeps
def test_run_eval_shapes_scores_and_directions():
    prompts = ["p1", "p2", "p3"]
    scorers = [CountingScorer("words"), CountingScorer("bangs", cost=True)]
    res = run_eval(sampling_generator, prompts, scorers, [0.0, 0.5, 1.0], "fake", seed=0)
    assert res.scores.shape == (3, 3, 2) and res.weights.tolist() == [[0, 1], [0.5, 0.5], [1, 0]]
    # raw: words = round(6·w0), bangs = round(6·w1); maximised: bangs negated
    np.testing.assert_array_equal(res.scores[:, 0, :], [[0, 6], [3, 3], [6, 0]])
    np.testing.assert_array_equal(res.points, [[0, -6], [3, -3], [6, 0]])
    mean, half = res.summary()
    np.testing.assert_array_equal(mean, res.points)
    np.testing.assert_array_equal(half, np.zeros((3, 2)))  # identical scores across prompts: zero width
    assert all(s.calls == 1 for s in scorers)                 # one batched call per scorer for the whole sweep


def test_sweep_is_deterministic_under_a_seed():
    prompts = ["p1", "p2"]
    mk = lambda: [CountingScorer("words"), CountingScorer("bangs", cost=True)]  # noqa: E731
    a = run_eval(sampling_generator, prompts, mk(), [0.5, 1.0], "fake", seed=3)
    torch.rand(5)  # moving the global RNG in between must not matter
    b = run_eval(sampling_generator, prompts, mk(), [0.5, 1.0], "fake", seed=3)
    c = run_eval(sampling_generator, prompts, mk(), [0.5, 1.0], "fake", seed=4)
    assert a.responses == b.responses and np.array_equal(a.scores, b.scores)
    assert a.responses != c.responses
    state = torch.random.get_rng_state()
    run_eval(sampling_generator, prompts, mk(), [0.5], "fake", seed=9)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is left as it was


def test_run_eval_bad_input():
    s = [CountingScorer("words"), CountingScorer("bangs", cost=True)]
    with pytest.raises(ValueError, match="prompts"):
        run_eval(sampling_generator, [], s, [0.5], "m")
    with pytest.raises(ValueError, match="prompts"):
        run_eval(sampling_generator, "a prompt", s, [0.5], "m")
    with pytest.raises(ValueError, match="sum to 1"):
        run_eval(sampling_generator, ["p"], s, [[0.5, 0.6]], "m")
    with pytest.raises(ValueError, match=r"\[W, 2\]"):
        run_eval(sampling_generator, ["p"], s, [[0.2, 0.3, 0.5]], "m")
    with pytest.raises(ValueError, match="repeat"):
        run_eval(sampling_generator, ["p"], [s[0], s[0]], [0.5], "m")
    with pytest.raises(ValueError, match="no scorers"):
        run_eval(sampling_generator, ["p"], [], [0.5], "m")
    with pytest.raises(ValueError, match="returned 1 rows"):
        run_eval(lambda p, w, seed=None: [["x"] * len(p)], ["p"], s, [0.2, 0.8], "m")


def test_check_weights_forms():
    np.testing.assert_allclose(sweep_weights([0.2, 0.8], 2), [[0.2, 0.8], [0.8, 0.2]])
    np.testing.assert_allclose(sweep_weights([[1, 0, 0], [0.2, 0.3, 0.5]], 3), [[1, 0, 0], [0.2, 0.3, 0.5]])
    with pytest.raises(ValueError, match="non-negative"):
        sweep_weights([[1.2, -0.2]], 2)


def test_sweep_result_roundtrip_and_pooling(tmp_path):
    s = [CountingScorer("words"), CountingScorer("bangs", cost=True)]
    a = run_eval(sampling_generator, ["p1", "p2"], s, [0.5, 1.0], "fake", seed=1, meta={"k": 1})
    b = run_eval(sampling_generator, ["p3"], s, [0.5, 1.0], "fake", seed=2)
    back = SweepResult.load(a.save(tmp_path / "fake.json"))
    assert back.responses == a.responses and np.array_equal(back.scores, a.scores) and back.meta == {"k": 1}
    both = pooled([a, b])
    assert both.scores.shape == (2, 3, 2) and both.prompts == ["p1", "p2", "p3"] and both.meta["seeds"] == [1, 2]
    np.testing.assert_allclose(both.points, (2 * a.points + b.points) / 3)
    other = run_eval(sampling_generator, ["p1"], s, [0.5, 1.0], "other", seed=1)
    with pytest.raises(ValueError, match="one method"):
        pooled([a, other])
    with pytest.raises(ValueError, match="expected"):
        SweepResult("m", ["a"], [True], [[1.0]], ["p"], [["r"]], np.zeros((1, 2, 1)))


def test_score_responses_uses_the_given_cache():
    cache = ScoreCache()
    sc = CountingScorer("words")
    out = score_responses(["p", "q"], [["a b", "c"], ["a b", "c"]], [sc], cache=cache)
    assert out.shape == (2, 2, 1) and out[:, :, 0].tolist() == [[2, 1], [2, 1]]
    assert sc.rows == 2 and len(cache) == 2  # the second weight's identical responses came from the cache
