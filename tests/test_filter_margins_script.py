"""scripts/filter_margins.py on a hand-made filter artifact."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "filter_margins.py"


def _load():
    spec = importlib.util.spec_from_file_location("filter_margins", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_counts_and_best_margin(tmp_path):
    rows = [  # originals a = (1, 0), b = (0, 1) under two reward models
        {"rewards": [2.0, 3.0], "survives": True},    # beats both everywhere: margin min(2-1, 3-1) = 1
        {"rewards": [0.5, 0.5], "survives": False},   # beats the weaker (0) on both, not the stronger: -0.5
        {"rewards": [-1.0, 5.0], "survives": False},  # loses to the weaker under model 0: margin -2
    ]
    (tmp_path / "filter").mkdir()
    (tmp_path / "filter" / "rewards.jsonl").write_text(
        "\n".join(json.dumps({**r, "rewards_a": [1.0, 0.0], "rewards_b": [0.0, 1.0]}) for r in rows))
    out = _load().margins(tmp_path)
    assert out["candidates"] == 3 and out["survivors"] == 1
    assert out["beat weaker original on all"] == 2
    assert out["best margin vs stronger"] == pytest.approx(1.0)


def test_missing_artifact_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="run the filter stage first"):
        _load().margins(tmp_path)
