"""Stage 2.2, refinement (SIPO.md §3, optional): each candidate reviewed by one policy (w_e one-hot on
refine.review_objective), rewritten by MOD at the candidate's own w, and the rewrite kept unless the original
scores >= on every implicit reward of the N stage-1 policies (:func:`.rules.keep_rewrite`). The prompts are
:mod:`.refine_prompts`.

Artifact ``refine/``: ``prompts.jsonl`` (copied from sample: the filter's one input) and ``candidates.jsonl``
(sample's rows plus ``original, review, rewrite, rewritten`` and the implicit rewards of original and rewrite).
"""
from __future__ import annotations

import logging

import torch

from ..context import context_length
from ..policies import load_policies
from ..rundir.files import read_jsonl
from .generation import generate, per_weight_parts
from .refine_prompts import RefinePrompts
from .rewards import rewards
from .rules import keep_rewrite, one_hot
from .stage import Stage

log = logging.getLogger("sipo_fast.pipeline")


class RefineStage(Stage):
    """Stage 2.2 (optional): review, rewrite, keep the better (module docstring)."""

    name = "refine"
    upstream = ("align", "sample")
    config_keys = ("seed", "model", "data.objectives", "refine", "filter.beta", "filter.max_length",
                   "filter.batch_size")

    def run(self, ctx, parts, inputs):
        cfg = ctx.config
        prompt_rows = read_jsonl(inputs["sample"] / "prompts.jsonl")
        parts.write_jsonl("prompts.jsonl", prompt_rows)  # filter reads prompts from here, its one input
        prompts = {p["pid"]: p for p in prompt_rows}
        cands = read_jsonl(inputs["sample"] / "candidates.jsonl")
        if not cfg.refine.enabled:
            rows = [{**c, "original": c["candidate"], "review": None, "rewrite": None, "rewritten": False}
                    for c in cands]
            parts.write_jsonl("candidates.jsonl", rows)
            return {"enabled": False, "candidates": len(rows), "rewrites_kept": 0}
        templates = RefinePrompts.for_config(cfg.data.objectives, cfg.refine.review_template,
                                             cfg.refine.rewrite_template, cfg.refine.template)
        e = cfg.data.objectives.index(cfg.review_objective)
        w_e = one_hot(e, len(cfg.data.objectives))

        def refine(policies, decoder, wi):
            group = [c for c in cands if c["weight_index"] == wi]
            return self._refine(ctx, policies, decoder, templates, prompts, group, w_e)
        rows = per_weight_parts(ctx, parts, sorted({c["weight_index"] for c in cands}),
                                lambda: load_policies(ctx, inputs["align"] / "policies"), refine)
        kept = sum(r["rewritten"] for r in rows)
        log.info("refine: kept %d of %d rewrites", kept, len(rows))
        return {"enabled": True, "candidates": len(rows), "rewrites_kept": kept,
                "review_objective": cfg.review_objective}

    def _refine(self, ctx, policies, decoder, templates, prompts, group, w_e) -> list[dict]:
        from sipo_fast.data.formatting import format_prompt

        cfg, tok = ctx.config, ctx.tokenizer
        questions = [prompts[c["pid"]]["prompt"] for c in group]
        w = group[0]["weight"]
        # The review turn is opened with a prefix the model continues, so the prompt is rendered here and
        # passed through the decoder untemplated.
        review_in = [format_prompt(tok, templates.review_prompt(q, c["candidate"]), cfg.model.template)
                     + templates.review_prefix for q, c in zip(questions, group)]
        self._check_fits(ctx, review_in, cfg.refine.review_max_new_tokens, "review")
        reviews = generate(ctx, decoder, review_in, w_e, template="none",
                           max_new_tokens=cfg.refine.review_max_new_tokens, batch_size=cfg.refine.batch_size,
                           desc=f"review w={w}")
        reviews = [templates.review_text(r) for r in reviews]
        rewrite_in = [templates.rewrite_prompt(q, c["candidate"], r) for q, c, r in zip(questions, group, reviews)]
        self._check_fits(ctx, [format_prompt(tok, p, cfg.model.template) for p in rewrite_in],
                         cfg.refine.rewrite_max_new_tokens, "rewrite")
        rewrites = generate(ctx, decoder, rewrite_in, w, max_new_tokens=cfg.refine.rewrite_max_new_tokens,
                            batch_size=cfg.refine.batch_size, desc=f"rewrite w={w}")
        rewrites = [templates.clean(r) for r in rewrites]
        orig = [c["candidate"] for c in group]
        r = rewards(ctx, policies.reward_models(), policies.reference, questions + questions, orig + rewrites,
                    beta=cfg.filter.beta, max_length=cfg.filter.max_length, batch_size=cfg.filter.batch_size)
        r_orig, r_new = r[: len(group)], r[len(group):]  # (M, N) each
        # An empty rewrite (the model stopped at once) is not a response, whatever its rewards say.
        keep = keep_rewrite(r_orig, r_new) & torch.tensor([bool(t.strip()) for t in rewrites])
        return [{**c, "original": c["candidate"], "review": rv, "rewrite": rw, "rewritten": bool(k),
                 "candidate": rw if k else c["candidate"], "rewards_original": ro.tolist(),
                 "rewards_rewrite": rn.tolist()}
                for c, rv, rw, k, ro, rn in zip(group, reviews, rewrites, keep, r_orig, r_new)]

    @staticmethod
    def _check_fits(ctx, rendered: list[str], max_new: int, what: str) -> None:
        limit = context_length(ctx.model_config)
        if limit is None:
            return
        longest = max(len(ctx.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in rendered)
        if longest + max_new > limit:
            raise ValueError(f"refine: the {what} prompts need up to {longest} + {max_new} tokens but the model's "
                             f"context is {limit}; lower sample.max_new_tokens or refine.{what}_max_new_tokens, "
                             "or set refine.enabled=false")
