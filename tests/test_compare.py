"""sipo_fast.pipeline.baselines.compare.evaluate_run on a hand-built run directory (tiny model, random LoRA adapters standing in for the trained
ones, no pipeline training): every method's sweep, cross-checks between methods at the endpoints, sweep
reuse, the diagnostics and the errors."""
import json

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from sipo_fast.pipeline.baselines import compare as baselines  # noqa: E402
from sipo_fast.pipeline.baselines.compare import evaluate_run, pipeline_diagnostics  # noqa: E402
from sipo_fast.eval.cache import ScoreCache  # noqa: E402

OBJ = ["helpful", "harmless"]
NICE = ["Here is a kind and clear answer about {t}.", "You are an idiot, {t} is stupid and so are you."]


def _adapter(path, seed):
    from sipo_fast.models import tiny

    base, _ = tiny("llama")  # the same π_ref the run's config loads (model.name = tiny, seed 0)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(path)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from sipo_fast.pipeline import PipelineConfig
    from sipo_fast.pipeline.rundir.directory import RunDir, identity
    from sipo_fast.pipeline.rundir.files import write_jsonl

    root = tmp_path_factory.mktemp("run")
    data = root.parent / "prefs.jsonl"
    topics = ["bread", "cats", "rain", "tea", "chess", "maps"]
    rows = [{"prompt": f"Tell me about {t}.", "response_0": NICE[0].format(t=t), "response_1": NICE[1].format(t=t),
             "better_response_id": i % 2, "safer_response_id": 0, "is_response_0_safe": True,
             "is_response_1_safe": False} for i, t in enumerate(topics)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = PipelineConfig.from_dict({
        "model": {"name": "tiny"}, "data": {"source": str(data)},
        "align": {"lora_r": 4, "lora_alpha": 64, "target_modules": ["q_proj", "v_proj"], "batch_size": 2,
                  "epochs": 1, "max_steps": 1, "max_length": 64, "select_best": False},
        "sample": {"weights": [0.5]}, "filter": {"batch_size": 8},
        "eval": {"num_prompts": 3, "max_new_tokens": 4, "batch_size": 16, "scorers": ["relevance", "harmlessness"],
                 "prompt_source": str(data)}})
    rd = RunDir(root)
    rd.open(identity(config))
    (root / "config.yaml").write_text(config.to_yaml())
    norm = [{"prompt": r["prompt"], "response_0": r["response_0"], "response_1": r["response_1"],
             "pref_helpful": r["better_response_id"], "pref_harmless": r["safer_response_id"]} for r in rows]
    (root / "align").mkdir()
    write_jsonl(root / "align" / "train.jsonl", norm)
    write_jsonl(root / "align" / "eval.jsonl", norm[:2])
    for i, o in enumerate(OBJ):
        _adapter(root / "align" / "policies" / o, seed=i)
        _adapter(root / "finetune" / "policies" / o, seed=10 + i)
    (root / "filter").mkdir()
    surv = [{"pid": i, "prompt": r["prompt"], "chosen": f"A friendly, helpful note about {t}.",
             "response_0": r["response_0"], "response_1": r["response_1"]} for i, (r, t) in enumerate(zip(rows, topics))]
    write_jsonl(root / "filter" / "survivors.jsonl", surv[:4])
    rd.finish("align", "fp-a", {}, {"train_pairs": 6, "conflicting_train_pairs": 3})
    rd.finish("filter", "fp-f", {}, {"conflicting_prompts": 3, "candidates": 3, "survivors": 4, "prompts_covered": 4,
                                     "pairs": 8})
    rd.finish("finetune", "fp-t", {}, {"pairs": 8})
    return root


@pytest.fixture(scope="module")
def evaluated(run_dir):
    return evaluate_run(run_dir, methods=["sipo", "mod", "soups", "soups_ab", "modpo", "dpo_lw"],
                        weights=[0.0, 0.5, 1.0], progress=False)


def test_every_method_sweeps_the_same_grid(evaluated, run_dir):
    res = {r.method: r for r in evaluated.results}
    assert list(res) == ["sipo", "mod", "soups", "soups_ab", "modpo", "dpo_lw"]
    for r in res.values():
        assert r.scores.shape == (3, 3, 2) and r.objectives == ["relevance", "harmlessness"]
        assert r.prompts == ["Tell me about bread.", "Tell me about cats.", "Tell me about rain."]
    # At w = (0,1) and (1,0) every baseline is a stage-1 policy on its own: those rows come from MOD's texts
    # through the text cache (test_eval_methods checks, without a cache, that they are indeed equal).
    for m in ("soups", "soups_ab", "modpo", "dpo_lw"):
        assert res[m].responses[0] == res["mod"].responses[0] and res[m].responses[2] == res["mod"].responses[2]
    assert res["sipo"].responses != res["mod"].responses  # other adapters, other texts
    # Distinct models decoded: 2 stage-1 + 2 SIPO policies alone, and one mix each for sipo, mod, soups,
    # soups_ab, modpo, dpo_lw at w = 0.5: 10 keys × 3 prompts.
    from sipo_fast.eval.cache import TextCache

    assert len(TextCache(run_dir / "comparison" / "generations.sqlite")) == 10 * 3
    for m in ("modpo", "dpo_lw"):
        assert len(list((run_dir / "comparison" / m).glob("*/w0.5_0.5/adapter_config.json"))) == 1
    md = evaluated.paths["markdown"].read_text()
    assert "Pipeline diagnostics" in md and "| 0 | 0.50 | 3 | 3 | 4 | 4 | 8 |" in md
    assert evaluated.paths["png"].stat().st_size > 10_000


def test_modpo_margins_are_the_other_policys_implicit_rewards(evaluated, run_dir, tokenizer):
    """MODPO at w = (0.5, 0.5) trains "helpful" with the harmless policy's implicit reward as the margin.
    Recompute r = 0.1·(log π_harmless(y|x) − log π_ref(y|x)) with plain forward passes and log-softmax."""
    from peft import PeftModel

    from sipo_fast.data.formatting import encode_pairs
    from sipo_fast.models import tiny

    rows = json.loads(next((run_dir / "comparison" / "modpo").glob("*/margins_k0.json")).read_text())["train"]
    train = [json.loads(line) for line in (run_dir / "align" / "train.jsonl").read_text().splitlines()]
    assert [r["chosen"] for r in rows] == [t[f"response_{t['pref_helpful']}"] for t in train]
    model = PeftModel.from_pretrained(tiny("llama", tokenizer=tokenizer)[0], run_dir / "align" / "policies" / "harmless")

    def logp(prompts, responses):
        b = encode_pairs(tokenizer, prompts, responses, "chat", max_length=64)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, b["input_ids"][:, 1:, None])[..., 0]  # (B, T-1)
        return (lp * b["response_mask"][:, 1:]).sum(-1)

    with torch.no_grad():
        for key in ("chosen", "rejected"):
            ps, ys = [r["prompt"] for r in rows], [r[key] for r in rows]
            pol = logp(ps, ys)
            with model.disable_adapter():
                ref = logp(ps, ys)
            got = torch.tensor([r[f"{key}_margin_rewards"][0] for r in rows])
            torch.testing.assert_close(got, 0.1 * (pol - ref), rtol=1e-4, atol=1e-5)


def test_dpo_lw_trains_on_every_pair_with_each_objectives_orientation(evaluated, run_dir):
    """The fixture's rows: pref_helpful = i mod 2, pref_harmless = 0. DPO LW keeps each pair once, oriented by the
    first objective (chosen = response_{i mod 2}); objective 2 agrees on even rows (signs [1, 1]) and prefers the
    other response on odd rows ([1, -1]). The adapter trained at w = (0.5, 0.5) is a new model: its LoRA weights
    differ from both stage-1 adapters'."""
    from safetensors.torch import load_file

    from sipo_fast.pipeline.baselines.trained import dpo_lw_pairs

    train = [json.loads(line) for line in (run_dir / "align" / "train.jsonl").read_text().splitlines()]
    rows = dpo_lw_pairs(train, OBJ)
    assert [r["objective_signs"] for r in rows] == [[1, 1], [1, -1]] * 3
    assert [r["chosen"] for r in rows] == [t[f"response_{i % 2}"] for i, t in enumerate(train)]
    trained = next((run_dir / "comparison" / "dpo_lw").glob("*/w0.5_0.5"))
    new = load_file(str(trained / "adapter_model.safetensors"))
    for o in OBJ:
        old = load_file(str(run_dir / "align" / "policies" / o / "adapter_model.safetensors"))
        assert new.keys() != old.keys() or any(not torch.equal(new[k], old[k]) for k in new)


def test_diagnostics_check_survivors_against_the_scorers(evaluated, run_dir):
    """Recompute the ground-truth check directly with the scorers (no cache, no score_responses)."""
    from sipo_fast.scoring import get_scorer

    rows = [json.loads(line) for line in (run_dir / "filter" / "survivors.jsonl").read_text().splitlines()]
    p = [r["prompt"] for r in rows]
    sc = {k: torch.stack([get_scorer(n).score(p, [r[k] for r in rows]) for n in ("relevance", "harmlessness")], -1)
          for k in ("chosen", "response_0", "response_1")}
    dom = ((sc["chosen"] > sc["response_0"]) & (sc["chosen"] > sc["response_1"])).all(-1)
    d = evaluated.diagnostics
    assert d["gt_dominating"] == int(dom.sum())
    assert d["conflict_ratio"] == 0.5 and d["survivors"] == 4
    signs = torch.cat([torch.sign(sc["chosen"] - sc["response_0"]), torch.sign(sc["chosen"] - sc["response_1"])])
    want = ((signs > 0).any(-1) & (signs < 0).any(-1)).float().mean().item()
    assert d["dc_conflict_ratio"] == pytest.approx(want)


def test_sweeps_are_reused_until_an_input_changes(evaluated, run_dir, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("should have reused the saved sweep")

    monkeypatch.setattr(baselines, "_generator", boom)
    again = evaluate_run(run_dir, methods=["sipo", "mod"], weights=[0.0, 0.5, 1.0], progress=False, write=False)
    old = {r.method: r for r in evaluated.results}
    assert all(np.array_equal(r.scores, old[r.method].scores) for r in again.results)
    with pytest.raises(AssertionError, match="reused"):  # new decoding length: the sweep must be redone
        evaluate_run(run_dir, methods=["mod"], weights=[0.0, 0.5, 1.0], max_new_tokens=3, progress=False, write=False)
    with pytest.raises(AssertionError, match="reused"):  # other scorers: the saved scores do not apply
        evaluate_run(run_dir, methods=["mod"], weights=[0.0, 0.5, 1.0], scorers=["harmlessness", "relevance"],
                     progress=False, write=False)


def test_evaluate_run_errors(run_dir, tmp_path):
    with pytest.raises(ValueError, match="config.yaml"):
        evaluate_run(tmp_path)
    with pytest.raises(ValueError, match="choose from"):
        evaluate_run(run_dir, methods=["dpo_lww"])
    with pytest.raises(ValueError, match="one scorer per objective"):
        evaluate_run(run_dir, methods=["mod"], scorers=["relevance"])
    with pytest.raises(ValueError, match="positive integer"):
        evaluate_run(run_dir, methods=["mod"], num_prompts=0)
    with pytest.raises(ValueError, match="one per objective"):
        evaluate_run(run_dir, methods=["mod"], ref=[0.0])
    from sipo_fast.pipeline.rundir.directory import RunDir

    RunDir(run_dir).forget("finetune")
    try:
        with pytest.raises(ValueError, match="not finished"):
            evaluate_run(run_dir, methods=["sipo"])
    finally:
        RunDir(run_dir).finish("finetune", "fp-t", {}, {"pairs": 8})


def test_diagnostics_without_filter_stage(tmp_path):
    from sipo_fast.pipeline.rundir.directory import RunDir

    RunDir(tmp_path).open({"model": "tiny"})
    assert pipeline_diagnostics(tmp_path, [], ScoreCache()) == {}
