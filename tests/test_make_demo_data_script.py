"""scripts/make_demo_data.py's labelling rules on hand-made scores (no model, no scorer)."""
from argparse import Namespace
from pathlib import Path

import pytest
from conftest import load_script

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
    monkeypatch.setattr(m, "score_all", lambda p, r: {"relevance": rel, "tone": tone, "offensive": [0.0] * len(r)})
    rows, counts = m.build_rows(cache, ARGS)
    assert counts["degenerate"] == 3 and counts["dropped_prompts"] == 1 and counts["responses"] == 7
    assert len(rows) == 1
    r = rows[0]
    assert (r["response_0"], r["response_1"]) == ("zero one two three", "four five six seven")
    assert r["better_response_id"] == 1 and r["safer_response_id"] == 0
    assert r["is_response_0_safe"] and not r["is_response_1_safe"]  # tone 0.20 < 0.475
    assert r["tone_1"] == 0.2 and r["relevance_0"] == 0.3 and r["kind"] == "harsh"
