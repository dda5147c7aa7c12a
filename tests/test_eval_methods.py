"""Sweep generators on a tiny model with two random LoRA adapters: MOD, DPO soups (LoRA and full-weight),
per-weight policies, and determinism of a sampled sweep under a seed."""
import copy

import numpy as np
import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from sipo_fast.decoding import MODDecoder  # noqa: E402
from sipo_fast.eval.cache import TextCache  # noqa: E402
from sipo_fast.eval.methods import cached_generator, mod_generator, per_weight_generator, soup_generator  # noqa: E402
from sipo_fast.eval.sweep import run_eval  # noqa: E402

PROMPTS = ["Tell me a joke.", "How do I bake bread?", "Hi"]
W = np.array([[0.0, 1.0], [0.5, 0.5], [1.0, 0.0]])
KW = dict(max_new_tokens=5, progress=False)


@pytest.fixture(scope="module")
def two_adapters(tiny_llama):
    """A PeftModel with adapters "helpful" and "harmless", random A and B with a large scale, so the two
    policies' greedy outputs differ."""
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=64, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(tiny_llama), cfg, adapter_name="helpful")
    model.add_adapter("harmless", cfg)
    return model.eval()


class Len:
    name, higher_is_better = "len", True

    def score(self, prompts, responses):
        return torch.tensor([float(len(r)) for r in responses])


class Vowels:
    name, higher_is_better = "vowels", False

    def score(self, prompts, responses):
        return torch.tensor([float(sum(c in "aeiou" for c in r)) for r in responses])


def test_mod_generator_matches_one_call_per_weight(two_adapters, tokenizer):
    dec = MODDecoder(two_adapters, tokenizer, adapter_names=["helpful", "harmless"])
    out = mod_generator(dec, **KW)(PROMPTS, W)
    assert len(out) == 3 and all(len(row) == 3 for row in out)
    for i, w in enumerate(W):
        single = [o.text for o in dec.generate_text(PROMPTS, weights=w.tolist(), **KW)]
        assert out[i] == single
    assert out[0] != out[2]  # the two policies disagree, so the sweep is not trivially constant


def test_soups_at_one_hot_weights_are_the_policies(two_adapters, tokenizer):
    """θ(w) at w = (1,0) is policy 1 itself, so its greedy text equals MOD's at (1,0); same at (0,1)."""
    dec = MODDecoder(two_adapters, tokenizer, adapter_names=["helpful", "harmless"])
    mod = mod_generator(dec, **KW)(PROMPTS, W)
    for exact in (True, False):
        soup = soup_generator(two_adapters, tokenizer, adapter_names=["helpful", "harmless"], exact=exact, **KW)(PROMPTS, W)
        assert soup[0] == mod[0] and soup[2] == mod[2]
    assert list(two_adapters.peft_config) == ["helpful", "harmless"]  # the temporary soup adapter is gone


def test_lora_soup_generator_matches_full_weight_soup(two_adapters, tokenizer):
    """Exact LoRA soup at w = (0.5, 0.5) and the full-weight soup of the two merged models are the same
    model, so greedy decoding gives the same texts."""
    merged = []
    for name in ("helpful", "harmless"):
        m = copy.deepcopy(two_adapters)
        m.set_adapter(name)
        merged.append(m.merge_and_unload().eval())
    w = W[1:2]
    lora = soup_generator(two_adapters, tokenizer, adapter_names=["helpful", "harmless"], **KW)(PROMPTS, w)
    full = soup_generator(merged, tokenizer, **KW)(PROMPTS, w)
    assert lora == full
    with pytest.raises(ValueError, match="LoRA adapters only"):
        soup_generator(merged, tokenizer, exact=False, **KW)


def test_per_weight_generator(two_adapters, tokenizer):
    dec = MODDecoder(two_adapters, tokenizer, adapter_names=["helpful", "harmless"])
    mod = mod_generator(dec, **KW)(PROMPTS, W[[0, 2]])
    gen = per_weight_generator([(two_adapters, "harmless"), (two_adapters, "helpful")], tokenizer, **KW)
    assert gen(PROMPTS, W[[0, 2]]) == mod  # w=(0,1) is the harmless policy alone, w=(1,0) the helpful one
    with pytest.raises(ValueError, match="one policy per weight"):
        gen(PROMPTS, W)
    asked = []
    lazy = per_weight_generator(lambda w: asked.append(w) or (two_adapters, "helpful" if w[0] == 1 else "harmless"),
                                tokenizer, **KW)
    assert lazy(PROMPTS, W[[0, 2]]) == mod and asked == [[0.0, 1.0], [1.0, 0.0]]


def test_cached_generator_decodes_only_what_is_missing():
    calls = []

    def gen(prompts, weights, seed=None):
        calls.append(np.asarray(weights).tolist())
        return [[f"{w[0]}:{p}" for p in prompts] for w in weights]

    cache = TextCache()
    g = cached_generator(gen, cache, ["a", None, "b"])
    first = g(["p", "q"], W)
    assert first == [["0.0:p", "0.0:q"], ["0.5:p", "0.5:q"], ["1.0:p", "1.0:q"]] and calls == [W.tolist()]
    again = g(["p", "q"], W)
    assert again == first and calls[-1] == [[0.5, 0.5]]          # only the uncached (None-key) weight
    other = cached_generator(gen, cache, ["b", "c", "a"])         # another method sharing models a and b
    assert other(["p", "q"], W)[0] == first[2] and calls[-1] == [[0.5, 0.5]]
    assert other(["p", "r"], W) and calls[-1] == W.tolist()       # a new prompt: every row is decoded
    with pytest.raises(ValueError, match="keys"):
        g(["p"], W[:2])


def test_sampled_sweep_is_deterministic_under_a_seed(two_adapters, tokenizer):
    dec = MODDecoder(two_adapters, tokenizer, adapter_names=["helpful", "harmless"])
    gen = mod_generator(dec, do_sample=True, temperature=1.5, **KW)
    a = run_eval(gen, PROMPTS, [Len(), Vowels()], W, "mod", seed=1)
    b = run_eval(gen, PROMPTS, [Len(), Vowels()], W, "mod", seed=1)
    c = run_eval(gen, PROMPTS, [Len(), Vowels()], W, "mod", seed=2)
    assert a.responses == b.responses and np.array_equal(a.scores, b.scores)
    assert a.responses != c.responses
    # costs are negated in the points: vowels (lower is better) become ≤ 0
    assert (a.points[:, 1] <= 0).all() and (a.scores[..., 1] >= 0).all()


def test_methods_decode_with_their_own_settings_not_the_models_generation_config(tokenizer):
    """A policy whose generation_config samples with a repetition penalty (as many hub checkpoints ship) still
    decodes greedily in a sweep: every method of one comparison decodes the same way."""
    from sipo_fast.models import tiny

    models = [tiny("llama", tokenizer=tokenizer, seed=s)[0] for s in (0, 1)]
    want = mod_generator(MODDecoder(models, tokenizer), **KW)(PROMPTS, W)
    cfg = models[0].generation_config
    cfg.do_sample, cfg.temperature, cfg.repetition_penalty = True, 1.5, 0.5
    assert mod_generator(MODDecoder(models, tokenizer), **KW)(PROMPTS, W) == want
    sampled = MODDecoder(models, tokenizer).generate_text(PROMPTS, weights=[0.5, 0.5], max_new_tokens=5, seed=0,
                                                          progress=False)
    assert [o.text for o in sampled] != want[1]  # the same decoder call without the sweep's settings does sample
