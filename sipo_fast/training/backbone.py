"""A causal LM seen as backbone + LM head, and the PEFT adapter switches the scoring paths share.

The fused log-prob paths (:mod:`.logprobs`, and :mod:`.shared_prompt`, which runs a shared prompt once) never
ask the model for logits: they take the backbone's output, the exact input of the LM head, and apply the head
inside :func:`sipo_fast.ops.token_logprobs`. This module knows how to get those two pieces from a Hugging Face
model under DDP / accelerate / PEFT wrappers:

- :func:`lm_head_plan`: the head's weight, bias and hidden scale, or None when the head is not a plain linear map;
- :func:`backbone_call` / :func:`final_hidden_states`: one ordinary ``model(...)`` call with a forward hook on the
  backbone capturing its output (so adapters, mixed-adapter batches and gradient checkpointing behave as usual);
- :func:`use_adapter` / :func:`eval_mode`: run a PEFT model with one adapter (``BASE``: adapters disabled) or
  in eval mode, restoring its state afterwards.
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.nn as nn

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed-adapter batch
_warned: set[str] = set()


def warn_once(key: str, msg: str) -> None:
    """One ``UserWarning`` per ``key`` per process (a fallback is worth saying once, not once per batch)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def unwrap(model):
    """The HF ``PreTrainedModel`` under DDP/accelerate wrappers and PEFT."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DataParallel
        model = model.module
    if is_peft(model):
        model = model.get_base_model()
    return model


def lm_head_plan(model) -> tuple[torch.Tensor, torch.Tensor | None, float] | None:
    """``(weight [V,H], bias or None, hidden scale)`` for the fused path, or None when the model needs the plain
    forward (a soft-capped head, an adapter on the head, or an unknown logit multiplier).

    Tied embeddings need nothing special: the head's weight *is* the embedding matrix, so its gradient reaches
    the shared parameter. A Cohere-style ``logit_scale`` s gives logits s·(W h) = W (s·h), so scaling h is exact.
    """
    base = unwrap(model)
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    head = base.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if head is None or type(head) is not nn.Linear or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None  # e.g. a LoRA layer on lm_head, or a quantised head
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        return None  # cap · tanh(z / cap) is not a linear map of h
    for name in ("output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(cfg, name, None) not in (None, 1, 1.0):
            return None  # conventions differ per family (multiply vs divide): use the model's own forward
    scale = getattr(cfg, "logit_scale", None)
    return weight, head.bias, 1.0 if scale is None else float(scale)


def backbone_call(model, **call_kwargs):
    """``(backbone output [B, T, H], the model's output)`` of one ``model(**call_kwargs)`` call: a forward hook
    on the backbone captures the exact input of the LM head."""
    backbone = unwrap(model).base_model
    captured = []
    handle = backbone.register_forward_hook(lambda mod, args, out: captured.append(out[0]))
    try:
        out = model(**call_kwargs)
    finally:
        handle.remove()
    if not captured:
        raise RuntimeError(f"{type(backbone).__name__} (the backbone) did not run during the forward pass")
    return captured[-1], out


def final_hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, **forward_kwargs):
    """[B, T, H] input of the LM head, from a normal ``model(...)`` call that projects only the last position."""
    kw = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs)
    try:
        return backbone_call(model, logits_to_keep=1, **kw)[0]
    except TypeError as exc:
        if "logits_to_keep" not in str(exc):
            raise
        warn_once(f"keep:{type(unwrap(model)).__name__}",
                  f"{type(unwrap(model)).__name__}.forward has no logits_to_keep: its LM head still projects "
                  "every position once (the log-probs themselves stay fused)")
        return backbone_call(model, **kw)[0]


@contextlib.contextmanager
def eval_mode(model):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


@contextlib.contextmanager
def use_adapter(model, name: str | None):
    """Run ``model`` with one adapter active (``BASE``: adapters disabled; None: as it is)."""
    if name is None:
        yield
    elif name == BASE:
        with model.disable_adapter():
            yield
    else:
        prev = model.active_adapter
        model.set_adapter(name)
        try:
            yield
        finally:
            model.set_adapter(prev)
