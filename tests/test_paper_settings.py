"""The paper's settings (issue 15), each against an independent reference: the authors' refinement prompts
against their strings (copied below from github.com/zyttt-coder/SIPO, scripts/SIPO/review.py ``TEMPLATE`` and
scripts/SIPO/rewrite.py ``PROMPT``), the presets' fields, held-out prompt selection and split checks on
hand-made data, the authors' conflict mix by hand arithmetic, stage 1's validation split and stage 3's
best-checkpoint wiring."""
import json
import logging
import math
from pathlib import Path

import pytest

from sipo_fast.data.formatting import format_prompt
from sipo_fast.data.prompts import check_split, heldout_prompts, parse_select, select_prompts
from sipo_fast.pipeline import PipelineConfig, preset
from sipo_fast.pipeline.stages.refine_prompts import RefinePrompts

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# The authors' strings, verbatim ({raw_prompt}, {response}, {review} are their placeholders).
AUTHORS_REVIEW = (
    "BEGINNING OF CONVERSATION: USER: Question: What is the history of shipping and trade in the"
    " Mediterranean region, and how has it changed over time?\nResponse: The Mediterranean region has a"
    " long and rich history of shipping and trade, dating back to ancient times. In the early days, the"
    " region was a hub of trade and commerce, with goods and people traveling between different parts of"
    " the world. Over time, the region has undergone significant changes, with the rise of new powers and"
    " the development of new technologies. Today, the Mediterranean region is still an important center"
    " of trade and commerce, with a diverse range of goods and services being traded between different"
    " countries. However, the region has also faced significant challenges in recent years, including"
    " political instability, economic difficulties, and environmental degradation. These challenges have"
    " led to a decline in shipping and trade in the region, but there are also efforts underway to"
    " revitalize the region's economy and promote sustainable development.\nGenerate three suggestions on"
    " how to make the response more correct and verbose.\nASSISTANT:The response can be more correct and"
    " verbose by\nAdd Specific Examples - Include simple examples of civilizations like the Greeks,"
    " Romans, or Phoenicians to show their role in Mediterranean trade.\nExplain Key Changes Clearly -"
    " Break down major changes in shipping technology and trade methods into clear, easy-to-understand"
    " points.\nClarify Modern Challenges - Use straightforward language to describe current issues such as"
    " political instability and environmental concerns affecting trade.\n\n\nQuestion:"
    " {raw_prompt}\nResponse: {response}\nGenerate three suggestions on how to make the response more"
    " correct and verbose. ASSISTANT:The response can be more correct and verbose by\n"
)

AUTHORS_REWRITE = (
    "BEGINNING OF CONVERSATION: USER: Question: What is the most common use for dill in home"
    " cooking?\nResponse: Dill is a versatile herb that can be used in a variety of dishes to add flavor"
    " and aroma. It is commonly used in Indian, Middle Eastern, and Scandinavian cuisines, and is often"
    " used to flavor soups, stews, and curries. Dill is also used to make pickles, sauces, and marinades,"
    " and is a popular ingredient in many vegetarian and vegan dishes. In addition to its culinary uses,"
    " dill is also known for its medicinal properties, and is often used to treat digestive issues,"
    " respiratory problems, and skin conditions.\nReview: The response can be more correct and verbose"
    " by\nIncluding specific recipes that use dill as a main ingredient or flavor enhancer.\nExplaining the"
    " history and cultural significance of dill in different cuisines.\nDescribing the medicinal"
    " properties of dill and its use in traditional medicine.\nRevise the 'Response' based on the 'Review'"
    " to improve its correctness and verbosity.\nASSISTANT:Dill is a versatile herb widely used in home"
    " cooking for its fresh, slightly tangy flavor and aromatic qualities. One of its most common uses is"
    " in making pickles, where its distinct taste enhances the brine. It is also frequently used in"
    " soups, stews, and sauces, such as the classic Greek tzatziki, Scandinavian gravlax sauce, and"
    " Russian dill-infused borscht. In Middle Eastern and Indian cuisines, dill is often added to rice"
    " dishes, curries, and yogurt-based dips.\nBeyond its culinary applications, dill has a long history"
    " of use in traditional medicine. Ancient Egyptians and Greeks valued it for its digestive benefits,"
    " and it has been used to alleviate bloating, indigestion, and colic. Dill also contains compounds"
    " with antimicrobial and anti-inflammatory properties, making it a natural remedy for respiratory and"
    " skin conditions.\nOverall, dill's unique flavor and health benefits make it a staple in kitchens"
    " worldwide, enhancing both traditional and contemporary dishes. \n\n\nQuestion: {raw_prompt}\nResponse:"
    " {response}\nReview: {review}\nRevise the 'Response' based on the 'Review' to improve its correctness"
    " and verbosity. ASSISTANT:"
)


def _authors_review(q, r):
    return AUTHORS_REVIEW.replace("{raw_prompt}", q).replace("{response}", r)


def _authors_rewrite(q, r, v):
    return AUTHORS_REWRITE.replace("{raw_prompt}", q).replace("{response}", r).replace("{review}", v)


# ------------------------------------------------------------------------------------------ refinement prompts
def test_helpsteer_preset_renders_the_authors_review_and_rewrite_prompts():
    """The helpsteer preset's named template, rendered the way RefineStage renders it (body through model.template,
    then the review's answer prefix), is the authors' string character for character."""
    cfg = preset("helpsteer")
    assert cfg.refine.template == "sipo-helpsteer"
    t = RefinePrompts.for_config(cfg.data.objectives, cfg.refine.review_template, cfg.refine.rewrite_template,
                                 cfg.refine.template)
    q, r = "How do magnets work?", "They just do {really}."
    review_in = format_prompt(None, t.review_prompt(q, r), cfg.model.template) + t.review_prefix
    assert review_in == _authors_review(q, r)
    assert "Generate three suggestions on how to make the response more correct and verbose." in review_in
    assert review_in.endswith("ASSISTANT:The response can be more correct and verbose by\n")
    v = t.review_text("Explaining the forces.\nAdding examples.\nQuestion: something else")
    # the authors keep the prefix and cut at "Question:" (review.py: review.split("Question:")[0].strip())
    assert v == "The response can be more correct and verbose by\nExplaining the forces.\nAdding examples."
    assert format_prompt(None, t.rewrite_prompt(q, r, v), cfg.model.template) == _authors_rewrite(q, r, v)
    assert t.clean("  Better text. Question: next") == "Better text."


def test_default_template_is_unchanged_and_named_sets_are_checked():
    """The project's own set stays the default (numbered suggestions opened with "1.")."""
    t = RefinePrompts.for_config(["helpful", "harmless"], None, None)
    assert t.review_prefix == "1." and "Give two short suggestions" in t.review
    assert t.review_text(" Be kind.\n2. Be brief.\nQuestion: x") == "1. Be kind.\n2. Be brief."
    assert preset("demo").refine.template == "default" and preset("smoke").refine.template == "default"
    with pytest.raises(ValueError, match="sipo-helpsteer"):
        RefinePrompts.for_config(["a", "b"], None, None, "sipo")


def test_cli_config_prints_the_paper_fields(capsys):
    """`sipo-fast config --preset ...` shows the fields the issue's targets name."""
    from sipo_fast.cli import main

    assert main(["config", "--preset", "beavertails"]) == 0
    bt = capsys.readouterr().out
    for line in ("prompt_source: PKU-Alignment/PKU-SafeRLHF-30K", "prompt_split: test", "prompt_select: last:500",
                 "max_conflict_prompts: 2500", "lr_scheduler: cosine", "weight_decay: 0.05"):
        assert line in bt, line
    ft = bt[bt.index("\nfinetune:"):bt.index("\neval:")]
    assert "select_best: true" in ft
    assert main(["config", "--preset", "helpsteer"]) == 0
    hs = capsys.readouterr().out
    assert "template: sipo-helpsteer" in hs and "eval_split: validation" in hs and "conflict_mix: min" in hs


# ------------------------------------------------------------------------------------------ presets
def test_paper_presets_carry_the_authors_caps_splits_and_recipe():
    bt, hs = preset("beavertails"), preset("helpsteer")
    assert (bt.eval.prompt_source, bt.eval.prompt_split, bt.eval.prompt_select) == \
        ("PKU-Alignment/PKU-SafeRLHF-30K", "test", "last:500")
    assert bt.data.max_conflict_prompts == 2500 and bt.finetune.select_best and not bt.refine.enabled
    assert (hs.data.conflict_ratio, hs.data.conflict_mix, hs.data.eval_split) == (0.6, "min", "validation")
    assert hs.finetune.select_best and hs.eval.prompt_split == "validation" and hs.eval.prompt_source is None
    for c in (bt, hs):
        for sec in (c.align, c.finetune):
            assert (sec.lr_scheduler, sec.warmup_ratio, sec.weight_decay, sec.eval_steps) == ("cosine", 0.1, 0.05, 0.25)
    d = PipelineConfig()  # the defaults stay TRL's (linear, no warm-up, no decay) for the demo and custom runs
    assert (d.align.lr_scheduler, d.align.warmup_ratio, d.align.weight_decay) == ("linear", 0.0, 0.0)
    assert not d.finetune.select_best


def test_optimiser_recipe_reaches_the_trainer(tokenizer, tmp_path):
    """The align section's recipe becomes transformers' arguments of the trainer the pipeline builds."""
    from datasets import Dataset

    from sipo_fast.pipeline.context import Context
    from sipo_fast.pipeline.rundir.directory import RunDir
    from sipo_fast.training import FusedDPOTrainer

    cfg = preset("smoke").override(["align.lr_scheduler=cosine", "align.warmup_ratio=0.1", "align.weight_decay=0.05",
                                    "align.max_steps=10"])
    ctx = Context(cfg, RunDir(tmp_path / "run"), progress=False)
    args = cfg.align.trainer_config(output_dir=tmp_path / "o", seed=0, prompt_template="chat", evaluate=False)
    assert (args.lr_scheduler_type, args.warmup_steps, args.weight_decay) == ("cosine", 0.1, 0.05)
    tr = FusedDPOTrainer(ctx.load_base(), None, args, processing_class=tokenizer,
                         train_dataset=Dataset.from_list([{"prompt": "a", "chosen": "b", "rejected": "c"}] * 10))
    tr.create_optimizer_and_scheduler(num_training_steps=10)
    assert tr.args.lr_scheduler_type == "cosine" and tr.args.get_warmup_steps(10) == 1
    assert tr.optimizer.param_groups[0]["weight_decay"] == 0.05
    lrs = [tr.lr_scheduler.lr_lambdas[0](s) for s in (0, 1, 10)]
    assert lrs == pytest.approx([0.0, 1.0, 0.0])  # warm-up from 0 over 1 step, cosine down to 0 at the end


# ------------------------------------------------------------------------------------------ held-out prompts
def test_prompt_selection_by_hand():
    """Rows p0..p5 with p2 repeated: "last:3" takes rows [p3, p2, p5] -> distinct [p3, p2, p5] -> first n."""
    rows = ["p0", "p1", "p2", "p3", "p2", "p5"]
    assert select_prompts(rows, "first", 3) == ["p0", "p1", "p2"]
    assert select_prompts(rows, "last", 2) == ["p3", "p5"]             # distinct: p0 p1 p2 p3 p5
    assert select_prompts(rows, "last:3", 2) == ["p3", "p2"]
    assert select_prompts(rows, "first:2", 5) == ["p0", "p1"]
    assert parse_select("last:500") == ("last", 500) and parse_select("first") == ("first", None)
    for bad in ("last:0", "last:-1", "middle", "first:x"):
        with pytest.raises(ValueError, match="first:N"):
            parse_select(bad)


def test_beavertails_prompts_come_from_the_30k_test_split():
    """The fixture's test split has rows 0..7 ("Tell me about <topic> (i)?"); last:3 are rows 5, 6, 7."""
    got = heldout_prompts(FIXTURES / "pku_saferlhf_30k", 500, split="test", select="last:3")
    assert got == ["Tell me about bikes (5)?", "Tell me about clocks (6)?", "Tell me about owls (7)?"]
    with pytest.raises(ValueError, match="Unknown split|split"):
        heldout_prompts(FIXTURES / "pku_saferlhf_10k", 5, split="test")


def test_split_check_locally_offline_and_when_the_hub_is_unreachable(monkeypatch, caplog):
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):  # another test may have set them
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    check_split(FIXTURES / "pku_saferlhf_30k", "test", "eval.prompt_split")
    with pytest.raises(ValueError, match=r"eval.prompt_split: .* has no split 'test'; its splits are \['train'\]"):
        check_split(FIXTURES / "pku_saferlhf_10k", "test", "eval.prompt_split")
    check_split("demo", "test", "eval.prompt_split")
    import datasets

    from sipo_fast.data import prompts

    def unreachable(name, *a, **k):
        raise ConnectionError("no route to huggingface.co")
    monkeypatch.setattr(prompts, "hub_reachable", lambda: True)  # the host answers, the listing fails
    monkeypatch.setattr(datasets, "get_dataset_split_names", unreachable)
    with caplog.at_level(logging.WARNING, logger="sipo_fast.data"):
        check_split("PKU-Alignment/PKU-SafeRLHF-30K", "test", "eval.prompt_split")  # no error, a note
    assert "not checking" in caplog.text and "skipping" in caplog.text
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, *a, **k: ["train"])
    with pytest.raises(ValueError, match="has no split 'test'"):
        check_split("PKU-Alignment/PKU-SafeRLHF-10K", "test", "eval.prompt_split")
    monkeypatch.setattr(datasets, "get_dataset_split_names", unreachable)
    monkeypatch.setattr(prompts, "hub_reachable", lambda: False)  # no route to the host: not even asked
    check_split("PKU-Alignment/PKU-SafeRLHF-10K", "test", "eval.prompt_split")
    monkeypatch.setattr(prompts, "hub_reachable", lambda: True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline: not even asked
    check_split("PKU-Alignment/PKU-SafeRLHF-10K", "test", "eval.prompt_split")


# ------------------------------------------------------------------------------------------ data mix and splits
def _ctx(tmp_path, **data):
    from sipo_fast.pipeline.context import Context
    from sipo_fast.pipeline.rundir.directory import RunDir

    cfg = PipelineConfig.from_dict({"model": {"name": "tiny"}, "align": {"max_length": 96},
                                    "data": {"objectives": ["correctness", "verbosity"], **data},
                                    "sample": {"max_new_tokens": 4}, "eval": {"enabled": False}})
    return Context(cfg, RunDir(tmp_path / "run"), progress=False)


def test_authors_conflict_mix_by_hand(tmp_path):
    """The fixture's train split: 12 prompts x (2 conflicting + 1 agreeing pair) = 24 conflicting, 12 agreeing.
    "min" (the authors'): T = min(24, 12) = 12, int(12 * 0.6) = 7 conflicting + 5 agreeing = 12 rows.
    "largest": T = min(24 / 0.6, 12 / 0.4) = 30 -> 18 conflicting + 12 agreeing."""
    src = str(FIXTURES / "helpsteer_hub")
    for mix, n_conf, n_all in (("min", 7, 12), ("largest", 18, 30)):
        ctx = _ctx(tmp_path, source=src, conflict_ratio=0.6, conflict_mix=mix, eval_fraction=0.0,
                   eval_split="validation")
        train = ctx.split["train"]
        assert len(train) == n_all and len(ctx.conflicting(train)) == n_conf, mix


def test_authors_pku_split_and_conflict_cap(tmp_path):
    """data.split_method="datasets": the authors' PKUSafeRLHF.py split, reproduced here from the raw fixture with
    datasets' own train_test_split(test_size=0.1, seed=0); stage 2 then takes the first conflicting training
    prompts in that order (their "train_conflict" split, .select(range(eval_size))), capped here at 3."""
    from datasets import load_dataset

    raw = load_dataset("json", data_files=str(FIXTURES / "pku_saferlhf_10k" / "train.jsonl"), split="train")
    ref = raw.train_test_split(test_size=0.1, seed=0)
    ref_conflict = [r["prompt"] for r in ref["train"] if r["better_response_id"] != r["safer_response_id"]]
    ctx = _ctx(tmp_path, source=str(FIXTURES / "pku_saferlhf_10k"), objectives=["helpful", "harmless"],
               split_method="datasets", max_conflict_prompts=3)
    assert [r["prompt"] for r in ctx.split["train"]] == ref["train"]["prompt"]
    assert [r["prompt"] for r in ctx.split["eval"]] == ref["test"]["prompt"]
    assert [r["prompt"] for r in ctx.conflicting(ctx.split["train"])][:3] == ref_conflict[:3]
    shuffled = _ctx(tmp_path, source=str(FIXTURES / "pku_saferlhf_10k"), objectives=["helpful", "harmless"])
    assert [r["prompt"] for r in shuffled.split["eval"]] != ref["test"]["prompt"]  # the default split differs
    assert preset("beavertails").data.split_method == "datasets"
    with pytest.raises(ValueError, match="split_method"):
        PipelineConfig.from_dict({"data": {"split_method": "datasets", "eval_fraction": 0.0},
                                  "align": {"select_best": False}})


def test_stage1_held_out_pairs_from_the_validation_split(tmp_path):
    """data.eval_split: every training row stays in training, the eval rows are the validation split's pairs
    (3 prompts x 3 pairs, prompts "Describe ...")."""
    ctx = _ctx(tmp_path, source=str(FIXTURES / "helpsteer_hub"), eval_fraction=0.0, eval_split="validation")
    assert len(ctx.split["train"]) == 36 and len(ctx.split["eval"]) == 9
    assert all(r["prompt"].startswith("Describe") for r in ctx.split["eval"])
    assert not any(r["prompt"].startswith("Describe") for r in ctx.split["train"])
    bad = _ctx(tmp_path, source=str(FIXTURES / "helpsteer_hub"), eval_fraction=0.0, eval_split="test")
    with pytest.raises(ValueError, match=r"data.eval_split: .* has no split 'test'; its splits are"):
        bad.split
    with pytest.raises(ValueError, match="select_best needs held-out data"):
        PipelineConfig.from_dict({"data": {"eval_fraction": 0.0}})
    PipelineConfig.from_dict({"data": {"eval_fraction": 0.0, "eval_split": "validation"},
                              "finetune": {"select_best": True}})  # a split is held-out data too


def test_finetune_select_best_evaluates_each_objectives_held_out_pairs(tmp_path, monkeypatch):
    """Stage 3 with finetune.select_best: objective k's trainer evaluates on stage 1's held-out pairs oriented by
    k (align/eval.jsonl: helpful prefers response 1, harmless response 0), with the finetune recipe."""
    import test_pipeline_stages as T
    from sipo_fast.pipeline.stages import finetune as finetune_stage
    from sipo_fast.pipeline.rundir.files import write_jsonl
    from sipo_fast.pipeline.rundir.parts import Parts

    ctx = T.make_ctx(tmp_path, None, **{"finetune.max_steps": 2, "finetune.select_best": "true",
                                        "finetune.eval_steps": 1, "finetune.batch_size": 2,
                                        "finetune.lr_scheduler": "cosine", "finetune.weight_decay": 0.05,
                                        "align.lora_r": 4, "align.lora_alpha": 8,
                                        "align.target_modules": "[q_proj, v_proj]"})
    align = T._align_dir(ctx, tmp_path)
    write_jsonl(align / "eval.jsonl", [{"prompt": "Be kind.", "response_0": "Sure, gladly.",
                                        "response_1": "No, you idiot.", "pref_helpful": 1, "pref_harmless": 0}])
    filt = tmp_path / "filter"
    filt.mkdir()
    write_jsonl(filt / "pairs.jsonl", [
        {"pid": 0, "prompt": "Say hi.", "chosen": "Hello there, friend.", "rejected": "Go away."},
        {"pid": 0, "prompt": "Say hi.", "chosen": "Hello there, friend.", "rejected": "No."}])
    calls, real = [], finetune_stage.train
    monkeypatch.setattr(finetune_stage, "train", lambda *a, **k: calls.append(k) or real(*a, **k))
    work = tmp_path / "work"
    work.mkdir()
    summary = finetune_stage.FinetuneStage().run(ctx, Parts(work, "finetune"), {"align": align, "filter": filt})
    keys = ("prompt", "chosen", "rejected")
    assert [[{k: p[k] for k in keys} for p in c["eval_pairs"]] for c in calls] == [
        [{"prompt": "Be kind.", "chosen": "No, you idiot.", "rejected": "Sure, gladly."}],
        [{"prompt": "Be kind.", "chosen": "Sure, gladly.", "rejected": "No, you idiot."}]]
    # π_k's log-probs come with them (stage 3's reference table), finite: the pairs are not dropped
    assert all(math.isfinite(p[col]) for c in calls for p in c["eval_pairs"]
               for col in ("ref_chosen_logps", "ref_rejected_logps"))
    assert all(c["args"].load_best_model_at_end and c["args"].eval_steps == 1 for c in calls)
    assert all((c["args"].lr_scheduler_type, c["args"].warmup_steps, c["args"].weight_decay) == ("cosine", 0.0, 0.05)
               for c in calls)
    for obj in ("helpful", "harmless"):
        assert "eval_loss" in summary["metrics"][obj]  # the held-out loss was measured
        evals = [h for h in json.loads((work / "policies" / obj / "train_metrics.json").read_text()) if "eval_loss" in h]
        assert len(evals) == 2  # once per step (eval_steps=1, max_steps=2): two checkpoints to choose from
