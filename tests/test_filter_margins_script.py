"""scripts/filter_margins.py on a hand-made filter artifact."""
import json
from pathlib import Path

import pytest
from conftest import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "filter_margins.py"


def _load():
    return load_script(SCRIPT)


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
    assert out["survival rate"] == pytest.approx(1 / 3)


def test_margin_arrays_and_plot(tmp_path):
    """Two runs pooled. Originals a = (1, 0), b = (0, 1): weaker (0, 0), stronger (1, 1). Candidates (2, 3)
    and (0.5, 0.5) -> margins vs weaker model 0: [2, 0.5], vs stronger: [1, -0.5]; names from stage.json."""
    for name in ("r1", "r2"):
        d = tmp_path / name / "filter"
        d.mkdir(parents=True)
        (d / "rewards.jsonl").write_text("\n".join(json.dumps({"rewards": y, "rewards_a": [1.0, 0.0],
                                                               "rewards_b": [0.0, 1.0], "survives": False})
                                                   for y in ([2.0, 3.0], [0.5, 0.5])))
        (d / "stage.json").write_text(json.dumps({"summary": {"reward_models": ["helpful", "harmless"]}}))
    mod = _load()
    names, weak, strong = mod.margin_arrays([tmp_path / "r1", tmp_path / "r2"])
    assert names == ["helpful", "harmless"]
    assert weak[0] == [2.0, 0.5, 2.0, 0.5] and strong[1] == [2.0, -0.5, 2.0, -0.5]
    png = mod.plot([tmp_path / "r1", tmp_path / "r2"], tmp_path / "m.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_missing_artifact_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="run the filter stage first"):
        _load().margins(tmp_path)
