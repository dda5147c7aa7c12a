"""DPO soups: weight-space interpolation of per-objective policies (SIPO.md §4), θ(w) = Σ_i w_i·θ_i.

Three forms:

- :func:`lora_soup` (exact, the default). LoRA policies that share a base differ from it only by their
  updates ΔW_i = s_i·B_i·A_i (s_i = lora_alpha/r, or lora_alpha/√r with rsLoRA), so the soup's update is
  ΔW(w) = Σ_i w_i·s_i·B_i·A_i. A rank-concatenated adapter represents that sum exactly:

      A = [w_1·s_1·A_1; w_2·s_2·A_2; ...]   (rows stacked, rank Σ r_i)
      B = [B_1, B_2, ...]                    (columns stacked)
      B·A = Σ_i B_i·(w_i·s_i·A_i) = ΔW(w)

  which is what PEFT's ``add_weighted_adapter(combination_type="cat")`` builds; we call it and then check
  the one case where its result is off (rsLoRA, where the new adapter's scaling is not 1).
- :func:`lora_soup_ab` (inexact, the authors' released code): A = Σ w_i·A_i and B = Σ w_i·B_i separately,
  so B·A = Σ_i Σ_j w_i·w_j·B_i·A_j, with cross terms. Kept, under its own name, to reproduce their numbers.
- :func:`full_soup`: every floating-point tensor of fully fine-tuned (or adapter-merged) models averaged.

:func:`lora_deltas` returns each module's ΔW = s·B·A of one adapter, the quantity the tests compare.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch


def _check_weights(weights: Sequence[float], n: int, what: str) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != n:
        raise ValueError(f"{what}: {n} models/adapters but {len(weights)} weights; pass one weight per model")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"{what}: weights must be finite numbers, got {weights}")
    return weights


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    for module_name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            yield module_name, module


def _check_adapters(peft_model, adapter_names: Sequence[str], name: str, overwrite: bool, what: str) -> None:
    config = getattr(peft_model, "peft_config", None)
    if config is None:
        raise ValueError(f"{what}: expected a peft.PeftModel with LoRA adapters, got {type(peft_model).__name__}")
    if len(adapter_names) == 0:
        raise ValueError(f"{what}: no adapters given; pass the names of the per-objective LoRA adapters")
    missing = [a for a in adapter_names if a not in config]
    if missing:
        raise ValueError(f"{what}: adapters {missing} are not loaded; the model has {sorted(config)}")
    for a in adapter_names:
        cfg = config[a]
        if getattr(cfg, "peft_type", None) != "LORA":  # PeftType is a str enum
            raise ValueError(f"{what}: adapter {a!r} is {cfg.peft_type}, not LoRA")
        if getattr(cfg, "use_dora", False) or getattr(cfg, "lora_bias", False):
            raise ValueError(f"{what}: adapter {a!r} uses DoRA or a LoRA bias, whose update is not B·A; "
                             "interpolate merged models with full_soup() instead")
    if name in adapter_names:
        raise ValueError(f"{what}: the soup's name {name!r} is one of its inputs; choose a new name")
    if name in config:
        if not overwrite:
            raise ValueError(f"{what}: an adapter named {name!r} already exists; pass overwrite=True or a new name")
        peft_model.delete_adapter(name)


def lora_deltas(peft_model, adapter_name: str) -> dict[str, torch.Tensor]:
    """ΔW = s·B·A of ``adapter_name`` for every LoRA module that carries it: {module name: [out, in]}."""
    if adapter_name not in getattr(peft_model, "peft_config", {}):
        raise ValueError(f"lora_deltas: no adapter named {adapter_name!r}")
    return {n: m.get_delta_weight(adapter_name).detach() for n, m in _lora_layers(peft_model)
            if adapter_name in m.lora_A or adapter_name in getattr(m, "lora_embedding_A", {})}


@torch.no_grad()
def lora_soup(peft_model, adapter_names: Sequence[str], weights: Sequence[float], name: str, *,
              overwrite: bool = False, activate: bool = False) -> str:
    """Add the exact DPO-soup adapter ``name`` with ΔW = Σ_i w_i·s_i·B_i·A_i to ``peft_model``; return ``name``.

    Adapters may differ in rank, alpha and target modules (a module missing from adapter i simply lacks its
    term). The new adapter has rank Σ r_i. Weights are usually on the simplex but need not be.
    ``activate=True`` also makes it the active adapter.
    """
    weights = _check_weights(weights, len(adapter_names), "lora_soup")
    _check_adapters(peft_model, adapter_names, name, overwrite, "lora_soup")
    # PEFT falls back to its "linear" mode for one adapter: A,B·√(w·s) each, still exact for w ≥ 0.
    if len(adapter_names) == 1 and weights[0] < 0:
        raise ValueError("lora_soup: a single adapter needs a weight ≥ 0 (PEFT's one-adapter path takes √w)")
    peft_model.add_weighted_adapter(list(adapter_names), weights, name, combination_type="cat")
    # PEFT writes A and B assuming the new adapter's scaling is 1 (lora_alpha = r); with rsLoRA it is
    # alpha/√r = √r instead, so undo that factor on A to keep B·A·s equal to the intended sum.
    for _, layer in _lora_layers(peft_model):
        if name in layer.lora_A:
            s = layer.scaling[name]
            if s != 1.0:
                layer.lora_A[name].weight.div_(s)
        elif name in getattr(layer, "lora_embedding_A", {}):
            s = layer.scaling[name]
            if s != 1.0:
                layer.lora_embedding_A[name].div_(s)
    if activate:
        peft_model.set_adapter(name)
    return name


@torch.no_grad()
def lora_soup_ab(peft_model, adapter_names: Sequence[str], weights: Sequence[float], name: str, *,
                 overwrite: bool = False, activate: bool = False) -> str:
    """The authors' (inexact) soup: A = Σ w_i·A_i, B = Σ w_i·B_i, same rank, alpha and targets required.

    The resulting update is s·(Σ_i w_i·B_i)(Σ_j w_j·A_j), which equals the exact soup only when a single
    w_i is non-zero (and it is 1). Use :func:`lora_soup` unless reproducing the released code.
    """
    weights = _check_weights(weights, len(adapter_names), "lora_soup_ab")
    _check_adapters(peft_model, adapter_names, name, overwrite, "lora_soup_ab")
    cfgs = [peft_model.peft_config[a] for a in adapter_names]
    shape = {(c.r, c.lora_alpha, getattr(c, "use_rslora", False), str(sorted(c.target_modules))
              if not isinstance(c.target_modules, str) else c.target_modules) for c in cfgs}
    if len(shape) != 1 or any(c.rank_pattern or c.alpha_pattern for c in cfgs):
        raise ValueError("lora_soup_ab: the A/B interpolation needs adapters with the same r, lora_alpha, rsLoRA "
                         "flag and target modules; use lora_soup (exact) for adapters that differ")
    peft_model.add_adapter(name, copy.deepcopy(cfgs[0]))
    for _, layer in _lora_layers(peft_model):
        if name not in layer.lora_A:
            continue
        for target, source in ((layer.lora_A[name].weight, "lora_A"), (layer.lora_B[name].weight, "lora_B")):
            target.copy_(sum(w * getattr(layer, source)[a].weight for a, w in zip(adapter_names, weights)))
    if activate:
        peft_model.set_adapter(name)
    return name


@torch.no_grad()
def full_soup(models: Sequence[torch.nn.Module], weights: Sequence[float], *, into: torch.nn.Module | None = None):
    """θ = Σ_i w_i·θ_i over every floating-point parameter and buffer; returns ``into`` (default: a deep copy
    of ``models[0]``) holding the soup. Integer buffers (e.g. position ids) must agree and are copied.

    For LoRA policies, merge each adapter into its base first (``merge_and_unload``), or use :func:`lora_soup`,
    which needs one base copy instead of N.
    """
    weights = _check_weights(weights, len(models), "full_soup")
    if not models:
        raise ValueError("full_soup: no models given")
    states = [m.state_dict() for m in models]
    keys = list(states[0])
    for i, st in enumerate(states[1:], 1):
        if list(st) != keys:
            diff = sorted(set(st) ^ set(keys))[:5]
            raise ValueError(f"full_soup: model {i} has different tensors from model 0 (e.g. {diff}); "
                             "souping needs models of one architecture")
        bad = [k for k in keys if st[k].shape != states[0][k].shape]
        if bad:
            raise ValueError(f"full_soup: model {i} differs in shape at {bad[:5]}")
    out = into if into is not None else copy.deepcopy(models[0])
    soup = {}
    for k in keys:
        ref = states[0][k]
        if ref.is_floating_point():
            # Accumulate in float32 at least, so bf16 models do not lose the small differences being averaged.
            acc = torch.zeros(ref.shape, dtype=torch.promote_types(ref.dtype, torch.float32), device=ref.device)
            for st, w in zip(states, weights):
                acc.add_(st[k].to(acc.dtype), alpha=w)
            soup[k] = acc.to(ref.dtype)
        else:
            if any(not torch.equal(st[k], ref) for st in states[1:]):
                raise ValueError(f"full_soup: non-float tensor {k!r} differs between models; cannot average it")
            soup[k] = ref
    out.load_state_dict(soup)
    return out
