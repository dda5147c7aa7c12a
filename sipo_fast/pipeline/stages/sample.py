"""Stage 2.1, sampling (SIPO.md §3): MOD over the stage-1 policies at each w in W on the conflicting training
prompts.

Artifact ``sample/``: ``prompts.jsonl`` (the conflicting prompts, with ``pid``) and ``candidates.jsonl`` (one row
per prompt and weight: ``pid, weight_index, weight, candidate``).
"""
from __future__ import annotations

import logging

from sipo_fast.eval.methods import weight_set_texts

from ..policies import load_policies
from ..rundir.files import read_jsonl
from .generation import generate, per_weight_parts
from .stage import Stage, sample_seed

log = logging.getLogger("sipo_fast.pipeline")


class SampleStage(Stage):
    """Stage 2.1: MOD over the stage-1 policies at each w in W on the conflicting training prompts."""

    name = "sample"
    upstream = ("align",)
    config_keys = ("seed", "model", "data.objectives", "data.max_conflict_prompts", "sample")

    def run(self, ctx, parts, inputs):
        cfg = ctx.config
        reserved = inputs["align"] / "stage2.jsonl"  # data.holdout_stage2: rows stage 1 did not train on
        conflicts = ctx.conflicting(read_jsonl(reserved if reserved.exists() else inputs["align"] / "train.jsonl"))
        if cfg.data.max_conflict_prompts is not None:
            conflicts = conflicts[: cfg.data.max_conflict_prompts]
        prompts = [{"pid": i, **r} for i, r in enumerate(conflicts)]
        parts.write_jsonl("prompts.jsonl", prompts)
        texts = [p["prompt"] for p in prompts]

        def sample(policies, decoder, wi):
            w = cfg.sample.weights[wi]
            # Seeded per part, so a resumed run samples exactly what an uninterrupted one would.
            outs = generate(ctx, decoder, texts, w, max_new_tokens=cfg.sample.max_new_tokens,
                            batch_size=cfg.sample.batch_size, do_sample=cfg.sample.do_sample,
                            temperature=cfg.sample.temperature, top_p=cfg.sample.top_p, seed=sample_seed(cfg.seed, wi),
                            desc=f"sample w={w}")
            return [{"pid": p["pid"], "weight_index": wi, "weight": w, "candidate": t} for p, t in zip(prompts, outs)]
        load = lambda: load_policies(ctx, inputs["align"] / "policies")  # noqa: E731
        if cfg.sample.do_sample:  # each weight its own seeded stream, as the paper samples one w at a time
            rows = per_weight_parts(ctx, parts, range(len(cfg.sample.weights)), load, sample)
        else:
            rows = all_weights_parts(ctx, parts, prompts, cfg.sample.weights, load,
                                     max_new_tokens=cfg.sample.max_new_tokens, batch_size=cfg.sample.batch_size)
        return {"conflicting_prompts": len(prompts), "weights": len(cfg.sample.weights), "candidates": len(rows)}



def all_weights_parts(ctx, parts, prompts: list[dict], weights: list, load, *, max_new_tokens: int,
                      batch_size: int) -> list[dict]:
    """Sample's greedy loop: every weight vector of W decoded in one MOD batch per ``batch_size`` prompts (the
    decoder's weight sets, :func:`sipo_fast.eval.methods.weight_set_texts`), the rows of one prompt sharing its
    prefill, where a loop over W would prefill every prompt |W| times, in |W| batches of 1/|W| the rows. Greedy
    decoding makes the texts those of per-weight decoding up to float rounding (tests/test_pipeline_stages.py
    compares them).

    One resumable part per batch (``parts/b<k>.jsonl``); the batches are fixed by a global sort of the
    distinct prompts by length, so a resumed run, or one on several processes (each rank decodes every
    ``world``-th missing batch, rank 0 saves them), decodes exactly the batches of one uninterrupted process.
    Writes ``candidates.jsonl`` ({pid, weight_index, weight, candidate}, sorted by pid then weight index)."""
    from tqdm.auto import tqdm

    from sipo_fast.data.formatting import encode_prompts

    template = ctx.config.model.template
    texts = list(dict.fromkeys(p["prompt"] for p in prompts))  # greedy: a repeated prompt gives the same text
    lengths = [len(ids) for ids in encode_prompts(ctx.tokenizer, texts, template)]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    batches = [[texts[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]
    todo = [k for k in range(len(batches)) if not parts.done(f"parts/b{k}.jsonl")]
    dist, loaded = parts.dist, []
    log.info("sample: %d prompts x %d weights in %d batches (%d to decode), up to %d new tokens", len(texts),
             len(weights), len(batches), len(todo), max_new_tokens)

    def decode(batch: list[str]) -> list[list[str]]:  # (prompts, weights)
        return weight_set_texts(loaded[1], batch, weights, template=template, max_new_tokens=max_new_tokens)

    groups = range(0, len(todo), dist.world)
    for g in tqdm(groups, desc="sample (all weights)", unit="batch", disable=not ctx.progress or not dist.is_main):
        group = todo[g:g + dist.world]
        if not loaded:
            policies = load()
            loaded += [policies, policies.decoder(ctx)]
        outs = dist.merge({j: decode(batches[group[j]]) for j in dist.mine(len(group))}, len(group))
        for k, out in zip(group, outs):
            parts.save_part_jsonl(f"parts/b{k}.jsonl", [{"prompt": t, "weight_index": s, "candidate": out[i][s]}
                                                        for i, t in enumerate(batches[k]) for s in range(len(weights))])
    done = {(r["prompt"], r["weight_index"]): r["candidate"]
            for k in range(len(batches)) for r in read_jsonl(parts.path(f"parts/b{k}.jsonl"))}
    rows = [{"pid": p["pid"], "weight_index": wi, "weight": w, "candidate": done[(p["prompt"], wi)]}
            for p in prompts for wi, w in enumerate(weights)]
    rows.sort(key=lambda r: (r["pid"], r["weight_index"]))
    parts.write_jsonl("candidates.jsonl", rows)
    parts.remove("parts")
    return rows


