"""The Markdown + PNG report (sipo_fast.eval.report) on synthetic sweeps with hand-computable numbers."""
import re

import numpy as np
import pytest

from sipo_fast.eval.report import build_report, default_reference, write_report
from sipo_fast.eval.sweep import SweepResult

W = [[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]


def _sweep(method, points, seed=0, spread=0.1):
    """A sweep whose per-weight means (maximisation orientation) are ``points``; objective 2 is a cost, so its
    raw scores are the negated values. Three prompts at mean − spread, mean, mean + spread."""
    pts = np.asarray(points, float)                                   # (W, 2)
    offs = np.array([-spread, 0.0, spread])                           # (P,)
    maxed = pts[:, None, :] + offs[None, :, None]                     # (W, P, 2)
    raw = maxed * np.array([1.0, -1.0])                               # cost column back to raw units
    prompts = [f"q{i}" for i in range(3)]
    return SweepResult(method, ["relevance", "cost"], [True, False], W, prompts,
                       [[f"{method}-{w}-{p}" for p in prompts] for w in range(3)], raw, seed=seed)


MOD = [[1, 3], [2, 2], [3, 1]]        # HV vs (0,0): 3·1 + 2·1 + 1·1 = 6
SIPO = [[1, 4], [3, 3], [4, 1]]       # HV vs (0,0): 4·1 + 3·(3−1) + 1·(4−3) = 11


def test_report_numbers_hand_computed():
    rep = build_report([_sweep("mod", MOD), _sweep("sipo", SIPO)], ref=[0, 0], baseline="mod")
    assert rep.hypervolumes("mod") == pytest.approx([6.0])
    assert rep.hypervolumes("sipo") == pytest.approx([11.0])
    # gains at matched weights: relevance (0+1+1)/3, −cost (1+1+0)/3
    np.testing.assert_allclose(rep.gains("sipo"), [2 / 3, 2 / 3])
    assert rep.gains("mod") is None
    # every MOD point is dominated by the SIPO point at the same weight: the joint front is SIPO's
    assert rep.union_front() == {("sipo", 0), ("sipo", 1), ("sipo", 2)}


def test_report_without_matplotlib_keeps_the_numbers(tmp_path, monkeypatch):
    """matplotlib is in the demo extra: without it the report is the markdown alone, with one warning."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.warns(RuntimeWarning, match=r"no plot; `pip install 'sipo-fast\[demo\]'`"):
        paths = write_report([_sweep("mod", MOD)], tmp_path, ref=[0, 0], baseline="mod")
    md = paths["markdown"].read_text()
    assert paths["png"] is None and not list(tmp_path.glob("*.png")) and "![Pareto" not in md and "| mod |" in md


def test_report_markdown_and_png(tmp_path):
    import matplotlib.image as mpimg

    results = [_sweep("mod", MOD), _sweep("sipo", SIPO, seed=0), _sweep("sipo", np.add(SIPO, 1), seed=1)]
    paths = write_report(results, tmp_path, ref=[0, 0], baseline="mod", title="Synthetic", notes="hello notes")
    md = paths["markdown"].read_text()
    img = mpimg.imread(paths["png"])
    assert img.ndim == 3 and img.shape[0] > 400 and img.shape[1] > 600
    assert img[..., :3].std() > 0.05  # not a blank canvas
    assert "![Pareto fronts](report.png)" in md and "hello notes" in md
    assert "−cost (↑ better; raw cost is lower-is-better)" in md and "relevance (↑ better)" in md
    # HV rows: seed 1 of SIPO is shifted by (1,1): staircase (5,2),(4,4),(2,5) → 5·2 + 4·2 + 2·1 = 20
    sipo_row = next(l for l in md.splitlines() if l.startswith("| sipo | 0, 1 |"))
    assert "11, 20" in sipo_row and f"{15.5:.4g} ± {np.std([11, 20], ddof=1):.4g}" in sipo_row
    # per-weight table: pooled over both seeds (n = 6), CI from 6 prompt-level scores
    rows = [l for l in md.splitlines() if re.match(r"\| sipo \| [0-9.]+ \| 6 \| [0-9.]+ ±", l)]
    assert len(rows) == 3 and all(r.rstrip().endswith("| * |") for r in rows)
    assert not any(l.rstrip().endswith("| * |") for l in md.splitlines() if l.startswith("| mod | 0"))
    assert "| sipo | 0.5 | 6 | 3.5000 ±" in md  # relevance at w=0.5: mean of 3 and 4
    # coverage: SIPO covers all of MOD, MOD covers none of SIPO
    cov_row = next(l for l in md.splitlines() if l.startswith("| sipo | ") and "—" in l)
    assert cov_row.startswith("| sipo | 1.00 |")


def test_default_reference_and_validation():
    pts = np.array([[1.0, 3.0], [3.0, 1.0]])
    np.testing.assert_allclose(default_reference(pts), [1 - 0.2, 1 - 0.2])  # nadir − 10% of the range (2)
    with pytest.raises(ValueError, match="one per objective"):
        build_report([_sweep("mod", MOD)], ref=[0, 0, 0])
    with pytest.raises(ValueError, match="no sweep results"):
        build_report([])
    other = SweepResult("x", ["relevance", "harm"], [True, True], [[1, 0]], ["q"], [["r"]], np.zeros((1, 1, 2)))
    with pytest.raises(ValueError, match="same scorers"):
        build_report([_sweep("mod", MOD), other])


def test_report_three_objectives_plots_every_pair(tmp_path):
    import matplotlib.image as mpimg

    w3 = [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    r = SweepResult("mod", ["a", "b", "c"], [True, True, False], w3, ["q"], [["x"], ["y"], ["z"]],
                    np.array([[[1, 0, 0]], [[0, 1, 0]], [[0, 0, -1]]], float), seed=0)
    paths = write_report([r], tmp_path, ref=[-1, -1, -1], baseline=None)
    img = mpimg.imread(paths["png"])
    assert img.shape[1] > 2 * img.shape[0]  # three panels side by side
    # points (1,0,0), (0,1,0), (0,0,1) vs ref −1: boxes 2·1·1 each, pairwise overlaps 1, triple 1: 6 − 3 + 1 = 4
    assert "| mod | 0 | 4 | 4 |" in paths["markdown"].read_text()


def test_seed_comparison_hand_computed():
    """Seed 0: SIPO (HV 11) covers MOD (HV 6): ΔHV +5, dominates. Seed 1: SIPO equals MOD: ΔHV 0, C = 1 both
    ways, so it does not dominate."""
    rep = build_report([_sweep("sipo", SIPO, seed=0), _sweep("sipo", MOD, seed=1), _sweep("mod", MOD, seed=0),
                        _sweep("mod", MOD, seed=1)], ref=[0, 0])
    rows = rep.seed_comparison("sipo", "mod")
    assert [(r["seed"], r["delta"], r["c_ab"], r["c_ba"], r["dominates"]) for r in rows] == [
        (0, pytest.approx(5.0), 1.0, 0.0, True), (1, pytest.approx(0.0), 1.0, 1.0, False)]
    md = rep.to_markdown()
    assert "- vs mod: ΔHV +2.5 ± 3.54 (sd) over 2 seed(s); sipo's front dominates in 1 of 2" in md
