"""Sequence log-likelihoods and implicit rewards from a model's final hidden states and LM head, through the
fused :func:`sipo_fast.ops.token_logprobs` (no [B, T, V] logits).

    log π(y|x) = Σ_{t : response_mask[t] = 1} log softmax(logits_{t-1})[input_ids[t]]     (SIPO.md §2)
    r_k(x, y)  = β · (log π_k(y|x) - log π_ref(y|x))

How the hidden states are obtained: the model is called as usual (so PEFT adapters, mixed-adapter batches,
DDP wrappers and gradient checkpointing all behave as in a normal forward) with ``logits_to_keep=1``, which
makes the LM head project only the last position, while a forward hook on the backbone captures its output,
the exact input of the LM head. The fused op then scores every response position from it.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from sipo_fast.ops.backend import canonical
from sipo_fast.ops.logprobs import token_logprobs

from .backbone import BASE, eval_mode, final_hidden_states, is_peft, lm_head_plan, unwrap, use_adapter, warn_once


def _shifted_labels(input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """[B, T-1] labels: token t is scored from position t-1; non-response tokens become -100."""
    return input_ids[:, 1:].masked_fill(response_mask[:, 1:] == 0, -100)


def _validate_batch(input_ids, attention_mask, response_mask) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    for name, t in (("attention_mask", attention_mask), ("response_mask", response_mask)):
        if not isinstance(t, torch.Tensor) or t.shape != input_ids.shape:
            raise ValueError(f"{name} must be a tensor shaped like input_ids {tuple(input_ids.shape)}, "
                             f"got {getattr(t, 'shape', type(t))}")
    if input_ids.shape[1] < 2:
        raise ValueError("sequences need at least 2 tokens (a prompt token and a response token)")
    if bool(((response_mask != 0) & (attention_mask == 0)).any()):
        raise ValueError("response_mask marks padding positions (attention_mask == 0); build batches with "
                         "sipo_fast.data.formatting.encode_pairs")


def sequence_logprobs_ref(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          response_mask: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Naive reference: full float32 logits from ``model(...)``, ``log_softmax``, gather, masked sum. [B]."""
    _validate_batch(input_ids, attention_mask, response_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **forward_kwargs).logits
    logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V)
    labels = _shifted_labels(input_ids, response_mask)
    tok = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T-1)
    return tok.masked_fill(labels == -100, 0.0).sum(-1)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor,
                      *, chunk_size: int | None = None, backend: str | None = None, **forward_kwargs) -> torch.Tensor:
    """log π(y|x) for each row: Σ over response tokens t of log softmax(logits_{t-1})[input_ids[t]]. Returns [B]
    float32 (float64 for a float64 model), differentiable w.r.t. the model's parameters.

    The logits at position t-1 score token t; prompt and padding are excluded and the EOS that ends the
    response is included (``response_mask`` from ``encode_pairs`` covers it). A response token at position 0
    has no context and is not scored. Models whose logits are soft-capped or scaled in an unknown way fall back
    to the plain full-logits forward (:func:`sequence_logprobs_ref`, whatever ``backend`` says), with one warning.
    ``backend`` is :func:`sipo_fast.ops.token_logprobs`'s (None/"auto", "triton", "cpu", "ref"); it is checked
    here, so a bad name fails on those models too. Extra ``forward_kwargs`` go to ``model(...)``.
    """
    _validate_batch(input_ids, attention_mask, response_mask)
    canonical(backend, "sequence_logprobs")
    plan = lm_head_plan(model)
    if plan is None:
        warn_once(f"fallback:{type(unwrap(model)).__name__}",
                   f"{type(unwrap(model)).__name__}: its LM head is soft-capped, scaled in a model-specific way or "
                   "adapted, so sequence_logprobs uses the plain full-logits forward (more memory, same result)")
        return sequence_logprobs_ref(model, input_ids, attention_mask, response_mask, **forward_kwargs)
    weight, bias, scale = plan
    hidden = final_hidden_states(model, input_ids, attention_mask, **forward_kwargs)[:, :-1]  # (B, T-1, H)
    if scale != 1.0:
        hidden = hidden * scale
    labels = _shifted_labels(input_ids, response_mask).to(hidden.device)  # (B, T-1)
    tok = token_logprobs(hidden.to(weight.dtype), weight, labels, bias=bias, chunk_size=chunk_size, backend=backend)
    return tok.sum(-1)  # (B,)


# ----------------------------------------------------------------------------------------------------------------
# implicit rewards over several policies


def _as_scorers(policies) -> list[tuple[nn.Module, str | None]]:
    """Normalise ``policies`` to [(module, adapter name or None)]: a list of models, ``(peft_model, [names])``,
    or a list mixing models and ``(peft_model, name)`` pairs."""
    if isinstance(policies, tuple) and len(policies) == 2 and isinstance(policies[0], nn.Module) \
            and isinstance(policies[1], (list, tuple)):
        model, names = policies
        if not is_peft(model):
            raise ValueError("(model, [adapter names]) needs a peft.PeftModel holding those adapters")
        policies = [(model, str(n)) for n in names]
    if isinstance(policies, nn.Module):
        policies = [policies]
    out = []
    for p in policies:
        if isinstance(p, nn.Module):
            out.append((p, None))
        elif isinstance(p, tuple) and len(p) == 2 and isinstance(p[0], nn.Module) and (
                p[1] is None or (isinstance(p[1], str) and is_peft(p[0]))):
            out.append((p[0], p[1]))  # (model, None) = the model as it is
        else:
            raise ValueError(f"each policy must be a model or a (peft_model, adapter_name) pair, got {type(p).__name__}")
    if not out:
        raise ValueError("policies is empty: pass at least one model or adapter")
    for m, n in out:
        if n is not None and n != BASE and n not in m.peft_config:
            raise ValueError(f"adapter {n!r} is not in this PeftModel (it has {sorted(m.peft_config)})")
    return out


def _group_logprobs(model, names: list[str | None], batch: dict, chunk_size, backend) -> torch.Tensor:
    """[b, len(names)] log-probs of one base model under several adapters. Adapters of one PEFT model share one
    forward over the batch repeated per adapter (PEFT's mixed-adapter batch): the base weights are read once
    and every adapter adds only its low-rank product. Falls back to one forward per adapter if PEFT refuses."""
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    b = ids.shape[0]
    if len(names) > 1 and all(n is not None for n in names):
        try:
            with eval_mode(model):
                rep = lambda t: t.repeat(len(names), 1)  # noqa: E731  (b, T) -> (K*b, T), adapter-major
                adapter_names = [n for n in names for _ in range(b)]
                lp = sequence_logprobs(model, rep(ids), rep(attn), rep(resp), chunk_size=chunk_size,
                                       backend=backend, adapter_names=adapter_names)
            return lp.view(len(names), b).t()  # (b, K)
        except (ValueError, TypeError) as exc:
            warn_once(f"mixed:{type(exc).__name__}", f"mixed-adapter batch not possible ({exc}); scoring adapters "
                       "one forward each")
    cols = []
    for n in names:
        with use_adapter(model, n):
            cols.append(sequence_logprobs(model, ids, attn, resp, chunk_size=chunk_size, backend=backend))
    return torch.stack(cols, 1)  # (b, K)


def _slice(batch: dict, start: int, stop: int, device) -> dict:
    return {k: batch[k][start:stop].to(device) for k in ("input_ids", "attention_mask", "response_mask")}


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def policy_logprobs(policies, batch: dict, *, batch_size: int | None = None, progress: bool = True,
                    chunk_size: int | None = None, backend: str | None = None, desc: str = "log-probs",
                    share_prompts: bool = True) -> torch.Tensor:
    """[B, K] log π_k(y|x) for K policies (see :func:`implicit_rewards` for the accepted forms), scored
    ``batch_size`` rows at a time (default: all) under a tqdm bar. Returned on CPU, float32.

    ``share_prompts``: rows of one ``batch_size`` batch that share a prompt run it once
    (:func:`sipo_fast.training.shared_prompt.shared_prompt_logprobs`; equal up to float rounding); batches
    without a shared prompt, and models it cannot serve, take the plain path."""
    from tqdm.auto import tqdm

    from .shared_prompt import shared_prompt_logprobs  # imports transformers' cache classes: only when scoring

    scorers = _as_scorers(policies)
    _validate_batch(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
    B = batch["input_ids"].shape[0]
    step = B if batch_size is None else batch_size
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[int, tuple[nn.Module, list[int]]] = {}  # id(model) -> (model, column indices)
    for k, (m, _) in enumerate(scorers):
        groups.setdefault(id(m), (m, []))[1].append(k)
    out = torch.empty(B, len(scorers), dtype=torch.float32)
    for start in tqdm(range(0, B, step), desc=desc, disable=not progress or B <= step, leave=False):
        stop = min(B, start + step)
        for model, cols in groups.values():
            sub = _slice(batch, start, stop, _device_of(model))
            names = [scorers[k][1] for k in cols]
            lp = shared_prompt_logprobs(model, names, sub, chunk_size=chunk_size, backend=backend) \
                if share_prompts else None
            if lp is None:
                lp = _group_logprobs(model, names, sub, chunk_size, backend)
            out[start:stop, cols] = lp.float().cpu()
    return out


def implicit_rewards(policies, reference, batch: dict, beta: float = 0.1, *, ref_logprobs: torch.Tensor | None = None,
                     batch_size: int | None = None, progress: bool = True, chunk_size: int | None = None,
                     backend: str | None = None, share_prompts: bool = True) -> torch.Tensor:
    """Implicit rewards r_k(x, y) = β (log π_k(y|x) - log π_ref(y|x)) of K policies on B sequences: [B, K].

    Args:
        policies: a list of models (e.g. the stage-1 policies and merged soups), ``(peft_model, [adapter
            names])``, or a list mixing models and ``(peft_model, name)`` pairs. Adapters of one PEFT model are
            scored in one batched forward (base weights read once).
        reference: the reference model, or None for "the PEFT base with adapters disabled" (then the policies
            must be adapters of one PeftModel; the reference rides in the same batched forward).
        batch: dict with ``input_ids``, ``attention_mask``, ``response_mask`` [B, T] (``encode_pairs``).
        ref_logprobs: precomputed [B] log π_ref(y|x) (e.g. from :func:`reference_logprobs`); skips the reference.
        batch_size: rows per forward (default: all B at once); a tqdm bar shows progress over B. A batched
            adapter forward holds (number of adapters [+1 for the base reference]) × batch_size rows.
        share_prompts: run a prompt shared by rows of one batch once (see :func:`policy_logprobs`).
    Returns:
        [B, K] float32 on CPU, columns in the order of ``policies``.
    """
    scorers = _as_scorers(policies)
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    B = batch["input_ids"].shape[0]
    if ref_logprobs is not None:
        ref_logprobs = torch.as_tensor(ref_logprobs, dtype=torch.float32).cpu()
        if ref_logprobs.shape != (B,):
            raise ValueError(f"ref_logprobs must be [B] = [{B}], got {tuple(ref_logprobs.shape)}")
        lp = policy_logprobs(scorers, batch, batch_size=batch_size, progress=progress, chunk_size=chunk_size,
                             backend=backend, desc="implicit rewards", share_prompts=share_prompts)
        return beta * (lp - ref_logprobs[:, None])
    if reference is None:
        bases = {id(m) for m, n in scorers if n is not None}
        if len(bases) != 1 or any(n is None for _, n in scorers):
            raise ValueError("reference=None means 'the PEFT base with adapters disabled', so every policy must be an "
                             "adapter of one PeftModel; pass a reference model or ref_logprobs otherwise")
        ref_scorer = (scorers[0][0], BASE)
    else:
        if not isinstance(reference, nn.Module):
            raise ValueError(f"reference must be a model or None, got {type(reference).__name__}")
        ref_scorer = (reference, None)
    lp = policy_logprobs(scorers + [ref_scorer], batch, batch_size=batch_size, progress=progress,
                         chunk_size=chunk_size, backend=backend, desc="implicit rewards",
                         share_prompts=share_prompts)  # (B, K+1)
    return beta * (lp[:, :-1] - lp[:, -1:])


def reference_logprobs(reference, batch: dict, **kwargs) -> torch.Tensor:
    """[B] log π_ref(y|x), to compute once and pass as ``ref_logprobs=`` to :func:`implicit_rewards`.
    ``reference`` is a model, or ``(peft_model, None)`` for the PEFT base with adapters disabled."""
    if isinstance(reference, tuple):
        reference = (reference[0], BASE)
    return policy_logprobs([reference], batch, **kwargs)[:, 0]

