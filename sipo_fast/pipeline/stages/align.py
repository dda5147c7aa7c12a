"""Stage 1, initial alignment (SIPO.md §3): one DPO run per objective from π_ref.

Artifact ``align/``: ``train.jsonl``, ``eval.jsonl`` (the split used; ``stage2.jsonl``, the prompts kept for
stage 2, under data.holdout_stage2) and ``policies/<objective>/`` (a LoRA adapter or a full model per objective,
with ``train_metrics.json``).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from ..policies import (copy_policy, final_metrics, log_metrics, preference_pairs, save_model, stage1_reference, train,
                        training_args)
from ..rundir.files import read_jsonl
from .stage import Stage

log = logging.getLogger("sipo_fast.pipeline")


class AlignStage(Stage):
    """Stage 1: one DPO run per objective from π_ref (LoRA r=64, α=1 on q/k/v/o by default)."""

    name = "align"
    config_keys = ("seed", "model", "data.source", "data.objectives", "data.max_rows", "data.eval_fraction",
                   "data.split_seed", "data.split_method", "data.eval_split", "data.conflict_ratio",
                   "data.conflict_mix", "data.drop_long_prompts", "data.stage2_reserved", "align")

    def run(self, ctx, parts, inputs):
        cfg, a = ctx.config, ctx.config.align
        for split in ctx.split:  # train, eval, and stage2 (the prompts kept for stage 2) under data.holdout_stage2
            if not parts.done(f"{split}.jsonl"):
                parts.write_jsonl(f"{split}.jsonl", ctx.split[split])
        rows, held = read_jsonl(parts.path("train.jsonl")), read_jsonl(parts.path("eval.jsonl"))
        summary = {"train_pairs": len(rows), "eval_pairs": len(held),
                   "conflicting_train_pairs": len(ctx.conflicting(rows)), "metrics": {}}
        from sipo_fast.training import with_reference

        ref = None  # π_ref's log-probs, computed once for both objectives' runs
        for i, obj in enumerate(cfg.data.objectives):
            part = f"policies/{obj}"
            if not parts.done(part) and a.policies is not None:
                parts.save_part_dir(part, lambda tmp, src=Path(a.policies[i]): copy_policy(src, tmp))
            elif not parts.done(part):
                log.info("align: DPO for objective %r on %d pairs", obj, len(rows))
                scratch = parts.work.parent / f"scratch-align-{obj}"
                ref = ref or stage1_reference(ctx, rows + held)
                held_k = with_reference(preference_pairs(held, obj), ref)
                args = training_args(ctx, a, scratch, evaluate=bool(held_k), loss_type=["sigmoid"],
                                     objective_names=[obj])
                model, history = train(ctx, ctx.load_base(), with_reference(preference_pairs(rows, obj), ref),
                                       args=args, eval_pairs=held_k)
                log_metrics(parts, obj, history)
                parts.save_part_dir(part, save_model(model, history))
                parts.dist.on_main(lambda: shutil.rmtree(scratch, ignore_errors=True))
            summary["metrics"][obj] = final_metrics(parts.path(part))
        return summary


