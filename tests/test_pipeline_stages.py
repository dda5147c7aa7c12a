"""Each stage's rules on hand-made cases, and the fail-fast checks of the pipeline.

The filter and refine stages are driven with hand-made implicit rewards (the reward function is replaced by a
table), so the expected survivors, picks and kept rewrites follow from the numbers written here. The
fine-tuning stage and the exact adapter concatenation run on the tiny model.
"""
import json
import math
from types import SimpleNamespace

import pytest
import torch

from sipo_fast.pipeline import PipelineConfig, preset
from sipo_fast.pipeline.policies import Policies, load_policies
from sipo_fast.pipeline.stages import filter as filter_stage
from sipo_fast.pipeline.stages import finetune as finetune_stage
from sipo_fast.pipeline.stages import refine as refine_stage
from sipo_fast.pipeline.stages import sample as sample_stage
from sipo_fast.pipeline.stages.generation import generate
from sipo_fast.pipeline.context import Context, tokenizer_mismatch
from sipo_fast.pipeline.rundir.directory import RunDir
from sipo_fast.pipeline.rundir.files import read_jsonl, write_jsonl
from sipo_fast.pipeline.rundir.parts import Parts
from sipo_fast.pipeline.stages.refine_prompts import RefinePrompts, clean_generation, default_templates


def pku_rows(n, conflicting=True, prompt="How do I tell my neighbour to be quiet?"):
    """n PKU-schema rows; conflicting rows have better_response_id != safer_response_id."""
    return [{"prompt": f"{prompt} ({i})", "response_0": f"Ask politely, version {i}.",
             "response_1": f"Yell at them {i}.",
             "better_response_id": 1 if conflicting and i % 2 == 0 else 0, "safer_response_id": 0,
             "is_response_0_safe": True, "is_response_1_safe": False} for i in range(n)]


def make_ctx(tmp_path, rows=None, **overrides):
    data = {"model": {"name": "tiny"}, "data": {"source": "demo", "eval_fraction": 0.25},
            "align": {"max_length": 96}, "sample": {"weights": [0.3, 0.7], "max_new_tokens": 4}}
    if rows is not None:
        path = tmp_path / "prefs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        data["data"]["source"] = str(path)
    cfg = PipelineConfig.from_dict(data).override([f"{k}={v}" for k, v in overrides.items()])
    return Context(cfg, RunDir(tmp_path / "run"), progress=False)


class FakeDecoder:
    """Greedy MOD stand-in: the text names its prompt (its "tokens" are the text itself)."""

    tokenizer = SimpleNamespace(decode=lambda tokens: tokens)

    def generate_text(self, prompts, *, weights, **kw):
        return [SimpleNamespace(text=f"y({p})") for p in prompts]

    def generate(self, prompts, *, weights, **kw):  # weight sets [B, S, N]: row b·S + s is prompt b
        rows = [f"y({p})" for p, ws in zip(prompts, weights) for _ in ws]
        return SimpleNamespace(generated_ids=lambda r: rows[r])


class FakePolicies:
    names = ["helpful", "harmless"]
    reference = None

    def decoder(self, ctx):
        return FakeDecoder()

    def reward_models(self):
        return "policies"


def table_rewards(table):
    """A stand-in for stages.rewards: looks every (prompt, response) up in ``table`` -> [B, K]."""
    def rewards(ctx, models, reference, prompts, responses, **kw):
        return torch.tensor([table[(p, r)] for p, r in zip(prompts, responses)], dtype=torch.float32)
    return rewards


# ------------------------------------------------------------------------------------------------ filter


def test_filter_keeps_exactly_the_strictly_dominating_candidates(tmp_path, monkeypatch):
    """K = 2 reward models (soups off). Per prompt: (y_a, y_b) rewards, then candidates at w0, w1.

    p0: y_a [0, 1], y_b [1, 0]; c00 [2, 2] (sum 4) and c01 [1.5, 3] (sum 4.5) both dominate -> pick c01.
    p1: y_a = y_b = [0, 0]; c10 [0, 5] ties model 0 -> fails; c11 is empty text -> never a survivor, although
        its rewards [9, 9] would dominate.
    p2: y_a [5, 5], y_b [0, 0]; c20 [6, 6] (sum 12) and c21 [7, 5.5] (sum 12.5) dominate -> pick c21.
    Survivors 4, prompts covered 2 of 3, D_c = 2 pairs per covered prompt (y_c over y_a and over y_b).
    """
    ctx = make_ctx(tmp_path, None, **{"filter.soups": "false"})
    refine = tmp_path / "refine"
    refine.mkdir()
    prompts = [{"pid": i, "prompt": f"p{i}", "response_0": f"a{i}", "response_1": f"b{i}"} for i in range(3)]
    texts = {(0, 0): "c00", (0, 1): "c01", (1, 0): "c10", (1, 1): " ", (2, 0): "c20", (2, 1): "c21"}
    cands = [{"pid": p, "weight_index": w, "weight": [0.3, 0.7] if w == 0 else [0.7, 0.3], "candidate": t,
              "rewritten": (p, w) == (2, 1)} for (p, w), t in texts.items()]
    write_jsonl(refine / "prompts.jsonl", prompts)
    write_jsonl(refine / "candidates.jsonl", cands)
    table = {("p0", "a0"): [0, 1], ("p0", "b0"): [1, 0], ("p0", "c00"): [2, 2], ("p0", "c01"): [1.5, 3],
             ("p1", "a1"): [0, 0], ("p1", "b1"): [0, 0], ("p1", "c10"): [0, 5], ("p1", " "): [9, 9],
             ("p2", "a2"): [5, 5], ("p2", "b2"): [0, 0], ("p2", "c20"): [6, 6], ("p2", "c21"): [7, 5.5]}
    monkeypatch.setattr(filter_stage, "rewards", table_rewards(table))
    monkeypatch.setattr(filter_stage, "load_policies", lambda ctx, d: FakePolicies())
    work = tmp_path / "work"
    work.mkdir()
    summary = filter_stage.FilterStage().run(ctx, Parts(work, "filter"), {"align": tmp_path / "align", "refine": refine})

    assert summary["candidates"] == 6 and summary["survivors"] == 4 and summary["prompts_covered"] == 2
    assert summary["conflicting_prompts"] == 3 and summary["pairs"] == 4 and summary["rewrites_kept"] == 1
    assert summary["reward_models"] == ["helpful", "harmless"]
    # Weaker original per model: p0 [0, 0], p1 [0, 0], p2 [0, 0]; stronger: p0 [1, 1], p1 [0, 0], p2 [5, 5].
    # Valid candidates (5; c11 is empty): c00, c01, c20, c21 beat both originals everywhere; c10 [0, 5] ties the
    # weaker under model 0. Best min_k margin vs the stronger: c00 min(1, 1) = 1 (c01 0.5, c20 1, c21 0.5).
    m = summary["margins"]
    assert m["beat_weaker_all"] == 4 and m["beat_stronger_all"] == 4 and m["survival_rate"] == pytest.approx(4 / 5)
    assert m["beat_weaker_per_model"] == {"helpful": 4, "harmless": 5}
    assert m["beat_stronger_per_model"] == {"helpful": 4, "harmless": 5}
    assert m["best_margin_vs_stronger"] == pytest.approx(1.0)
    assert json.loads(json.dumps(summary)) == summary  # stage.json stores the summary as JSON
    survives = {(r["pid"], r["weight_index"]): r["survives"] for r in read_jsonl(work / "rewards.jsonl")}
    assert survives == {(0, 0): True, (0, 1): True, (1, 0): False, (1, 1): False, (2, 0): True, (2, 1): True}
    chosen = {s["pid"]: s["chosen"] for s in read_jsonl(work / "survivors.jsonl")}
    assert chosen == {0: "c01", 2: "c21"}
    pairs = [(p["prompt"], p["chosen"], p["rejected"]) for p in read_jsonl(work / "pairs.jsonl")]
    assert pairs == [("p0", "c01", "a0"), ("p0", "c01", "b0"), ("p2", "c21", "a2"), ("p2", "c21", "b2")]


def test_filter_reward_models_include_one_soup_per_weight(tmp_path):
    """K = N policies + |W| soups, named after the objectives and soup0..; built with the exact LoRA soup."""
    from peft import LoraConfig, get_peft_model

    ctx = make_ctx(tmp_path, None, **{"filter.soup_weights": "[0.2, 0.5, 0.9]"})
    base = ctx.load_base()
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, cfg, adapter_name="helpful")
    model.add_adapter("harmless", cfg)
    pol = Policies(model=model, names=["helpful", "harmless"])
    (m, names), labels = filter_stage.FilterStage._reward_models(ctx, pol)
    assert names == labels == ["helpful", "harmless", "soup0", "soup1", "soup2"]
    from sipo_fast.merging import lora_deltas

    d1, d2, soup = lora_deltas(m, "helpful"), lora_deltas(m, "harmless"), lora_deltas(m, "soup1")
    for key in d1:  # soup at [0.5, 0.5]: ΔW = 0.5 ΔW_1 + 0.5 ΔW_2
        torch.testing.assert_close(soup[key], 0.5 * d1[key] + 0.5 * d2[key], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ refine


def _refine_inputs(tmp_path):
    sample = tmp_path / "sample"
    sample.mkdir()
    write_jsonl(sample / "prompts.jsonl", [{"pid": 0, "prompt": "Q0", "response_0": "a", "response_1": "b"},
                                           {"pid": 1, "prompt": "Q1", "response_0": "a", "response_1": "b"}])
    write_jsonl(sample / "candidates.jsonl", [
        {"pid": 0, "weight_index": 0, "weight": [0.3, 0.7], "candidate": "orig00"},
        {"pid": 1, "weight_index": 0, "weight": [0.3, 0.7], "candidate": "orig10"},
        {"pid": 0, "weight_index": 1, "weight": [0.7, 0.3], "candidate": "orig01"},
        {"pid": 1, "weight_index": 1, "weight": [0.7, 0.3], "candidate": "orig11"}])
    return {"align": tmp_path / "align", "sample": sample}


def test_refine_keeps_the_rewrite_unless_the_original_is_at_least_as_good_everywhere(tmp_path, monkeypatch):
    """Rewards (original vs rewrite), N = 2 policies:
    (0, w0): [1, 2] vs [3, 2] -> rewrite kept;  (1, w0): [1, 2] vs [1, 2] tie -> original kept;
    (0, w1): [5, 5] vs [4, 6] -> rewrite kept;  (1, w1): rewrite is empty -> original kept although [9, 9].
    The review runs at the one-hot weight of refine.review_objective (harmless -> [0, 1]), the rewrite at the
    candidate's own weight."""
    ctx = make_ctx(tmp_path, None, **{"refine.review_objective": "harmless"})
    rewrites = {"orig00": "new00", "orig10": "new10", "orig01": "new01", "orig11": ""}
    calls = []

    def fake_generate(ctx, decoder, prompts, weights, **kw):
        calls.append((list(weights), kw.get("template"), prompts))
        if kw.get("template") == "none":  # the review: rendered prompt + opened assistant turn
            return [" Be kinder.\nQuestion: junk"] * len(prompts)
        return [next(new for old, new in rewrites.items() if f"Response: {old}" in p) for p in prompts]

    table = {("Q0", "orig00"): [1, 2], ("Q0", "new00"): [3, 2], ("Q1", "orig10"): [1, 2], ("Q1", "new10"): [1, 2],
             ("Q0", "orig01"): [5, 5], ("Q0", "new01"): [4, 6], ("Q1", "orig11"): [0, 0], ("Q1", ""): [9, 9]}
    monkeypatch.setattr(refine_stage, "generate", fake_generate)
    monkeypatch.setattr(refine_stage, "rewards", table_rewards(table))
    monkeypatch.setattr(refine_stage, "load_policies", lambda ctx, d: FakePolicies())
    work = tmp_path / "work"
    work.mkdir()
    summary = refine_stage.RefineStage().run(ctx, Parts(work, "refine"), _refine_inputs(tmp_path))

    rows = {(r["pid"], r["weight_index"]): r for r in read_jsonl(work / "candidates.jsonl")}
    assert {k: r["rewritten"] for k, r in rows.items()} == {(0, 0): True, (1, 0): False, (0, 1): True, (1, 1): False}
    assert rows[(0, 0)]["candidate"] == "new00" and rows[(1, 0)]["candidate"] == "orig10"
    assert rows[(1, 1)]["candidate"] == "orig11" and rows[(1, 1)]["original"] == "orig11"
    assert rows[(0, 0)]["review"] == "1. Be kinder."  # prefix restored, the model's next "Question:" cut off
    assert summary == {"enabled": True, "candidates": 4, "rewrites_kept": 2, "review_objective": "harmless"}
    reviews = [c for c in calls if c[1] == "none"]
    rewrites_calls = [c for c in calls if c[1] != "none"]
    assert all(c[0] == [0.0, 1.0] for c in reviews)
    assert sorted(c[0] for c in rewrites_calls) == [[0.3, 0.7], [0.7, 0.3]]
    assert all("Question: Q0" in reviews[0][2][0] and reviews[0][2][0].endswith("1.") for _ in [0])
    assert (work / "prompts.jsonl").exists()


def test_refine_disabled_passes_candidates_through(tmp_path):
    ctx = make_ctx(tmp_path, None, **{"refine.enabled": "false"})
    work = tmp_path / "work"
    work.mkdir()
    summary = refine_stage.RefineStage().run(ctx, Parts(work, "refine"), _refine_inputs(tmp_path))
    rows = read_jsonl(work / "candidates.jsonl")
    assert summary == {"enabled": False, "candidates": 4, "rewrites_kept": 0}
    assert [r["candidate"] for r in rows] == ["orig00", "orig10", "orig01", "orig11"]
    assert not any(r["rewritten"] for r in rows)


def test_refine_template_names_are_the_sets():
    """config/sections.py checks refine.template against its list of names; each names a set of the stage's."""
    from sipo_fast.pipeline.config.sections import REFINE_TEMPLATES
    from sipo_fast.pipeline.stages.refine_prompts import TEMPLATE_SETS

    assert tuple(TEMPLATE_SETS) == REFINE_TEMPLATES
    with pytest.raises(ValueError, match="refine.template='nope': choose one of default, sipo-helpsteer"):
        PipelineConfig.from_dict({"refine": {"template": "nope"}})


def test_refine_templates():
    review, rewrite = default_templates(["helpful", "harmless"])
    assert "more helpful and harmless" in review and "{question}" in review and "{review}" in rewrite
    review_cv, _ = default_templates(["correctness", "verbosity"])
    assert "more correct and detailed" in review_cv and "Rayleigh" in review_cv
    prompts = RefinePrompts.for_config(["a", "b"], None, "Q={question} R={response} V={review} {other}")
    # User text with braces or placeholder names stays literal; unknown braces in the template are left alone.
    assert prompts.rewrite_prompt("{review}?", "x {q}", "ok") == "Q={review}? R=x {q} V=ok {other}"
    assert clean_generation("  Better answer.\nQuestion: next one") == "Better answer."


# ------------------------------------------------------------------------------------------------ finetune


def _random_lora(model, name, r, seed):
    from peft import LoraConfig

    torch.manual_seed(seed)
    model.add_adapter(name, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                       init_lora_weights=False))


def test_combined_adapter_reproduces_the_finetuned_policy(tmp_path):
    """π_3 = (W_0 + ΔW_1 merged) + ΔW_3 must equal W_0 + one adapter with ΔW_1 and ΔW_3 concatenated."""
    from peft import PeftModel, get_peft_model, LoraConfig

    ctx = make_ctx(tmp_path, None)
    torch.manual_seed(1)
    stage1 = get_peft_model(ctx.load_base(), LoraConfig(r=4, lora_alpha=1, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    stage1.save_pretrained(tmp_path / "stage1")
    merged = PeftModel.from_pretrained(ctx.load_base(), tmp_path / "stage1").merge_and_unload()
    torch.manual_seed(2)
    stage3 = get_peft_model(merged, LoraConfig(r=4, lora_alpha=1, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"], init_lora_weights=False))
    out = tmp_path / "combined"
    out.mkdir()
    finetune_stage.save_combined(ctx, tmp_path / "stage1", stage3, [{"loss": 1.0, "train_runtime": 3.0}], out)
    combined = PeftModel.from_pretrained(ctx.load_base(), out).eval()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["target_modules"] == sorted(cfg["target_modules"])
    assert json.loads((out / "train_metrics.json").read_text()) == [{"loss": 1.0}]  # timings dropped
    ids = torch.randint(0, 1000, (2, 9))
    with torch.no_grad():
        want = stage3.eval()(input_ids=ids).logits
        got = combined(input_ids=ids).logits
    assert (want - ctx.load_base()(input_ids=ids).logits).abs().max() > 1e-3  # the updates matter
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _align_dir(ctx, tmp_path):
    from peft import get_peft_model, LoraConfig

    align = tmp_path / "align"
    for i, obj in enumerate(["helpful", "harmless"]):
        torch.manual_seed(10 + i)
        m = get_peft_model(ctx.load_base(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
        m.save_pretrained(align / "policies" / obj)
    return align


def test_finetune_trains_each_policy_with_the_sipo_loss(tmp_path, monkeypatch):
    """Each policy trains with the SIPO loss on D_c, its reference log-probs taken from a table computed once
    (the trainer's reference forward never runs): at the first step the policy is its own reference, so the
    DPO part of the loss is exactly log 2 when the table is right."""
    from sipo_fast.training.trainer import FusedDPOTrainer

    def no_forward(self, inputs):
        raise AssertionError("the trainer ran its reference forward")
    monkeypatch.setattr(FusedDPOTrainer, "_ref_logps", no_forward)
    ctx = make_ctx(tmp_path, None, **{"finetune.max_steps": 1, "finetune.learning_rate": 0.01,
                                      "finetune.batch_size": 2, "align.lora_r": 4, "align.lora_alpha": 8,
                                      "align.target_modules": "[q_proj, v_proj]"})
    align = _align_dir(ctx, tmp_path)
    filt = tmp_path / "filter"
    filt.mkdir()
    write_jsonl(filt / "pairs.jsonl", [
        {"pid": 0, "prompt": "Say hi.", "chosen": "Hello there, friend.", "rejected": "Go away."},
        {"pid": 0, "prompt": "Say hi.", "chosen": "Hello there, friend.", "rejected": "No."}])
    work = tmp_path / "work"
    work.mkdir()
    summary = finetune_stage.FinetuneStage().run(ctx, Parts(work, "finetune"), {"align": align, "filter": filt})
    assert summary["pairs"] == 2 and summary["trained"]
    for obj in ("helpful", "harmless"):
        cfg = json.loads((work / "policies" / obj / "adapter_config.json").read_text())
        assert cfg["r"] == 8  # stage-1 rank 4 + stage-3 rank 4
        assert "rewards/" + obj + "/margins" in summary["metrics"][obj]  # TRL's names, per objective
        assert "loss/dpo" in summary["metrics"][obj] and "nll/chosen" in summary["metrics"][obj]
    logs = [json.loads(l) for l in (work / "logs" / "metrics.jsonl").read_text().splitlines()]
    first = [l for l in logs if "loss/dpo" in l]
    assert len(first) == 2 and all(abs(l["loss/dpo"] - math.log(2)) < 1e-3 for l in first), first
    assert {l["objective"] for l in logs} == {"helpful", "harmless"}


def test_finetune_with_empty_dc_keeps_stage1_policies(tmp_path):
    ctx = make_ctx(tmp_path, None)
    align = _align_dir(ctx, tmp_path)
    filt = tmp_path / "filter"
    filt.mkdir()
    write_jsonl(filt / "pairs.jsonl", [])
    work = tmp_path / "work"
    work.mkdir()
    summary = finetune_stage.FinetuneStage().run(ctx, Parts(work, "finetune"), {"align": align, "filter": filt})
    assert summary == {"pairs": 0, "trained": False, "metrics": {"helpful": {}, "harmless": {}}}
    for obj in ("helpful", "harmless"):
        for f in ("adapter_model.safetensors", "adapter_config.json"):
            assert (work / "policies" / obj / f).read_bytes() == (align / "policies" / obj / f).read_bytes()


# ------------------------------------------------------------------------------------------------ holdout


def test_holdout_keeps_stage2_prompts_out_of_stage1(tmp_path, monkeypatch):
    """16 rows, 4 held out (eval_fraction 0.25) -> 12 training rows, half of them conflicting (even i). With
    data.holdout_stage2 and max_conflict_prompts = 3, the first 3 conflicting training rows go to stage 2 only:
    stage 1 keeps 9 rows (3 conflicting), and the sample stage reads its prompts from align/stage2.jsonl."""
    rows = pku_rows(16)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    plain = make_ctx(tmp_path / "a", rows, **{"data.max_conflict_prompts": 3}).split
    ctx = make_ctx(tmp_path / "b", rows, **{"data.max_conflict_prompts": 3, "data.holdout_stage2": "true"})
    split = ctx.split
    assert len(plain["train"]) == 12 and "stage2" not in plain
    assert split["eval"] == plain["eval"]
    assert split["stage2"] == ctx.conflicting(plain["train"])[:3]
    assert len(split["train"]) == 9 and len(ctx.conflicting(split["train"])) == 3
    assert not {r["prompt"] for r in split["stage2"]} & {r["prompt"] for r in split["train"]}
    align = tmp_path / "align"
    align.mkdir()
    write_jsonl(align / "train.jsonl", split["train"])
    write_jsonl(align / "stage2.jsonl", split["stage2"])
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setattr(sample_stage, "load_policies", lambda ctx, d: FakePolicies())
    summary = sample_stage.SampleStage().run(ctx, Parts(work, "sample"), {"align": align})
    assert summary["conflicting_prompts"] == 3 and summary["candidates"] == 6
    assert [r["prompt"] for r in read_jsonl(work / "prompts.jsonl")] == [r["prompt"] for r in split["stage2"]]


def test_holdout_needs_a_count():
    with pytest.raises(ValueError, match="holdout_stage2 needs data.max_conflict_prompts"):
        PipelineConfig.from_dict({"data": {"holdout_stage2": True}})


# ------------------------------------------------------------------------------------------------ fail fast


def test_unknown_objective_names_the_available_ones(tmp_path):
    ctx = make_ctx(tmp_path, pku_rows(8), **{"data.objectives": "[helpful, funny]"})
    with pytest.raises(ValueError, match=r"unknown objective\(s\) \['funny'\].*\['helpful', 'harmless'\]"):
        ctx.validate()


def test_all_agreeing_data_has_nothing_to_improve(tmp_path):
    ctx = make_ctx(tmp_path, pku_rows(8, conflicting=False))
    with pytest.raises(ValueError, match="none of the 6 training pairs is conflicting"):
        ctx.validate()


def test_empty_dataset(tmp_path):
    ctx = make_ctx(tmp_path, [])
    with pytest.raises(ValueError, match="empty file"):
        ctx.validate()


def test_prompt_longer_than_max_length_fails_or_is_dropped(tmp_path):
    rows = pku_rows(8) + pku_rows(1, prompt="word " * 200)
    with pytest.raises(ValueError, match="1 prompt\\(s\\) leave no room for a response.*drop_long_prompts"):
        make_ctx(tmp_path, rows).validate()
    ctx = make_ctx(tmp_path, rows, **{"data.drop_long_prompts": "true"})
    ctx.validate()
    assert all("word word" not in r["prompt"] for r in ctx.split["train"] + ctx.split["eval"])
    assert len(ctx.split["train"]) + len(ctx.split["eval"]) == 8


def test_lengths_beyond_the_model_context(tmp_path):
    with pytest.raises(ValueError, match="exceeds the model's context of 2048"):
        make_ctx(tmp_path, pku_rows(8), **{"align.max_length": 4096}).validate()
    with pytest.raises(ValueError, match="sample.max_new_tokens=2040 exceed the model's context"):
        make_ctx(tmp_path, pku_rows(8), **{"sample.max_new_tokens": 2040}).validate()


def test_policies_with_a_different_tokenizer_are_refused(tmp_path):
    ctx = make_ctx(tmp_path, pku_rows(8))
    tok = ctx.tokenizer
    assert tokenizer_mismatch(tok, tok) is None
    dirs = []
    for i in range(2):
        d = tmp_path / f"policy{i}"
        d.mkdir()
        (d / "adapter_config.json").write_text("{}")
        dirs.append(str(d))
    import copy

    other = copy.deepcopy(tok)
    other.add_tokens(["<extra_token_for_test>"])
    other.save_pretrained(dirs[1])
    ctx = make_ctx(tmp_path, pku_rows(8), **{"align.policies": json.dumps(dirs)})
    with pytest.raises(ValueError, match="tokenizer saved with .*policy1 differs.*vocabulary sizes differ"):
        ctx.validate()
    (tmp_path / "policy1" / "adapter_config.json").unlink()
    for f in (tmp_path / "policy1").iterdir():
        f.unlink()
    ctx = make_ctx(tmp_path, pku_rows(8), **{"align.policies": json.dumps(dirs)})
    with pytest.raises(ValueError, match="mixes LoRA adapters and full models"):
        ctx.validate()


def test_remote_code_is_off_by_default():
    assert preset("beavertails").model.trust_remote_code is False
    assert PipelineConfig().model.trust_remote_code is False


# ------------------------------------------------------------------------------------------------ N > 2


def test_three_objectives_run_every_stage(tmp_path, caplog):
    """N = 3 from a normalised .jsonl, stage 1 adopted from given LoRA policies (no training), explicit
    weight vectors; every stage through the pipeline, evaluation off."""
    import logging

    from peft import LoraConfig, get_peft_model

    from sipo_fast.pipeline.runner import SIPOPipeline

    rows = [{"prompt": f"Tell me about topic {i}.", "response_0": f"Topic {i} is interesting.",
             "response_1": f"No idea about {i}.", "pref_a": i % 2, "pref_b": (i // 2) % 2, "pref_c": 0}
            for i in range(12)]
    data = tmp_path / "three.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base_ctx = make_ctx(tmp_path, None)
    policies = []
    for i, obj in enumerate("abc"):
        torch.manual_seed(20 + i)
        m = get_peft_model(base_ctx.load_base(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
        m.save_pretrained(tmp_path / f"pol_{obj}")
        policies.append(str(tmp_path / f"pol_{obj}"))
    cfg = PipelineConfig.from_dict({
        "model": {"name": "tiny"},
        "data": {"source": str(data), "objectives": ["a", "b", "c"], "eval_fraction": 0.25,
                 "max_conflict_prompts": 3},
        "align": {"policies": policies, "max_length": 96},
        "sample": {"weights": [[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]], "max_new_tokens": 4},
        "refine": {"review_objective": "b", "review_max_new_tokens": 3, "rewrite_max_new_tokens": 4},
        "finetune": {"max_steps": 1, "batch_size": 2},
        "eval": {"enabled": False}})
    with caplog.at_level(logging.INFO, logger="sipo_fast"):
        out = SIPOPipeline(cfg, tmp_path / "run", progress=False).run()
    assert list(out) == ["align", "sample", "refine", "filter", "finetune"]
    assert "eval: disabled" in caplog.text
    run = tmp_path / "run"
    for obj in "abc":  # adopted byte for byte
        assert (run / "align" / "policies" / obj / "adapter_model.safetensors").read_bytes() == \
            (tmp_path / f"pol_{obj}" / "adapter_model.safetensors").read_bytes()
    assert out["sample"]["candidates"] == 2 * out["sample"]["conflicting_prompts"] > 0
    assert out["filter"]["reward_models"] == ["a", "b", "c", "soup0", "soup1"]
    assert out["refine"]["review_objective"] == "b"
    cand = read_jsonl(run / "refine" / "candidates.jsonl")
    assert {tuple(c["weight"]) for c in cand} == {(0.5, 0.25, 0.25), (0.2, 0.3, 0.5)}
    assert all(len(c["rewards_original"]) == 3 for c in cand)
    assert out["finetune"]["pairs"] == out["filter"]["pairs"]


# ------------------------------------------------------------------------------------------------ sample


def test_sample_decodes_all_weights_together_like_one_weight_at_a_time(tmp_path):
    """Greedy sampling decodes W in one batch per `batch_size` prompts (all_weights_parts); its candidates must
    be those of one MOD call per weight (the loop it replaces), and a finished batch part is reused."""
    ctx = make_ctx(tmp_path, pku_rows(12), **{"sample.batch_size": 2, "sample.max_new_tokens": 6,
                                              "sample.weights": "[0.2, 0.5, 0.9]", "data.eval_fraction": 0.0,
                                              "align.select_best": False})
    align = _align_dir(ctx, tmp_path)
    write_jsonl(align / "train.jsonl", ctx.split["train"])
    parts = Parts(tmp_path / "work", "sample")
    summary = sample_stage.SampleStage().run(ctx, parts, {"align": align})
    rows = read_jsonl(parts.path("candidates.jsonl"))
    prompts = read_jsonl(parts.path("prompts.jsonl"))
    assert summary["candidates"] == len(rows) == 3 * len(prompts) and len(prompts) == 6
    assert [(r["pid"], r["weight_index"]) for r in rows] == [(p["pid"], wi) for p in prompts for wi in range(3)]
    assert not parts.path("parts").exists()

    policies = load_policies(ctx, align / "policies")
    decoder = policies.decoder(ctx)
    texts = [p["prompt"] for p in prompts]
    for wi, w in enumerate(ctx.config.sample.weights):
        want = generate(ctx, decoder, texts, w, max_new_tokens=6, batch_size=2)
        assert [r["candidate"] for r in rows if r["weight_index"] == wi] == want
    assert len({r["candidate"] for r in rows}) > 3  # the weights and prompts really differ

    # resume: a finished batch part is read, not decoded again
    from sipo_fast.data.formatting import encode_prompts

    again = Parts(tmp_path / "work2", "sample")  # batch 0: the 2 shortest prompts (the global length sort)
    lengths = [len(x) for x in encode_prompts(ctx.tokenizer, texts, ctx.config.model.template)]
    first = [texts[i] for i in sorted(range(len(texts)), key=lambda i: lengths[i])[:2]]
    write_jsonl(again.path("parts/b0.jsonl"), [{"prompt": t, "weight_index": s, "candidate": f"kept {s}"}
                                               for t in first for s in range(3)])
    sample_stage.SampleStage().run(ctx, again, {"align": align})
    resumed = read_jsonl(again.path("candidates.jsonl"))
    by_prompt = {p["pid"]: p["prompt"] for p in prompts}
    for r, r0 in zip(resumed, rows):
        if by_prompt[r["pid"]] in first:
            assert r["candidate"] == f"kept {r['weight_index']}"
        else:
            assert r["candidate"] == r0["candidate"]
