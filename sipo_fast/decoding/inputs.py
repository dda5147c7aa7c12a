"""Input checks and helpers of :meth:`MODDecoder.generate` that need no decoder state."""
from __future__ import annotations

import torch

from sipo_fast.ops.mod import check_top_k_top_p


def batch_seed(seed: int | None, k: int) -> int | None:
    """The seed of batch ``k`` of a :meth:`MODDecoder.generate_text` call seeded with ``seed``: ``seed`` itself for
    the first batch (a one-batch call samples exactly like ``generate(seed=seed)``), an independent stream
    derived from (seed, k) for the others. Not ``seed + k``: callers seed consecutive calls with seed, seed + 1,
    ... (one per weight), and batch 1 of one call would then replay batch 0 of the next."""
    if seed is None or k == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(k)]).generate_state(1, dtype=np.uint64)[0]
               >> 1)


def expand_weight_sets(ids: torch.Tensor, mask: torch.Tensor, weights):
    """[B, S, N] weights -> B·S rows (row b·S + s is prompt b at weight vector s) and [B·S, N] weights; the
    rows of one prompt are identical, so the decoder's dedupe gives them one shared prefill. Other shapes
    pass through unchanged."""
    w = torch.as_tensor(weights)
    if w.dim() != 3:
        return ids, mask, weights
    if w.shape[0] != ids.shape[0] or w.shape[1] == 0:
        raise ValueError(f"weights [B, S, N] must have B={ids.shape[0]} (one set per prompt) and S >= 1, got "
                         f"{tuple(w.shape)}")
    s = w.shape[1]
    return ids.repeat_interleave(s, 0), mask.repeat_interleave(s, 0), w.reshape(-1, w.shape[2])


def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, seed) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if do_sample and (not isinstance(temperature, (int, float)) or not temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r} (for greedy decoding use "
                         "do_sample=False)")
    check_top_k_top_p(top_k, top_p)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
