"""MOD generation the sample and refine stages share: one weight vector over a list of prompts
(:func:`generate`), and the loop that runs one resumable part per weight (:func:`per_weight_parts`)."""
from __future__ import annotations

import logging

from ..context import Context
from ..rundir.files import read_jsonl

log = logging.getLogger("sipo_fast.pipeline")


def generate(ctx: Context, decoder, prompts: list[str], weights: list[float], *, max_new_tokens: int,
             template: str | None = None, batch_size: int, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None, desc: str = "MOD") -> list[str]:
    """MOD generation (``MODDecoder.generate_text``) of one response per prompt at one weight vector.

    Greedy decoding of a repeated prompt (HelpSteer pairs share prompts) gives the same text, so each distinct
    prompt is decoded once; with sampling every row is decoded on its own. Under several processes the
    batches are split over the ranks and gathered (:func:`sipo_fast.distributed.generate_text`): every rank returns
    the texts one process would.
    """
    from sipo_fast.distributed import generate_text

    if not prompts:
        return []
    todo = list(prompts) if do_sample else list(dict.fromkeys(prompts))
    log.info("%s: %d prompts, up to %d new tokens", desc, len(todo), max_new_tokens)
    kwargs = dict(weights=weights, max_new_tokens=max_new_tokens, template=template or ctx.config.model.template,
                  batch_size=batch_size, progress=ctx.progress, use_model_defaults=False)  # the config decides
    if do_sample:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, seed=seed)
    texts = [o.text for o in generate_text(decoder, todo, **kwargs)]
    if do_sample:
        return texts
    by_prompt = dict(zip(todo, texts))
    return [by_prompt[p] for p in prompts]



def per_weight_parts(ctx, parts, weight_indices, load, work) -> list[dict]:
    """Sample's and refine's loop: ``work(policies, decoder, wi)`` -> rows for each weight index whose part
    (``parts/w<wi>.jsonl``) is not done yet, the policies (``load()``) and their decoder loaded once, by the first
    part that needs them (a resumed stage with every part done loads nothing). Writes all parts' rows, sorted by (pid,
    weight index), to ``candidates.jsonl`` and returns them."""
    weight_indices, loaded = list(weight_indices), []
    for wi in weight_indices:
        part = f"parts/w{wi}.jsonl"
        if parts.done(part):
            continue
        if not loaded:
            policies = load()
            loaded += [policies, policies.decoder(ctx)]
        parts.save_part_jsonl(part, work(*loaded, wi))
    rows = [r for wi in weight_indices for r in read_jsonl(parts.path(f"parts/w{wi}.jsonl"))]
    rows.sort(key=lambda r: (r["pid"], r["weight_index"]))
    parts.write_jsonl("candidates.jsonl", rows)
    parts.remove("parts")
    return rows


