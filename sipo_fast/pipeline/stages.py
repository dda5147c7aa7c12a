"""The stages of SIPO.md §3 as small objects of one shape: ``name``, ``upstream`` (artifacts consumed),
``config_keys`` (config values read; with the upstream hashes they make the fingerprint) and
``run(ctx, parts, inputs) -> summary``, which writes the artifact into ``parts.work``.

Artifacts (each stage directory; ``logs/`` inside is not hashed):

- ``align/``: ``train.jsonl``, ``eval.jsonl`` (the split used; ``stage2.jsonl`` under data.holdout_stage2),
  ``policies/<objective>/`` (LoRA adapter or full model per objective, with ``train_metrics.json``).
- ``sample/``: ``prompts.jsonl`` (conflicting prompts, with ``pid``), ``candidates.jsonl`` (one row per
  prompt and weight: ``pid, weight_index, weight, candidate``).
- ``refine/``: ``prompts.jsonl`` (copied), ``candidates.jsonl`` (adds ``original, review, rewrite,
  rewritten`` and the implicit rewards of original and rewrite).
- ``filter/``: ``rewards.jsonl`` (every candidate's rewards under the K reward models and whether it survives),
  ``survivors.jsonl`` (the chosen y_c per covered prompt), ``pairs.jsonl`` (D_c: prompt, chosen, rejected).
- ``finetune/``: ``policies/<objective>/``: the fine-tuned policy as one LoRA adapter on π_ref (stage-1 and
  stage-3 updates concatenated, exact) or a full model.
- ``eval/``: ``report.md``, ``report.png``, ``sweeps/<method>.json``.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from .context import Context
from .policies import (Policies, all_weights_parts, copy_policy, final_metrics, generate, load_policies,
                       log_metrics, optimiser_args, per_weight_parts, preference_pairs, rewards, save_combined,
                       save_model, stage1_reference, stage3_reference, train)
from .rules import keep_rewrite, margin_counts, one_hot, select_pareto
from .rundir.files import read_jsonl
from .rundir.parts import Parts
from .templates import RefinePrompts

log = logging.getLogger("sipo_fast.pipeline")


class Stage:
    name: str = ""
    upstream: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    version: int = 1  # bump when the code changes what the stage writes, so old artifacts are redone

    def run(self, ctx: Context, parts: Parts, inputs: dict[str, Path]) -> dict:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------------------------
# stage 1


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
                model, history = train(
                    ctx, ctx.load_base(), with_reference(preference_pairs(rows, obj), ref), objective=obj,
                    loss="sigmoid", beta=a.beta, alpha=0.0, lr=a.learning_rate, epochs=a.epochs,
                    max_steps=a.max_steps, batch_size=a.batch_size, grad_accum=a.grad_accum, max_length=a.max_length,
                    use_lora=a.use_lora, eval_pairs=with_reference(preference_pairs(held, obj), ref),
                    select_best=a.select_best, eval_steps=a.eval_steps, scratch=scratch, optim=optimiser_args(a))
                log_metrics(parts, obj, history)
                parts.save_part_dir(part, save_model(model, history))
                parts.dist.on_main(lambda: shutil.rmtree(scratch, ignore_errors=True))
            summary["metrics"][obj] = final_metrics(parts.path(part))
        return summary


# ----------------------------------------------------------------------------------------------------------------
# stage 2


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
                            temperature=cfg.sample.temperature, top_p=cfg.sample.top_p, seed=cfg.seed + wi,
                            desc=f"sample w={w}")
            return [{"pid": p["pid"], "weight_index": wi, "weight": w, "candidate": t} for p, t in zip(prompts, outs)]
        load = lambda: load_policies(ctx, inputs["align"] / "policies")  # noqa: E731
        if cfg.sample.do_sample:  # each weight its own seeded stream, as the paper samples one w at a time
            rows = per_weight_parts(ctx, parts, range(len(cfg.sample.weights)), load, sample)
        else:
            rows = all_weights_parts(ctx, parts, prompts, cfg.sample.weights, load,
                                     max_new_tokens=cfg.sample.max_new_tokens, batch_size=cfg.sample.batch_size)
        return {"conflicting_prompts": len(prompts), "weights": len(cfg.sample.weights), "candidates": len(rows)}


class RefineStage(Stage):
    """Stage 2.2 (optional): review by one policy (w_e one-hot), rewrite by MOD at the candidate's w; keep
    the rewrite unless the original scores >= on every implicit reward of the N stage-1 policies."""

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
            return self._refine(ctx, policies, decoder, templates, prompts, group, w_e, wi)
        rows = per_weight_parts(ctx, parts, sorted({c["weight_index"] for c in cands}),
                                lambda: load_policies(ctx, inputs["align"] / "policies"), refine)
        kept = sum(r["rewritten"] for r in rows)
        log.info("refine: kept %d of %d rewrites", kept, len(rows))
        return {"enabled": True, "candidates": len(rows), "rewrites_kept": kept,
                "review_objective": cfg.review_objective}

    def _refine(self, ctx, policies, decoder, templates, prompts, group, w_e, wi) -> list[dict]:
        from sipo_fast.data.formatting import format_prompt

        cfg, tok = ctx.config, ctx.tokenizer
        questions = [prompts[c["pid"]]["prompt"] for c in group]
        w = group[0]["weight"]
        torch.manual_seed(cfg.seed + 1000 + wi)
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
        from .context import context_length

        limit = context_length(ctx.model_config)
        if limit is None:
            return
        longest = max(len(ctx.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in rendered)
        if longest + max_new > limit:
            raise ValueError(f"refine: the {what} prompts need up to {longest} + {max_new} tokens but the model's "
                             f"context is {limit}; lower sample.max_new_tokens or refine.{what}_max_new_tokens, "
                             "or set refine.enabled=false")


class FilterStage(Stage):
    """Stage 2.3: strict dominance over both originals under every implicit reward model (N policies plus
    DPO soups at the soup weights), the max-sum pick, at most one survivor per conflicting pair (``pid``; a
    PKU-style prompt has one pair); builds D_c = {(x, y_c, y_a), (x, y_c, y_b)}."""

    name = "filter"
    upstream = ("align", "refine")
    config_keys = ("seed", "model", "data.objectives", "filter", "soup_weights")

    def run(self, ctx, parts, inputs):
        cfg = ctx.config
        cands = read_jsonl(inputs["refine"] / "candidates.jsonl")
        prompts = {p["pid"]: p for p in read_jsonl(inputs["refine"] / "prompts.jsonl")}
        policies = load_policies(ctx, inputs["align"] / "policies")
        models, names = self._reward_models(ctx, policies)
        pids = sorted({c["pid"] for c in cands})
        per_prompt = {pid: [c for c in cands if c["pid"] == pid] for pid in pids}
        M = max(len(v) for v in per_prompt.values())
        # One flat scoring batch: y_a, y_b, then every candidate, per prompt.
        flat_p, flat_r = [], []
        for pid in pids:
            p = prompts[pid]
            flat_p += [p["prompt"]] * (2 + len(per_prompt[pid]))
            flat_r += [p["response_0"], p["response_1"]] + [c["candidate"] for c in per_prompt[pid]]
        r = rewards(ctx, models, policies.reference, flat_p, flat_r, beta=cfg.filter.beta,
                    max_length=cfg.filter.max_length, batch_size=cfg.filter.batch_size)  # (rows, K)
        K = r.shape[1]
        cand = torch.zeros(len(pids), M, K)
        valid = torch.zeros(len(pids), M, dtype=torch.bool)
        r_a, r_b = torch.zeros(len(pids), K), torch.zeros(len(pids), K)
        row = 0
        for i, pid in enumerate(pids):
            m = len(per_prompt[pid])
            r_a[i], r_b[i] = r[row], r[row + 1]
            cand[i, :m] = r[row + 2: row + 2 + m]
            # An empty candidate is not a response to train towards, whatever its rewards say.
            valid[i, :m] = torch.tensor([bool(c["candidate"].strip()) for c in per_prompt[pid]])
            row += 2 + m
        sel = select_pareto(cand, r_a, r_b, valid)
        reward_rows, survivors, pairs = [], [], []
        for i, pid in enumerate(pids):
            for j, c in enumerate(per_prompt[pid]):
                reward_rows.append({"pid": pid, "weight_index": c["weight_index"], "rewards": cand[i, j].tolist(),
                                    "rewards_a": r_a[i].tolist(), "rewards_b": r_b[i].tolist(),
                                    "survives": bool(sel.survives[i, j])})
            j = int(sel.chosen[i])
            if j < 0:
                continue
            c, p = per_prompt[pid][j], prompts[pid]
            survivors.append({"pid": pid, "prompt": p["prompt"], "chosen": c["candidate"], "weight": c["weight"],
                              "weight_index": c["weight_index"], "rewritten": c.get("rewritten", False),
                              "reward_sum": float(cand[i, j].sum()), "response_0": p["response_0"],
                              "response_1": p["response_1"]})
            pairs += [{"prompt": p["prompt"], "chosen": c["candidate"], "rejected": p["response_0"], "pid": pid},
                      {"prompt": p["prompt"], "chosen": c["candidate"], "rejected": p["response_1"], "pid": pid}]
        parts.write_jsonl("rewards.jsonl", reward_rows)
        parts.write_jsonl("survivors.jsonl", survivors)
        parts.write_jsonl("pairs.jsonl", pairs)
        counts = {"conflicting_prompts": len(pids), "candidates": len(cands),
                  "rewrites_kept": sum(bool(c.get("rewritten")) for c in cands),
                  "survivors": sel.num_survivors, "prompts_covered": sel.prompts_covered, "pairs": len(pairs),
                  "reward_models": names, "margins": margin_counts(cand, r_a, r_b, valid, names)}
        log.info("filter: %d candidates (%d rewrites kept) -> %d strictly dominating -> %d prompts covered "
                 "(of %d), %d pairs in D_c", counts["candidates"], counts["rewrites_kept"], counts["survivors"],
                 counts["prompts_covered"], counts["conflicting_prompts"], counts["pairs"])
        return counts

    @staticmethod
    def _reward_models(ctx, policies: Policies):
        """The K implicit reward models: the N policies plus one DPO soup per soup weight."""
        cfg = ctx.config
        objectives = list(cfg.data.objectives)
        if not cfg.filter.soups:
            return policies.reward_models(), objectives
        soup_names = [f"soup{i}" for i in range(len(cfg.soup_weights))]
        if policies.names is not None:
            from sipo_fast.merging import lora_soup

            for name, w in zip(soup_names, cfg.soup_weights):
                lora_soup(policies.model, objectives, w, name)  # exact ΔW interpolation (rank-concatenated)
            return (policies.model, objectives + soup_names), objectives + soup_names
        from sipo_fast.merging import full_soup

        soups = [full_soup(policies.models, w) for w in cfg.soup_weights]
        return list(policies.models) + soups, objectives + soup_names


# ----------------------------------------------------------------------------------------------------------------
# stage 3


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
                model, history = train(
                    ctx, start, pairs_k, objective=obj, loss=f.loss, beta=f.beta, alpha=f.alpha, lr=f.learning_rate,
                    epochs=f.epochs, max_steps=f.max_steps, batch_size=f.batch_size, grad_accum=f.grad_accum,
                    max_length=f.max_length, use_lora=cfg.align.use_lora, eval_pairs=held, select_best=f.select_best,
                    eval_steps=f.eval_steps, scratch=scratch, ref=ref, optim=optimiser_args(f))
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


# ----------------------------------------------------------------------------------------------------------------
# evaluation


class EvalStage(Stage):
    """Evaluation: :func:`sipo_fast.pipeline.compare.evaluate_run` on this run directory, i.e. MOD sweeps of the fine-tuned
    policies ("sipo") and of the baselines (eval.baselines) over the weights, scored by the ground-truth scorers
    on held-out prompts, with the pipeline diagnostics; writes report.md, report.png and sweeps/<method>.json."""

    name = "eval"
    upstream = ("align", "finetune")
    config_keys = ("seed", "model", "data.source", "data.objectives", "sample.weights", "eval")

    def run(self, ctx, parts, inputs):
        from .compare import evaluate_run

        cfg = ctx.config
        # Sweeps already in the work directory (an interrupted evaluation) are reused by evaluate_run, which
        # fingerprints each method's inputs and settings.
        result = evaluate_run(ctx.run_dir.root, methods=["sipo", *cfg.eval.baselines], weights=cfg.eval.weights,
                              num_prompts=cfg.eval.num_prompts, max_new_tokens=cfg.eval.max_new_tokens,
                              batch_size=cfg.eval.batch_size, scorers=cfg.eval.scorers,
                              baseline="mod" if "mod" in cfg.eval.baselines else None, out_dir=parts.work,
                              progress=ctx.progress)
        means = {r.method: [round(x, 6) for x in r.summary()[0].mean(axis=0).tolist()] for r in result.results}
        return {"prompts": len(result.results[0].prompts), "weights": len(result.results[0].weights),
                "methods": list(means), "mean_scores_over_weights": means, "report": "report.md"}


STAGES: tuple[Stage, ...] = (AlignStage(), SampleStage(), RefineStage(), FilterStage(), FinetuneStage(), EvalStage())
