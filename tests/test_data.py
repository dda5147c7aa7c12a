"""Demo data, loaders on hub-schema fixtures, and the conflict ratio on hand-made cases."""
from pathlib import Path

import pytest
from datasets import Dataset

from sipo_fast import data

FIX = Path(__file__).parent / "fixtures"


def test_demo_schema_size_and_labels():
    ds = data.load_demo()
    assert len(ds) >= data.DEMO_SIZE_MIN
    assert set(data.PKU_COLUMNS) <= set(ds.column_names)
    kinds = ds["kind"]
    harsh = sum(k == "harsh" for k in kinds) / len(kinds)
    assert 0.35 < harsh < 0.65  # about half invite rude answers
    tie = 0.02  # the card's tie margin on both objectives
    pref = lambda d, other: int(d > 0) if abs(d) > tie else (int(other > 0) if abs(other) > tie else 0)  # noqa: E731
    for r in ds:
        # labels follow the stored scores: better = more relevant, safer = better tone; a difference within the
        # tie margin follows the other objective, so a conflict needs both differences beyond it
        d_rel, d_tone = r["relevance_1"] - r["relevance_0"], r["tone_1"] - r["tone_0"]
        assert r["better_response_id"] == pref(d_rel, d_tone)
        assert r["safer_response_id"] == pref(d_tone, d_rel)
        if r["better_response_id"] != r["safer_response_id"]:
            assert abs(d_rel) > tie and abs(d_tone) > tie
        assert r["is_response_0_safe"] == (r["tone_0"] >= 0.475)
        assert r["response_0"].strip() and r["response_1"].strip() and r["response_0"] != r["response_1"]


def test_demo_data_has_a_trade_off():
    """G1 on the shipped data: the objectives' differences within pairs are negatively correlated."""
    from sipo_fast.eval.gates import data_correlation

    g1 = data_correlation(list(data.load_demo()))
    assert g1["r"] < 0 and g1["n"] == len(data.load_demo())
    card = (Path(data.__file__).parent / "demo" / "DATASET_CARD.md").read_text()
    assert f"{g1['r']:+.3f} [{g1['lo']:+.3f}, {g1['hi']:+.3f}]" in card


def test_demo_scores_reproduce_with_the_scorers():
    """The stored raw scores are what the shipped scorers give (checked on a sample of rows)."""
    from sipo_fast.scoring import get_scorer

    ds = data.load_demo().select(range(0, 400, 40))
    for i in (0, 1):
        resp = ds[f"response_{i}"]
        off = 1 - get_scorer("harmlessness").score(ds["prompt"], resp)
        rel = get_scorer("relevance").score(ds["prompt"], resp)
        tone = get_scorer("tone").score(ds["prompt"], resp)
        assert off.tolist() == pytest.approx(ds[f"offensive_{i}"], abs=1e-4)
        assert rel.tolist() == pytest.approx(ds[f"relevance_{i}"], abs=1e-3)
        assert tone.tolist() == pytest.approx(ds[f"tone_{i}"], abs=1e-5)


def test_demo_splits_and_card():
    full, train, test = data.load_demo("all"), data.load_demo("train"), data.load_demo("test")
    assert len(train) + len(test) == len(full)
    assert not set(train["prompt"]) & set(test["prompt"])
    assert data.load_demo("train")["prompt"] == train["prompt"]  # deterministic
    card = (Path(data.__file__).parent / "demo" / "DATASET_CARD.md").read_text()
    assert f"| all | {len(full)} | {data.conflict_ratio(full):.3f} |" in card
    with pytest.raises(ValueError, match="split"):
        data.load_demo("validation")


def test_conflict_ratio_hand_made():
    """Rows (helpful, harmless) prefs: (0,0) (0,1) (1,1) (1,0) -> 2 conflicts of 4 = 0.5."""
    ds = Dataset.from_dict({"prompt": list("abcd"), "response_0": list("wxyz"), "response_1": list("WXYZ"),
                            "pref_helpful": [0, 0, 1, 1], "pref_harmless": [0, 1, 1, 0]})
    assert data.conflict_ratio(ds) == 0.5
    assert data.conflicting(ds)["prompt"] == ["b", "d"]
    three = ds.add_column("pref_honest", [0, 0, 0, 1])  # row c now conflicts too: 3 of 4
    assert data.conflict_ratio(three) == 0.75
    assert data.objectives(three) == ["helpful", "harmless", "honest"]
    assert data.conflict_ratio(ds.select([])) == 0.0
    with pytest.raises(ValueError, match="two preference columns"):
        data.conflict_ratio(ds.remove_columns(["pref_harmless"]))


def test_pku_loader_file_and_directory():
    ds = data.load_pku_saferlhf(FIX / "pku_saferlhf_10k_sample.jsonl")
    assert ds.column_names == data.PKU_COLUMNS and len(ds) == 6
    # fixture rows 2, 3, 5 have better != safer
    assert data.conflict_ratio(ds) == pytest.approx(3 / 6)
    prefs = data.pku_to_preferences(ds)
    assert prefs["pref_helpful"] == ds["better_response_id"] and prefs["pref_harmless"] == ds["safer_response_id"]
    d = data.load_pku_saferlhf(FIX / "pku_dir", split="train")  # newer schema with extra fields
    assert d.column_names == data.PKU_COLUMNS and len(d) == 4
    pref = data.load_preferences(FIX / "pku_saferlhf_10k_sample.jsonl", kind="pku")
    assert data.objectives(pref) == ["helpful", "harmless"]


def test_pku_loader_rejects_other_schemas():
    with pytest.raises(ValueError, match="missing columns"):
        data.load_pku_saferlhf(FIX / "helpsteer_sample.jsonl")
    with pytest.raises(ValueError, match="unsupported file type"):
        data.load_pku_saferlhf(Path(__file__))  # a .py file


def test_helpsteer_pairs_hand_computed():
    """Gravity responses (correctness, verbosity): r1=(3,0) r2=(4,2) r3=(2,2).
    (r1,r2): both prefer r2 -> prefs (1,1). (r1,r3): correctness prefers r1, verbosity r3 -> (0,1), a conflict.
    (r2,r3): verbosity tie -> dropped. Prime pair: correctness tie -> dropped. 'Say hi' has one response."""
    ds = data.load_helpsteer(FIX / "helpsteer_sample.jsonl")
    assert len(ds) == 2
    assert ds["pref_correctness"] == [1, 0] and ds["pref_verbosity"] == [1, 1]
    assert data.conflict_ratio(ds) == 0.5
    assert ds["score_correctness_0"] == [3, 3]
    # helpfulness vs verbosity: only (r1, r2) has no tie
    assert len(data.load_helpsteer(FIX / "helpsteer_sample.jsonl", attributes=("helpfulness", "verbosity"))) == 1
    with pytest.raises(ValueError, match="attributes"):
        data.load_helpsteer(FIX / "helpsteer_sample.jsonl", attributes=("correctness",))
    assert data.objectives(data.load_preferences(FIX / "helpsteer_sample.jsonl", kind="helpsteer")) == \
        ["correctness", "verbosity"]
