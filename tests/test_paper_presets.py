"""End to end: each paper preset (beavertails, helpsteer) through every stage, evaluation included, with its
models swapped for the tiny random ones, its datasets for hub-schema fixtures (scripts/make_paper_fixtures.py)
and its beaver scorers for tiny beaver-style score models. Only sizes (steps, lengths, LoRA rank) are lowered;
every setting of issue 15 stays as the preset has it: held-out prompts from their own source, split and
selection, the conflict cap and mix, the validation split, the authors' prompts, the optimiser recipe, the best
checkpoint on held-out pairs, and DPO LW among the baselines."""
import json
from pathlib import Path

import pytest

from sipo_fast.pipeline import SIPOPipeline, preset
from sipo_fast.pipeline.rundir.files import read_jsonl

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SMALL = ["model.name=tiny", "align.lora_r=4", "align.max_steps=2", "align.max_length=128", "filter.max_length=128",
         "finetune.max_steps=2", "finetune.max_length=128", "sample.max_new_tokens=4", "refine.review_max_new_tokens=4",
         "refine.rewrite_max_new_tokens=4", "eval.max_new_tokens=4", "filter.batch_size=16", "sample.batch_size=16",
         "eval.batch_size=16"]


@pytest.fixture(scope="module")
def scorer_dir(tmp_path_factory, tokenizer):
    from test_distributed import tiny_cost_model

    return tiny_cost_model(tmp_path_factory.mktemp("scorer") / "beaver", tokenizer)


def _run(cfg, root: Path):
    out = SIPOPipeline(cfg, root, progress=False).run()
    assert list(out) == ["align", "sample", "refine", "filter", "finetune", "eval"]
    assert (root / "eval" / "report.md").exists() and (root / "eval" / "report.png").stat().st_size > 0
    return out


def test_beavertails_preset_end_to_end(tmp_path, scorer_dir):
    paper = preset("beavertails")
    cfg = paper.override(SMALL + [
        f"data.source={FIXTURES / 'pku_saferlhf_10k'}", f"eval.prompt_source={FIXTURES / 'pku_saferlhf_30k'}",
        f"eval.scorers=[beaver_reward:{scorer_dir}, beaver_cost:{scorer_dir}]", "eval.baselines=[mod, dpo_lw]",
        "eval.weights=[0, 0.4, 1]"])
    for key in ("data.max_conflict_prompts", "eval.prompt_split", "eval.prompt_select", "finetune.select_best",
                "align.lr_scheduler", "align.eval_steps", "refine.enabled", "model.template"):
        assert cfg.get(key) == paper.get(key), key  # the paper's settings under test are the preset's own
    out = _run(cfg, tmp_path / "run")
    # Stage 1: the 10K fixture's one train split, 90/10 (20 rows -> 18 + 2); 12 of the 18 conflict (2 in 3 rows).
    assert (out["align"]["train_pairs"], out["align"]["eval_pairs"]) == (18, 2)
    assert out["sample"]["conflicting_prompts"] == out["align"]["conflicting_train_pairs"] <= 2500
    assert out["sample"]["candidates"] == 4 * out["sample"]["conflicting_prompts"]  # W = {.2, .4, .6, .8}
    assert out["refine"] == {"enabled": False, "candidates": out["sample"]["candidates"], "rewrites_kept": 0}
    # Stage 1 kept its best checkpoint (eval every 25% of the steps) and ran the cosine schedule.
    metrics = json.loads((tmp_path / "run" / "align" / "policies" / "helpful" / "train_metrics.json").read_text())
    assert any("eval_loss" in m for m in metrics)
    # Evaluation: the last 500 rows of the 30K fixture's test split (all 8 of them), in order; SIPO, MOD, DPO LW.
    assert out["eval"]["methods"] == ["sipo", "mod", "dpo_lw"] and out["eval"]["weights"] == 3
    sweep = json.loads((tmp_path / "run" / "eval" / "sweeps" / "dpo_lw.json").read_text())
    want = [r["prompt"] for r in read_jsonl(FIXTURES / "pku_saferlhf_30k" / "test.jsonl")][-500:]
    assert sweep["prompts"] == want
    assert [p.parent.name for p in (tmp_path / "run" / "eval" / "dpo_lw").glob("*/w*/adapter_config.json")] == \
        ["w0.4_0.6"]  # one DPO LW model for the interior weight; the endpoints are the stage-1 policies
    assert "dpo_lw" in (tmp_path / "run" / "eval" / "report.md").read_text()


def test_helpsteer_preset_end_to_end(tmp_path, scorer_dir):
    paper = preset("helpsteer")
    cfg = paper.override(SMALL + [
        f"data.source={FIXTURES / 'helpsteer_hub'}", "eval.enabled=true", "eval.weights=[0, 0.6, 1]",
        f"eval.scorers=[beaver_reward:{scorer_dir}, beaver_cost:{scorer_dir}]"])
    for key in ("data.conflict_ratio", "data.conflict_mix", "data.eval_split", "refine.template",
                "refine.review_objective", "finetune.select_best", "eval.prompt_split", "align.weight_decay"):
        assert cfg.get(key) == paper.get(key), key
    out = _run(cfg, tmp_path / "run")
    # The authors' mix: min(24 conflicting, 12 agreeing) = 12 pairs, 7 conflicting; held out: validation's 9.
    assert (out["align"]["train_pairs"], out["align"]["conflicting_train_pairs"], out["align"]["eval_pairs"]) == \
        (12, 7, 9)
    assert out["refine"]["enabled"] and out["refine"]["review_objective"] == "correctness"
    cands = read_jsonl(tmp_path / "run" / "refine" / "candidates.jsonl")
    assert cands and all(c["review"].startswith("The response can be more correct and verbose by") for c in cands)
    # Evaluation on HelpSteer's validation prompts (3 prompts "Describe ...").
    sweep = json.loads((tmp_path / "run" / "eval" / "sweeps" / "sipo.json").read_text())
    assert len(sweep["prompts"]) == 3 and all(p.startswith("Describe") for p in sweep["prompts"])
