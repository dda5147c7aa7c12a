"""benchmarks/bench_cost.py: the helpers on hand-made run directories, and the whole script on the smoke preset."""
import json
import sys
from pathlib import Path

import pytest
from conftest import load_script

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load():
    sys.path.insert(0, str(BENCH))  # bench_cost imports its sibling harness
    return load_script(BENCH / "bench_cost.py")


def test_objective_runtime_from_train_runtime(tmp_path):
    """train_runtime 30 s (helpful) and 10 s (harmless): harmless's DPO took 10 s; an objective that never
    logged a train_runtime is an error, not a zero."""
    logs = tmp_path / "align" / "logs"
    logs.mkdir(parents=True)
    rows = [{"objective": "helpful", "loss": 0.7}, {"objective": "helpful", "train_runtime": 30.0},
            {"objective": "harmless", "loss": 0.6}, {"objective": "harmless", "train_runtime": 10.0}]
    (logs / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = _load()
    assert bench.objective_runtime(tmp_path, "harmless") == pytest.approx(10.0)
    assert bench.objective_runtime(tmp_path, "helpful") == pytest.approx(30.0)
    with pytest.raises(ValueError, match="no train_runtime"):
        bench.objective_runtime(tmp_path, "honest")


def test_generated_tokens_counts_every_candidate_plus_eos(tmp_path, tokenizer):
    """Two candidates of 2 and 3 tokens (as the tokenizer splits them) -> (2 + 1) + (3 + 1) = 7."""
    a, b = "Hello there", "Be kind to them"
    na, nb = (len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in (a, b))
    d = tmp_path / "sample"
    d.mkdir()
    (d / "candidates.jsonl").write_text(json.dumps({"candidate": a}) + "\n" + json.dumps({"candidate": b}) + "\n")
    assert _load().generated_tokens(tmp_path, tokenizer) == na + nb + 2


@pytest.mark.slow
def test_smoke_run_ends_with_the_ratio(tmp_path, capsys):
    """The smoke preset end to end (tiny model): SIPO's five stages, MODPO's DPO share plus one run per weight
    in W (2), the projected authors' rows, and the last line SIPO/MODPO = total SIPO wall / total MODPO wall."""
    mod = _load()
    mod.main(["--preset", "smoke", "--no-record", "--no-progress", "--run-dir", str(tmp_path / "run"),
              "--probe-tokens", "4", "--probe-samples", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("SIPO/MODPO = ")
    table = [ln.split(" | ") for ln in lines if ln.startswith("| SIPO") or ln.startswith("| MODPO")]
    sipo_total = float(next(r for r in table if r[0] == "| SIPO (sipo_fast)" and r[1] == "total")[2])
    modpo_total = float(next(r for r in table if r[0] == "| MODPO" and r[1] == "total")[2])
    assert sum(r[1].startswith("MODPO w=") for r in table) == 2
    assert float(lines[-1].split("= ")[1]) == pytest.approx(sipo_total / modpo_total, rel=2e-3)
