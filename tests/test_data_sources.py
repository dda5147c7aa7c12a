"""Preference data from every source datasets reads (jsonl, json, csv, tsv, parquet, compressed jsonl, a parquet
directory, save_to_disk directories), in both schemas, gives the same normalised rows; a source in neither
schema is named in one error; line_checks says which text checks apply."""
import gzip
import json

import pytest
from datasets import Dataset, DatasetDict

from sipo_fast import data
from sipo_fast.data.sources import line_checks

PKU_ROWS = [
    {"prompt": "How do I bake bread?", "response_0": "Mix flour and water.", "response_1": "Buy some.",
     "better_response_id": 0, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": True},
    {"prompt": "Insult my boss.", "response_0": "He is an idiot.", "response_1": "Try talking to them calmly.",
     "better_response_id": 0, "safer_response_id": 1, "is_response_0_safe": False, "is_response_1_safe": True},
    {"prompt": "Say hi.", "response_0": "Hi!", "response_1": "Hello, how are you?",
     "better_response_id": 1, "safer_response_id": 0, "is_response_0_safe": True, "is_response_1_safe": True},
]
PREF_ROWS = [{"prompt": r["prompt"], "response_0": r["response_0"], "response_1": r["response_1"],
              "pref_helpful": r["better_response_id"], "pref_harmless": r["safer_response_id"], "pref_honest": i % 2}
             for i, r in enumerate(PKU_ROWS)]


def _write(rows, fmt: str, tmp_path):
    """``rows`` written in one format; returns the path to load."""
    ds = Dataset.from_list(rows)
    if fmt == "jsonl":
        p = tmp_path / "d.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "json-array":
        p = tmp_path / "d.json"
        p.write_text(json.dumps(rows))
    elif fmt == "jsonl.gz":
        p = tmp_path / "d.jsonl.gz"
        p.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    elif fmt in ("csv", "parquet"):
        p = tmp_path / f"d.{fmt}"
        getattr(ds, f"to_{fmt}")(str(p))
    elif fmt == "tsv":
        p = tmp_path / "d.tsv"
        ds.to_csv(str(p), sep="\t")
    elif fmt == "parquet-dir":
        p = tmp_path / "pq"
        p.mkdir()
        ds.to_parquet(str(p / "train-00000-of-00001.parquet"))
    elif fmt == "saved":
        p = tmp_path / "saved"
        ds.save_to_disk(str(p))
    elif fmt == "saved-dict":
        p = tmp_path / "saved_dict"
        DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(p))
    else:
        raise AssertionError(fmt)
    return p


FORMATS = ["jsonl", "json-array", "jsonl.gz", "csv", "tsv", "parquet", "parquet-dir", "saved", "saved-dict"]
COLUMNS = ["prompt", "response_0", "response_1", "pref_helpful", "pref_harmless"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows", [PKU_ROWS, PREF_ROWS], ids=["pku", "normalised"])
def test_every_format_in_either_schema_loads_the_same_preferences(fmt, rows, tmp_path):
    got = data.load_preferences(_write(rows, fmt, tmp_path))
    want = [{c: r[c] for c in COLUMNS} for r in PREF_ROWS]
    assert [{c: r[c] for c in COLUMNS} for r in got] == want
    expected = ["helpful", "harmless", "honest"] if rows is PREF_ROWS else ["helpful", "harmless"]
    assert data.objectives(got) == expected


def test_saved_dataset_dict_splits(tmp_path):
    p = _write(PREF_ROWS, "saved-dict", tmp_path)
    assert len(data.load_preferences(p, split="test")) == 1
    with pytest.raises(ValueError, match=r"saved_dict: the saved DatasetDict has no split 'validation'"):
        data.load_preferences(p, split="validation")


@pytest.mark.parametrize("fmt", ["csv", "parquet", "saved", "parquet-dir"])
def test_neither_schema_names_the_source(fmt, tmp_path):
    rows = [{"question": "q", "answer_a": "a", "answer_b": "b", "label": 1}]
    p = _write(rows, fmt, tmp_path)
    with pytest.raises(ValueError, match="no preference schema") as err:
        data.load_preferences(p)
    assert str(p) in str(err.value) and "pref_<objective>" in str(err.value) and "PKU-SafeRLHF" in str(err.value)


def test_normalised_schema_needs_its_columns(tmp_path):
    one = _write([{k: v for k, v in r.items() if k not in ("pref_harmless", "pref_honest")} for r in PREF_ROWS],
                 "parquet", tmp_path)
    with pytest.raises(ValueError, match="at least two pref_<objective>"):
        data.load_preferences(one)
    (tmp_path / "b").mkdir()
    no_resp = _write([{k: v for k, v in r.items() if k != "response_1"} for r in PREF_ROWS], "csv", tmp_path / "b")
    with pytest.raises(ValueError, match=r"d\.csv: not in the normalised preference schema, missing columns \['response_1'\]"):
        data.load_preferences(no_resp)


def test_unreadable_and_missing_sources_are_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"\xd8 not a parquet file at all")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot be read"):
        data.load_preferences(bad)
    with pytest.raises(ValueError, match=r"nothing\.parquet: no such file or directory"):
        data.load_preferences(tmp_path / "nothing.parquet")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        (tmp_path / "x.txt").write_text("hi")
        data.load_preferences(tmp_path / "x.txt")


@pytest.mark.parametrize("fmt,checks", [
    ("jsonl", ("utf8", "json_lines")), ("json-array", ("utf8",)), ("csv", ("utf8",)), ("tsv", ("utf8",)),
    ("parquet", ()), ("jsonl.gz", ()), ("parquet-dir", ()), ("saved", ()),
])
def test_line_checks_apply_to_text_files_only(fmt, checks, tmp_path):
    assert line_checks(_write(PREF_ROWS, fmt, tmp_path)) == checks


def test_line_checks_json_lines_under_json_suffix_and_names(tmp_path):
    p = tmp_path / "lines.json"
    p.write_text("\n" + json.dumps(PREF_ROWS[0]) + "\n")
    assert line_checks(p) == ("utf8", "json_lines")
    assert line_checks("PKU-Alignment/PKU-SafeRLHF-10K") == ()
    assert line_checks(tmp_path / "missing.jsonl") == ()
