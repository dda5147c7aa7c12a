"""Stage 3, fine-tuning (SIPO.md §3): each stage-1 policy, adapter merged, fine-tuned on D_c with the SIPO loss
(DPO + α·NLL(y_c)/|y_c|) and itself as the reference.

Artifact ``finetune/``: ``policies/<objective>/``, the fine-tuned policy as one LoRA adapter on π_ref (stage-1
and stage-3 updates concatenated, exact: :func:`save_combined`) or a full model.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..context import Context
from ..policies import (canonical_adapter_config, clean_metrics, copy_policy, final_metrics, log_metrics,
                        preference_pairs, save_model, stage3_reference, train, training_args)
from ..rundir.files import read_jsonl
from .stage import Stage

log = logging.getLogger("sipo_fast.pipeline")


class FinetuneStage(Stage):
    """Stage 3: each stage-1 policy, adapter merged, fine-tuned on D_c with the SIPO loss and itself as the
    reference (a fresh LoRA of the same shape). The saved policy is π_ref plus one adapter holding both
    updates, ΔW_1 + ΔW_3, rank-concatenated (exact), so it loads like any stage-1 policy."""

    name = "finetune"
    upstream = ("align", "filter")
    config_keys = ("seed", "model", "data.objectives", "align.use_lora", "align.lora_r", "align.lora_alpha",
                   "align.lora_dropout", "align.target_modules", "finetune")

    def run(self, ctx, parts, inputs):
        cfg = ctx.config
        pairs = [{k: r[k] for k in ("prompt", "chosen", "rejected")}
                 for r in read_jsonl(inputs["filter"] / "pairs.jsonl")]
        if not pairs:
            log.warning("finetune: D_c is empty (no candidate survived the filter); the policies stay as stage 1 "
                        "left them. More conflicting prompts (data.max_conflict_prompts) or weights help")
        summary = {"pairs": len(pairs), "trained": bool(pairs), "metrics": {}}
        for obj in cfg.data.objectives:
            part, src = f"policies/{obj}", inputs["align"] / "policies" / obj
            if not parts.done(part) and not pairs:
                # Nothing to train on: the stage-1 policy, without its stage-1 training metrics.
                parts.save_part_dir(part, lambda tmp, src=src: copy_policy(src, tmp, skip=("train_metrics.json",)))
            elif not parts.done(part):
                log.info("finetune: SIPO loss for objective %r on %d pairs", obj, len(pairs))
                scratch = parts.work.parent / f"scratch-finetune-{obj}"
                start, ref = self._start(ctx, src)
                f = cfg.finetune
                # select_best: the loss on the objective's stage-1 held-out pairs picks the checkpoint (Iterative_DPO.py)
                held = preference_pairs(read_jsonl(inputs["align"] / "eval.jsonl"), obj) if f.select_best else None
                from sipo_fast.training import with_reference

                table = stage3_reference(ctx, start if ref is None else ref, pairs, held)
                pairs_k, held = with_reference(pairs, table), held and with_reference(held, table)
                args = training_args(ctx, f, scratch, evaluate=bool(held), objective_names=[obj])
                model, history = train(ctx, start, pairs_k, args=args, eval_pairs=held, ref=ref)
                log_metrics(parts, obj, history)
                if cfg.align.use_lora:
                    parts.save_part_dir(part, lambda tmp: save_combined(ctx, src, model, history, tmp))
                else:
                    parts.save_part_dir(part, save_model(model, history))
                parts.dist.on_main(lambda: shutil.rmtree(scratch, ignore_errors=True))
            summary["metrics"][obj] = final_metrics(parts.path(part))
        return summary

    @staticmethod
    def _start(ctx, src: Path):
        """(model to train, reference): π_k with its stage-1 update merged in; with LoRA the reference is the
        same model with the new adapter disabled (ref None), with full fine-tuning a frozen copy."""
        if ctx.config.align.use_lora:
            from peft import PeftModel

            return PeftModel.from_pretrained(ctx.load_base(), src).merge_and_unload(), None
        from transformers import AutoModelForCausalLM

        load = lambda: AutoModelForCausalLM.from_pretrained(src, dtype=ctx.dtype).to(ctx.device)  # noqa: E731
        return load(), load().eval()



def save_combined(ctx: Context, stage1_dir: Path, trained, history: list[dict], out: Path) -> None:
    """Write π_ref + (ΔW_1 + ΔW_3) as one LoRA adapter into ``out``.

    ΔW_3 was trained on W_0 + ΔW_1 merged; a LoRA update does not depend on the weights under it, so
    loading both adapters on W_0 and concatenating them (``lora_soup`` with weights [1, 1]) reproduces the
    fine-tuned model exactly (up to the rounding of the merge).
    """
    from peft import PeftModel

    from sipo_fast.merging import lora_soup

    stage3 = out / ".stage3"
    trained.save_pretrained(stage3)
    model = PeftModel.from_pretrained(ctx.load_base(), stage1_dir, adapter_name="stage1")
    model.load_adapter(stage3, adapter_name="stage3")
    lora_soup(model, ["stage1", "stage3"], [1.0, 1.0], "combined")
    model.save_pretrained(out / ".combined", selected_adapters=["combined"])
    saved = out / ".combined" / "combined"  # PEFT nests every adapter other than "default" in its own folder
    for f in saved.iterdir():
        shutil.move(str(f), out / f.name)
    shutil.rmtree(stage3)
    shutil.rmtree(out / ".combined")
    canonical_adapter_config(out)
    (out / "train_metrics.json").write_text(json.dumps(clean_metrics(history), indent=1, sort_keys=True))
