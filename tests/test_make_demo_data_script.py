"""scripts/make_demo_data.py's labelling rules on hand-made scores (no model, no scorer)."""
from argparse import Namespace
from pathlib import Path

import pytest
import torch
from conftest import load_script

from sipo_fast import scoring

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"


def _load():
    return load_script(SCRIPT)


ARGS = Namespace(min_words=3, min_relevance=0.2, min_distinct=0.7, tie_relevance=0.02, tie_tone=0.02)


def test_distinct_trigrams():
    m = _load()
    assert m.distinct_trigrams("a b a b a b") == pytest.approx(2 / 4)  # (a b a), (b a b) twice each
    assert m.distinct_trigrams("one two three four") == 1.0
    assert m.distinct_trigrams("hi there") == 1.0


def test_pref_follows_the_other_objective_within_the_tie_margin():
    m = _load()
    assert m._pref(0.05, 0.02, -0.30, 0.02) == 1   # decisive: response 1 is better
    assert m._pref(-0.05, 0.02, 0.30, 0.02) == 0
    assert m._pref(0.01, 0.02, -0.30, 0.02) == 0   # tie: follows the other objective (response 0)
    assert m._pref(0.01, 0.02, 0.30, 0.02) == 1
    assert m._pref(0.01, 0.02, 0.005, 0.02) == 0   # both tie: response 0


def test_build_rows_drops_degenerate_picks_the_widest_pair_and_labels(monkeypatch):
    """Prompt p: four samples. s3 is too short (2 words) and s2 repeats itself; of the usable s0, s1 and s4 the
    pair (s0, s4) differs most. With s0 = (rel .30, tone .90) and s4 = (rel .60, tone .20): helpfulness prefers
    s4 (response 1), tone prefers s0 (response 0): a conflict. Prompt q keeps one usable sample and is dropped."""
    m = _load()
    cache = [{"prompt": "p", "kind": "harsh", "greedy": None,
              "samples": ["zero one two three", "one two three four", "x y z x y z x y z", "too short",
                          "four five six seven"]},
             {"prompt": "q", "kind": "ordinary", "greedy": None, "samples": ["alpha beta gamma delta", "no"]}]
    rel = [0.30, 0.35, 0.50, 0.50, 0.60, 0.40, 0.10]
    tone = [0.90, 0.80, 0.50, 0.50, 0.20, 0.50, 0.50]
    monkeypatch.setattr(m, "score_all", lambda p, r, *a: {"relevance": rel, "tone": tone, "offensive": [0.0] * len(r)})
    rows, counts = m.build_rows(cache, ARGS)
    assert counts["degenerate"] == 3 and counts["dropped_prompts"] == 1 and counts["responses"] == 7
    assert len(rows) == 1
    r = rows[0]
    assert (r["response_0"], r["response_1"]) == ("zero one two three", "four five six seven")
    assert r["better_response_id"] == 1 and r["safer_response_id"] == 0
    assert r["is_response_0_safe"] and not r["is_response_1_safe"]  # tone 0.20 < 0.475
    assert r["tone_1"] == 0.2 and r["relevance_0"] == 0.3 and r["kind"] == "harsh"


class Fixed(scoring.Scorer):
    """Scores from a table, so the labels can be worked out by hand."""

    def __init__(self, name, table, higher_is_better=True):
        self.name, self.table, self.higher_is_better = name, table, higher_is_better

    def score(self, prompts, responses):
        return torch.tensor([self.table[r] for r in responses], dtype=torch.float32)


def test_any_two_scorer_specs_label_the_rows(tmp_path, monkeypatch):
    """--scorers with a module:Class spec (word count, higher better) and a registered cost (lower better,
    stored negated so that higher is safer). Prompt p, samples "a b c d" (4 words, cost 0.9) and "a b c d e f g"
    (7 words, cost 0.1): helpfulness prefers response 1 (7 > 4), the cost prefers response 1 too (0.1 < 0.9):
    no conflict. Safe = -cost >= -0.5: response 0 (-0.9) is not, response 1 (-0.1) is."""
    (tmp_path / "words_scorer.py").write_text(
        "import torch\nfrom sipo_fast.scoring import Scorer\n"
        "class Words(Scorer):\n    name = 'words'\n"
        "    def score(self, prompts, responses):\n        return torch.tensor([float(len(r.split())) for r in responses])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(scoring, "_REGISTRY", dict(scoring._REGISTRY))
    monkeypatch.setattr(scoring, "_CACHE", {"harmlessness": Fixed("harmlessness", {"a b c d": 1.0, "a b c d e f g": 1.0})})
    scoring.register_scorer("toy_cost", lambda: Fixed("toy cost", {"a b c d": 0.9, "a b c d e f g": 0.1},
                                                      higher_is_better=False))
    m = _load()
    scorers, stems = m.resolve_scorers(["words_scorer:Words", "toy_cost"])
    assert stems == ("words", "toy_cost")
    args = Namespace(**{**vars(ARGS), "min_relevance": 0.0}, scorers=scorers, stems=stems, safe_threshold=-0.5)
    cache = [{"prompt": "p", "kind": "harsh", "greedy": None, "samples": ["a b c d", "a b c d e f g"]}]
    (row,), _ = m.build_rows(cache, args)
    assert row["better_response_id"] == 1 and row["safer_response_id"] == 1
    assert row["words_0"] == 4.0 and row["toy_cost_1"] == pytest.approx(-0.1)
    assert (row["is_response_0_safe"], row["is_response_1_safe"]) == (False, True)
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        m.resolve_scorers(["nope", "toy_cost"])


def test_bad_scorer_spec_fails_before_sampling(capsys):
    with pytest.raises(SystemExit):
        _load().main(["--scorers", "relevance", "hf:/no/such/model"])
    assert "no such file or directory" in capsys.readouterr().err
