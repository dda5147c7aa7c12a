"""Implicit rewards of (prompt, response) pairs for the refine and filter stages (SIPO.md §2):
r_k(x, y) = β (log π_k(y|x) − log π_ref(y|x)) under K reward models, each distinct pair scored once."""
from __future__ import annotations

import torch

from ..context import Context


def encode(ctx: Context, prompts: list[str], responses: list[str], max_length: int,
           template: str | None = None) -> dict:
    from sipo_fast.data.formatting import encode_pairs

    return encode_pairs(ctx.tokenizer, prompts, responses, template or ctx.config.model.template,
                        max_length=max_length)


def rewards(ctx: Context, policies, reference, prompts: list[str], responses: list[str], *, beta: float,
            max_length: int, batch_size: int) -> torch.Tensor:
    """[B, K] implicit rewards r_k = β (log π_k(y|x) − log π_ref(y|x)) of distinct (prompt, response) pairs,
    scored once each (greedy candidates at neighbouring weights are often identical).

    Under several processes each rank scores its share of the ``batch_size``-row batches of the one padded
    encoding, so every forward holds the rows and padding of the single-process one and the gathered rewards
    are the single-process rewards."""
    from sipo_fast.distributed import batched, current
    from sipo_fast.training import implicit_rewards

    if not prompts:
        return torch.zeros(0, 0)
    keys = list(zip(prompts, responses))
    uniq = list(dict.fromkeys(keys))
    index = {k: i for i, k in enumerate(uniq)}
    batch = encode(ctx, [p for p, _ in uniq], [r for _, r in uniq], max_length)
    dist = current()
    if dist.enabled:
        def score(start: int, stop: int) -> torch.Tensor:
            sub = {k: v[start:stop] for k, v in batch.items()}
            return implicit_rewards(policies, reference, sub, beta=beta, batch_size=stop - start, progress=False)
        r = torch.cat(batched(len(uniq), batch_size, score, dist=dist))
    else:
        r = implicit_rewards(policies, reference, batch, beta=beta, batch_size=batch_size, progress=ctx.progress)
    return r[torch.tensor([index[k] for k in keys])]  # (B, K)
