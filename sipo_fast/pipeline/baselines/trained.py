"""Baselines that train one model per interior weight (SIPO.md §4): MODPO and DPO LW.

Both train a LoRA adapter from π_ref with stage 1's recipe (LoRA shape, learning rate and schedule, epochs, β,
batch, best-checkpoint rule on stage 1's held-out pairs) on stage 1's training rows (``align/train.jsonl``):

- ``modpo``: objective k (the first with w_k > 0) on its own pairs with the reward
  r_θ = (1/w_k)[β log π_θ/π_ref − w_{−k}ᵀ r_φ], r_φ the other objectives' stage-1 implicit rewards.
- ``dpo_lw``: every pair once, trained on Σ_i w_i · DPO_i, objective i's pair being the same pair flipped where
  it prefers the other response (the authors' scripts/baselines/dpolw.py, src/trainer/dpolw_trainer.py).

At a one-hot weight both reduce to DPO on that objective, i.e. the stage-1 policy, which is used there. Adapters
live under ``<comparison>/<method>/<key>/w<weights>/``, the key hashing the stage-1 artifact and config, so a
re-run stage 1 trains fresh models. :func:`trained_policy_for` gives the sweep its ``policy_for(w)``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from sipo_fast.distributed import current

log = logging.getLogger("sipo_fast.eval")
TRAINED = ("modpo", "dpo_lw")


def _modpo_split(w: Sequence[float]) -> tuple[int, list[int]]:
    """MODPO trains objective k = the first with w_k > 0; the others are margins."""
    k = next(i for i, x in enumerate(w) if x > 0)
    return k, [j for j in range(len(w)) if j != k]


def modpo_margins(ctx, align_dir: Path, k: int, cache_dir: Path) -> dict[str, list[dict]]:
    """Objective k's preference pairs ("train" and "eval" splits of stage 1) with the margin rewards r_φ of
    every other objective: r_j(x, y) = β (log π_j(y|x) − log π_ref(y|x)) on chosen and rejected, under the
    stage-1 policies, and π_ref's log-probs of both (the trainer's reference columns). They do not depend on the
    weight, so they are computed once per k and kept in ``cache_dir/margins_k<k>.json`` for every MODPO weight."""
    from sipo_fast.data.formatting import encode_pairs
    from sipo_fast.training import implicit_rewards, with_reference

    from ..policies import load_policies, preference_pairs, stage1_reference
    from ..rundir.files import atomic_write_json, read_jsonl

    path = cache_dir / f"margins_k{k}.json"
    cached = current().on_main(lambda: json.loads(path.read_text()) if path.exists() else None)
    if cached is not None:
        return cached
    cfg, objectives = ctx.config, list(ctx.config.data.objectives)
    others = [j for j in range(len(objectives)) if j != k]
    splits = {s: preference_pairs(read_jsonl(align_dir / f"{s}.jsonl"), objectives[k]) for s in ("train", "eval")}
    pairs = splits["train"] + splits["eval"]
    policies = load_policies(ctx, align_dir / "policies")
    ref = None if policies.names is not None else policies.reference
    pol = ((policies.model, [objectives[j] for j in others]) if policies.names is not None
           else [policies.models[j] for j in others])
    # One scoring batch: every chosen response, then every rejected one.
    batch = encode_pairs(ctx.tokenizer, [p["prompt"] for p in pairs] * 2,
                         [p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], cfg.model.template,
                         max_length=cfg.align.max_length)
    r = implicit_rewards(pol, ref, batch, beta=cfg.align.beta, batch_size=cfg.filter.batch_size,
                         progress=ctx.progress)                                   # (2·pairs, N−1)
    rows = [{**p, "chosen_margin_rewards": r[i].tolist(), "rejected_margin_rewards": r[len(pairs) + i].tolist()}
            for i, p in enumerate(pairs)]
    # π_ref's log-probs too: every MODPO weight trains from π_ref on these pairs, so they are computed once here.
    rows = with_reference(rows, stage1_reference(ctx, read_jsonl(align_dir / "train.jsonl") +
                                                 read_jsonl(align_dir / "eval.jsonl")))
    out = {"train": rows[: len(splits["train"])], "eval": rows[len(splits["train"]):]}
    current().on_main(lambda: atomic_write_json(path, out))
    return out


def dpo_lw_pairs(rows: list[dict], objectives: list[str]) -> list[dict]:
    """Normalised rows -> one DPO LW example each: (chosen, rejected) as the first objective prefers, and
    ``objective_signs`` s_i = +1 where objective i agrees with it, −1 where it prefers the other response."""
    first = f"pref_{objectives[0]}"
    return [{"prompt": r["prompt"], "chosen": r[f"response_{r[first]}"], "rejected": r[f"response_{1 - r[first]}"],
             "objective_signs": [1 if r[f"pref_{o}"] == r[first] else -1 for o in objectives]} for r in rows]


def _train_lora(ctx, train_rows: list[dict], held: list[dict], out: Path, scratch: Path, **fields) -> Path:
    """Train one LoRA adapter from π_ref with stage 1's recipe and save it to ``out`` (rank 0, atomically).
    ``fields``: the run's loss and weights (``FusedDPOConfig`` fields)."""
    from ..policies import train, training_args

    if not ctx.config.align.use_lora:
        raise ValueError("the MODPO and DPO LW baselines are implemented for LoRA runs (align.use_lora=true)")
    held = held if ctx.config.align.select_best and held else None
    args = training_args(ctx, ctx.config.align, scratch, evaluate=bool(held), **fields)
    model, _ = train(ctx, ctx.load_base(), train_rows, args=args, eval_pairs=held)

    def save() -> None:  # rank 0 writes (the trainer ran data-parallel on every rank)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)  # a killed run leaves no half-written adapter under the final name
        shutil.rmtree(scratch, ignore_errors=True)
    current().on_main(save)
    return out


def train_modpo(ctx, align_dir: Path, w: Sequence[float], out: Path, *, scratch: Path) -> Path:
    """Train one MODPO policy at weight ``w`` (SIPO.md §4) and save its LoRA adapter to ``out``.

    Objective k (the first with w_k > 0) is trained on its own pairs from ``align/train.jsonl`` with
    r_θ = (1/w_k)[β log π_θ/π_ref − w_{−k}ᵀ r_φ], where r_φ are the implicit rewards β log π_j/π_ref of the
    other objectives' stage-1 policies (:func:`modpo_margins`).
    """
    objectives = list(ctx.config.data.objectives)
    k, others = _modpo_split(w)
    data = modpo_margins(ctx, align_dir, k, out.parent)
    log.info("modpo: w=%s, objective %r with margins %s, %d pairs", list(w), objectives[k],
             [objectives[j] for j in others], len(data["train"]))
    return _train_lora(ctx, data["train"], data["eval"], out, scratch, loss_type=["modpo"], modpo_weight=float(w[k]),
                       modpo_margin_weights=[float(w[j]) for j in others],
                       objective_names=[objectives[j] for j in [k, *others]])


def train_dpo_lw(ctx, align_dir: Path, w: Sequence[float], out: Path, *, scratch: Path) -> Path:
    """Train one DPO LW policy at weight ``w`` (SIPO.md §4): Σ_i w_i · DPO_i on every stage-1 training pair, the
    best checkpoint chosen by the same weighted loss on stage 1's held-out pairs; save its adapter to ``out``."""
    from ..rundir.files import read_jsonl

    objectives = list(ctx.config.data.objectives)
    train_rows = dpo_lw_pairs(read_jsonl(align_dir / "train.jsonl"), objectives)
    held = dpo_lw_pairs(read_jsonl(align_dir / "eval.jsonl"), objectives)
    log.info("dpo_lw: w=%s on %d pairs", list(w), len(train_rows))
    return _train_lora(ctx, train_rows, held, out, scratch, loss_type=["dpo_lw"], objective_names=["weighted"],
                       dpo_lw_weights=[float(x) for x in w])


_TRAINERS = {"modpo": train_modpo, "dpo_lw": train_dpo_lw}


def trained_key(ctx, run_dir: Path) -> str:
    """The trained baselines belong to one set of stage-1 data/policies and one training config: a re-run stage 1
    gets a fresh key (directory) instead of reusing models trained against the old one."""
    from ..rundir.directory import RunDir
    from ..rundir.files import stable_hash

    return stable_hash({"align": RunDir(run_dir).entry("align")["artifact"], "config": ctx.config.get("align"),
                        "seed": ctx.config.seed, "template": ctx.config.model.template})


def trained_policy_for(ctx, run_dir: Path, out_dir: Path, method: str):
    """``policy_for(w)``: stage-1 policy k at a one-hot weight (both methods reduce to DPO on objective k there;
    MODPO's optimum as w_k → 0 is the margin objective's own DPO policy), an adapter of ``method`` elsewhere,
    trained on first use and kept under ``out_dir/<method>/<key>``. All share one base model."""
    from peft import PeftModel

    if not ctx.config.align.use_lora:
        raise ValueError(f"the {method} baseline is implemented for LoRA runs (align.use_lora=true)")
    align, root = run_dir / "align", out_dir / method / trained_key(ctx, run_dir)
    objectives = list(ctx.config.data.objectives)
    state: dict = {}

    def policy_for(w: list[float]):
        if max(w) == 1.0:
            k = int(np.argmax(w))
            path, name = align / "policies" / objectives[k], f"stage1_{k}"
        else:
            path = root / f"w{'_'.join(f'{x:g}' for x in w)}"
            name = path.name.replace(".", "p")
            if not current().on_main(lambda: (path / "adapter_config.json").exists()):
                root.mkdir(parents=True, exist_ok=True)
                _TRAINERS[method](ctx, align, w, path, scratch=root / ".scratch")
        if "model" not in state:
            state["model"] = PeftModel.from_pretrained(ctx.load_base(), path, adapter_name=name).eval()
        elif name not in state["model"].peft_config:
            state["model"].load_adapter(path, adapter_name=name)
        return state["model"], name
    return policy_for
