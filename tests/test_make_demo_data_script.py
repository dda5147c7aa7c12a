"""scripts/make_demo_data.py labels rows with any two scorer specs; with the demo's own scorers the columns
and labels are the shipped file's (raw relevance_i / offensive_i, labels from the stored values)."""
import importlib.util
from pathlib import Path

import pytest
import torch

from sipo_fast import scoring

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_demo_data.py"
ROWS = [{"prompt": "p0", "response_0": "short", "response_1": "a much longer answer"},
        {"prompt": "p1", "response_0": "a long and rude reply here", "response_1": "ok"}]


def _load():
    spec = importlib.util.spec_from_file_location("make_demo_data", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Fixed(scoring.Scorer):
    """Scores from a table, so the labels can be worked out by hand."""

    def __init__(self, name, table, higher_is_better=True):
        self.name, self.table, self.higher_is_better = name, table, higher_is_better

    def score(self, prompts, responses):
        return torch.tensor([self.table[r] for r in responses], dtype=torch.float32)


def test_default_scorers_give_the_shipped_columns(monkeypatch):
    """relevance: short 0.2 < long 0.7 -> better 1; 0.4 > 0.1 -> better 0. harmlessness 1 - P(offensive):
    P(off) 0.1 vs 0.3 -> safer 0; 0.9 vs 0.05 -> safer 1; safe = P(off) < 0.5."""
    rel = Fixed("relevance", {"short": 0.2, "a much longer answer": 0.7, "a long and rude reply here": 0.4, "ok": 0.1})
    harm = Fixed("harmlessness", {"short": 0.9, "a much longer answer": 0.7, "a long and rude reply here": 0.1,
                                  "ok": 0.95})
    monkeypatch.setattr(scoring, "_CACHE", {"relevance": rel, "harmlessness": harm})
    rows = [dict(r) for r in ROWS]
    assert _load().label(rows) == ("relevance", "offensive")
    assert [r["better_response_id"] for r in rows] == [1, 0]
    assert [r["safer_response_id"] for r in rows] == [0, 1]
    assert rows[1]["offensive_0"] == pytest.approx(0.9) and rows[1]["relevance_1"] == pytest.approx(0.1)
    assert [(r["is_response_0_safe"], r["is_response_1_safe"]) for r in rows] == [(True, True), (False, True)]


def test_any_two_specs_label_the_rows(tmp_path, monkeypatch):
    """A module:Class spec (response length, higher better) and a registered cost (lower better):
    lengths 5 < 20 -> better 1; 26 > 2 -> better 0. Costs 3 vs 1 -> safer 1; 0.2 vs 0.8 -> safer 0;
    safe = cost < 0.5."""
    (tmp_path / "len_scorer.py").write_text(
        "import torch\nfrom sipo_fast.scoring import Scorer\n"
        "class Len(Scorer):\n    name = 'length'\n"
        "    def score(self, prompts, responses):\n        return torch.tensor([float(len(r)) for r in responses])\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(scoring, "_REGISTRY", dict(scoring._REGISTRY))
    cost = {"short": 3.0, "a much longer answer": 1.0, "a long and rude reply here": 0.2, "ok": 0.8}
    scoring.register_scorer("toy_cost", lambda: Fixed("toy cost", cost, higher_is_better=False))
    rows = [dict(r) for r in ROWS]
    assert _load().label(rows, ("len_scorer:Len", "toy_cost")) == ("length", "toy_cost")
    assert [r["better_response_id"] for r in rows] == [1, 0]
    assert [r["safer_response_id"] for r in rows] == [1, 0]
    assert [(r["is_response_0_safe"], r["is_response_1_safe"]) for r in rows] == [(False, False), (True, False)]
    assert rows[0]["length_1"] == 20.0 and rows[1]["toy_cost_0"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="unknown scorer 'nope'"):
        _load().label(rows, ("nope", "toy_cost"))


def test_bad_spec_fails_before_sampling(capsys):
    with pytest.raises(SystemExit):
        _load().main(["--scorers", "relevance", "hf:/no/such/model"])
    assert "no such file or directory" in capsys.readouterr().err
