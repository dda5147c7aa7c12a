"""DPO soups (sipo_fast.merging): the exact LoRA soup against ΔW arithmetic and against a full-weight soup
of merged models, the authors' A/B interpolation against its own formula, and input validation."""
import copy

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

from sipo_fast.merging import full_soup, lora_deltas, lora_soup, lora_soup_ab  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _peft_two(tiny_llama, *, r=(4, 8), alpha=(8, 2), rslora=False, targets=(TARGETS, TARGETS), seed=0):
    """A PeftModel with adapters "pa" and "pb" whose A and B are both random (init_lora_weights=False), so every
    ΔW = s·B·A is non-zero and the two differ."""
    torch.manual_seed(seed)
    base = copy.deepcopy(tiny_llama)
    cfg = lambda i: LoraConfig(r=r[i], lora_alpha=alpha[i], target_modules=list(targets[i]), lora_dropout=0.0,  # noqa: E731
                               init_lora_weights=False, use_rslora=rslora)
    model = get_peft_model(base, cfg(0), adapter_name="pa")
    model.add_adapter("pb", cfg(1))
    return model.eval()


def _expected(model, names, weights):
    da = [lora_deltas(model, n) for n in names]
    keys = set().union(*da)
    return {k: sum(w * d[k] for w, d in zip(weights, da) if k in d) for k in keys}


@pytest.mark.parametrize("weights", [(0.3, 0.7), (0.0, 1.0), (1.0, 0.0), (0.5, 0.5), (1.5, -0.5)])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_soup_equals_weighted_delta_sum(tiny_llama, weights, rslora):
    model = _peft_two(tiny_llama, rslora=rslora)
    lora_soup(model, ["pa", "pb"], weights, "soup")
    got, want = lora_deltas(model, "soup"), _expected(model, ["pa", "pb"], weights)
    assert set(got) == set(want) and len(got) == 2 * len(TARGETS)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
    assert model.peft_config["soup"].r == 12  # ranks concatenate


def test_lora_soup_with_different_target_modules(tiny_llama):
    """Adapter a adapts q/v only, b adapts q/k/v/o: modules that a lacks get b's term alone."""
    model = _peft_two(tiny_llama, targets=(["q_proj", "v_proj"], TARGETS))
    lora_soup(model, ["pa", "pb"], [0.25, 0.75], "soup")
    got, want = lora_deltas(model, "soup"), _expected(model, ["pa", "pb"], [0.25, 0.75])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


def test_lora_soup_logits_match_full_soup_of_merged_models(tiny_llama, tokenizer):
    """With Σw = 1, base + Σ w_i ΔW_i = Σ w_i (base + ΔW_i): the adapter soup and the full-weight soup of the
    two merged models must give the same logits. Two independent routes to the same model."""
    model = _peft_two(tiny_llama)
    w = [0.35, 0.65]
    merged = []
    for name in ("pa", "pb"):
        m = copy.deepcopy(model)
        m.set_adapter(name)
        merged.append(m.merge_and_unload())
    soup_full = full_soup(merged, w)
    lora_soup(model, ["pa", "pb"], w, "soup", activate=True)
    ids = tokenizer(["Tell me a story about a cat.", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        got = model(**ids).logits
        want = soup_full(**ids).logits
        other = merged[0](**ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - other).abs().max() > 1e-3  # the soup is not just one of its inputs


def test_lora_soup_single_adapter_and_overwrite(tiny_llama):
    model = _peft_two(tiny_llama)
    lora_soup(model, ["pb"], [0.4], "half_b")
    for k, d in lora_deltas(model, "pb").items():
        torch.testing.assert_close(lora_deltas(model, "half_b")[k], 0.4 * d, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="already exists"):
        lora_soup(model, ["pa", "pb"], [0.5, 0.5], "half_b")
    lora_soup(model, ["pa", "pb"], [0.5, 0.5], "half_b", overwrite=True)
    want = _expected(model, ["pa", "pb"], [0.5, 0.5])
    for k, d in lora_deltas(model, "half_b").items():
        torch.testing.assert_close(d, want[k], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="weight ≥ 0"):
        lora_soup(model, ["pa"], [-1.0], "neg")


def test_lora_soup_ab_is_the_authors_formula_and_inexact(tiny_llama):
    model = _peft_two(tiny_llama, r=(4, 4), alpha=(8, 8))
    w = [0.3, 0.7]
    lora_soup_ab(model, ["pa", "pb"], w, "ab")
    lora_soup(model, ["pa", "pb"], w, "exact")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    A = w[0] * layer.lora_A["pa"].weight + w[1] * layer.lora_A["pb"].weight
    B = w[0] * layer.lora_B["pa"].weight + w[1] * layer.lora_B["pb"].weight
    key = [k for k in lora_deltas(model, "ab") if k.endswith("layers.0.self_attn.q_proj")][0]
    torch.testing.assert_close(lora_deltas(model, "ab")[key], (8 / 4) * B @ A, rtol=1e-5, atol=1e-6)
    assert (lora_deltas(model, "ab")[key] - lora_deltas(model, "exact")[key]).abs().max() > 1e-3
    # At a one-hot weight the A/B soup is exact: it is the adapter itself.
    lora_soup_ab(model, ["pa", "pb"], [1.0, 0.0], "onehot")
    torch.testing.assert_close(lora_deltas(model, "onehot")[key], lora_deltas(model, "pa")[key])


def test_lora_soup_ab_rejects_mismatched_ranks(tiny_llama):
    model = _peft_two(tiny_llama, r=(4, 8))
    with pytest.raises(ValueError, match="same r"):
        lora_soup_ab(model, ["pa", "pb"], [0.5, 0.5], "ab")


@pytest.mark.parametrize("args, match", [
    ((["pa", "zz"], [0.5, 0.5], "s"), "not loaded"),
    ((["pa", "pb"], [1.0], "s"), "one weight per"),
    ((["pa", "pb"], [float("nan"), 1.0], "s"), "finite"),
    (([], [], "s"), "no adapters"),
    ((["pa", "pb"], [0.5, 0.5], "pa"), "one of its inputs"),
])
def test_lora_soup_bad_input(tiny_llama, args, match):
    model = _peft_two(tiny_llama)
    n_before = len(model.peft_config)
    with pytest.raises(ValueError, match=match):
        lora_soup(model, *args)
    assert len(model.peft_config) == n_before  # rejected before any adapter was added


def test_lora_soup_rejects_dora_and_plain_models(tiny_llama):
    base = copy.deepcopy(tiny_llama)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True), adapter_name="pa")
    model.add_adapter("pb", LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="DoRA"):
        lora_soup(model, ["pa", "pb"], [0.5, 0.5], "s")
    with pytest.raises(ValueError, match="PeftModel"):
        lora_soup(tiny_llama, ["pa"], [1.0], "s")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_soup_interpolates_every_float_tensor(dtype):
    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.LayerNorm(3)).to(dtype) for _ in range(3)]
    for m in models:
        m.register_buffer("steps", torch.arange(4))
    w = [0.2, 0.5, 0.3]
    soup = full_soup(models, w)
    for k, v in soup.state_dict().items():
        if v.is_floating_point():
            want = sum(wi * m.state_dict()[k].double() for wi, m in zip(w, models)).to(dtype)
            torch.testing.assert_close(v, want, rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-2)
        else:
            assert torch.equal(v, models[0].state_dict()[k])
    assert soup is not models[0]
    # endpoints: the soup at a one-hot weight is that model
    one = full_soup(models, [0.0, 1.0, 0.0])
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), models[1].state_dict().values()))


def test_full_soup_bad_input():
    a, b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 3)
    with pytest.raises(ValueError, match="differs in shape"):
        full_soup([a, b], [0.5, 0.5])
    with pytest.raises(ValueError, match="one weight per"):
        full_soup([a, a], [1.0])
    c, d = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    c.register_buffer("n", torch.tensor(1))
    d.register_buffer("n", torch.tensor(2))
    with pytest.raises(ValueError, match="non-float"):
        full_soup([c, d], [0.5, 0.5])
