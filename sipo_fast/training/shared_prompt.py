"""Log-probabilities of many responses to one prompt with the prompt run once (scoring only, no gradient).

The filter scores every prompt's two originals and |W| candidates under K implicit reward models: about six
rows per prompt that share their first 40-60 tokens. The plain path (:func:`sequence_logprobs`) runs each row
in full, so most of its work is the same prompt again. Here a batch takes two forwards per model (each
holding every adapter of a mixed-adapter batch): its distinct prompts, left-padded with explicit positions,
build a KV cache; each row takes its prompt's cache rows (``DynamicCache.batch_select_indices``), and only the
responses, right-padded, run after it:

    hidden(prompt_{P-1}) scores response token 0;  hidden(response_j) scores response token j+1

which is the plain path's causal computation split in two, so the log-probs agree up to float rounding
(tests/test_shared_prompt.py checks them against the full-logits reference). transformers' ``generate`` shares
a prefix the same way for beams, but has no scoring entry point for given responses, hence this module.

It needs what it can check: a fused LM head (:func:`~.backbone.lm_head_plan`), right-padded rows whose response is one
contiguous run after a non-empty prompt (``encode_pairs``' layout), and a model that takes position ids and
returns a cache. Batches
that do not qualify, or in which no two rows share a prompt, return None and the caller uses the plain path.
"""
from __future__ import annotations

import torch

from sipo_fast.kv.hf import cache_kwarg
from sipo_fast.ops.logprobs import token_logprobs

from .backbone import backbone_call, eval_mode, lm_head_plan, unwrap, use_adapter, warn_once


def prompt_spans(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor) -> list[tuple[int, int]] | None:
    """[(response start, response end)] per row, or None when a row is not ``prompt + response + padding``
    with a non-empty prompt, a contiguous response and attention on exactly both. A row without response
    tokens gets (length, length)."""
    spans = []
    for i in range(input_ids.shape[0]):
        n = int(attention_mask[i].sum())
        if n == 0 or not bool(attention_mask[i, :n].all()):
            return None  # left padding or holes
        r = response_mask[i].nonzero().flatten()
        if r.numel() == 0:
            spans.append((n, n))
            continue
        a, e = int(r[0]), int(r[-1]) + 1
        if a == 0 or e - a != r.numel() or e > n:
            return None
        spans.append((a, e))
    return spans


def _hidden_and_cache(model, ids, attn, pos, past, names):
    """(backbone output [b, t, H], its KV cache) from one ``model(...)`` call projecting only the last position."""
    kw = {} if names is None else {"adapter_names": names}
    kw[cache_kwarg(unwrap(model))] = past
    hidden, out = backbone_call(model, input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                                logits_to_keep=1, **kw)
    cache = getattr(out, "cache", None)
    if cache is None:  # transformers before the rename
        cache = getattr(out, "past_key_values", None)
    if cache is None:
        raise TypeError("the model returned no KV cache")
    return hidden, cache


def _score_groups(model, names, prompts, responses, group_of, plan, chunk_size, backend) -> torch.Tensor:
    """[R, K] log-probs of R responses (lists of token ids), response r answering ``prompts[group_of[r]]``, under
    K adapters of ``model`` in one mixed batch (``names`` a list), or the model as it is (``names`` None, K = 1).

    Two forwards: the G distinct prompts, left-padded, with explicit positions (K·G rows, adapter-major); then
    the responses, right-padded, each row given its prompt's cache rows (``batch_select_indices``) and the
    positions that continue its own prompt."""
    weight, bias, scale = plan
    dev = weight.device
    K = 1 if names is None else len(names)
    G, R = len(prompts), len(responses)
    P, L = max(len(p) for p in prompts), max(1, max(len(r) for r in responses))
    p_ids, p_mask = torch.zeros(G, P, dtype=torch.long), torch.zeros(G, P, dtype=torch.long)
    for g, p in enumerate(prompts):
        p_ids[g, P - len(p):] = torch.tensor(p, dtype=torch.long)
        p_mask[g, P - len(p):] = 1
    r_ids, r_mask = torch.zeros(R, L, dtype=torch.long), torch.zeros(R, L, dtype=torch.long)
    for j, r in enumerate(responses):
        r_ids[j, : len(r)] = torch.tensor(r, dtype=torch.long)
        r_mask[j, : len(r)] = 1
    gi = torch.tensor(group_of, dtype=torch.long)
    rep = lambda t: t.repeat(K, 1).to(dev)  # noqa: E731  (rows, ...) -> (K*rows, ...), adapter-major
    p_pos = (p_mask.cumsum(1) - 1).clamp(min=0)
    h_p, cache = _hidden_and_cache(model, rep(p_ids), rep(p_mask), rep(p_pos), None,
                                   None if names is None else [n for n in names for _ in range(G)])
    idx = torch.cat([k * G + gi for k in range(K)]).to(dev)  # response row -> its prompt's cache row
    cache.batch_select_indices(idx)
    attn = torch.cat([p_mask[gi], r_mask], 1)
    pos = p_mask.sum(1)[gi, None] + torch.arange(L)[None]
    h_r, _ = _hidden_and_cache(model, rep(r_ids), rep(attn), rep(pos), cache,
                               None if names is None else [n for n in names for _ in range(R)])
    hidden = torch.cat([h_p[:, -1][idx][:, None], h_r[:, :-1]], 1)  # (K*R, L, H): the prompt's last scores y_0
    if scale != 1.0:
        hidden = hidden * scale
    labels = rep(r_ids.masked_fill(r_mask == 0, -100))
    tok = token_logprobs(hidden.to(weight.dtype), weight, labels, bias=bias, chunk_size=chunk_size, backend=backend)
    return tok.sum(-1).view(K, R).t()


@torch.no_grad()
def shared_prompt_logprobs(model, names: list[str | None], batch: dict, *, chunk_size: int | None = None,
                           backend: str | None = None) -> torch.Tensor | None:
    """[b, len(names)] log π(y|x) of the batch's rows under ``model`` with each adapter in ``names`` (None: the
    model as it is; ``BASE``: adapters disabled), every distinct prompt run once; None when the batch or the
    model does not qualify (see the module docstring), for the caller to use the plain path."""
    plan = lm_head_plan(model)
    ids, attn, resp = (batch[k].cpu() for k in ("input_ids", "attention_mask", "response_mask"))
    spans = None if plan is None else prompt_spans(ids, attn, resp)
    if spans is None:
        return None
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (a, _) in enumerate(spans):
        groups.setdefault(tuple(ids[i, :a].tolist()), []).append(i)
    if len(groups) == len(spans):
        return None  # nothing shared: the plain path does the same work in one forward
    prompts = list(groups)
    group_of = [0] * len(spans)
    for g, rows in enumerate(groups.values()):
        for i in rows:
            group_of[i] = g
    responses = [ids[i, a:e].tolist() for i, (a, e) in enumerate(spans)]
    args = (prompts, responses, group_of, plan, chunk_size, backend)
    try:
        with eval_mode(model):
            if len(names) > 1 and all(n is not None for n in names):
                try:
                    return _score_groups(model, list(names), *args).float().cpu()
                except ValueError as exc:  # PEFT refuses a mixed batch: one adapter at a time
                    warn_once(f"shared-mixed:{type(exc).__name__}", f"mixed-adapter batch not possible ({exc}); "
                               "scoring adapters one forward each")
            cols = []
            for n in names:
                with use_adapter(model, n):
                    cols.append(_score_groups(model, None, *args)[:, 0].float().cpu())
            out = torch.stack(cols, 1)
    except TypeError as exc:  # no cache / no logits_to_keep / no position_ids in this model's forward
        warn_once(f"shared:{type(unwrap(model)).__name__}", f"{type(unwrap(model)).__name__}: prompt sharing "
                   f"not possible ({exc}); scoring every row in full")
        return None
    return out
