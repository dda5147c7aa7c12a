"""The per-objective policies and what stages and baselines do with them: load them (:class:`Policies`,
:func:`load_policies`), train one on preference pairs (:func:`train`, sipo_fast's TRL trainer), save it so that
equal adapters give equal bytes, and compute π_ref's log-prob tables once for every run that trains from it
(:func:`stage1_reference`, :func:`stage3_reference`).
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .context import Context
from .rundir.parts import Parts

log = logging.getLogger("sipo_fast.pipeline")
# Trainer metrics that measure speed, not the model; they vary run to run and stay out of hashed artifacts.
_VOLATILE = ("runtime", "per_second", "flos", "epoch_time")


def preference_pairs(rows: list[dict], objective: str) -> list[dict]:
    """(prompt, chosen, rejected) rows for one objective from normalised rows (pref_<objective> = 0/1)."""
    key = f"pref_{objective}"
    return [{"prompt": r["prompt"], "chosen": r[f"response_{r[key]}"], "rejected": r[f"response_{1 - r[key]}"]}
            for r in rows]


def stage1_reference(ctx: Context, rows: list[dict]) -> dict:
    """π_ref's log-probs of both responses of every stage-1 row (:func:`sipo_fast.training.reference_table`),
    computed once for all the runs that train from π_ref on these rows: each objective's DPO (the same
    sequences, ordered by another preference) and MODPO at every weight."""
    from sipo_fast.training import reference_table

    a = ctx.config.align
    pairs = [{"prompt": r["prompt"], "chosen": r["response_0"], "rejected": r["response_1"]} for r in rows]
    log.info("reference log-probs of %d pairs, once for every run from π_ref", len(pairs))
    return reference_table(ctx.load_base(), pairs, ctx.tokenizer, template=ctx.config.model.template,
                           max_length=a.max_length, batch_size=2 * a.batch_size)


def stage3_reference(ctx: Context, model, pairs: list[dict], held: list[dict] | None) -> dict:
    """π_k's log-probs (stage 3's reference is the stage-1 policy itself) of D_c and the held-out pairs, once,
    before training (:func:`sipo_fast.training.reference_table`): y_c, the chosen side of two pairs, is scored
    once and each prompt runs once per batch, where the trainer's own reference forward would score every
    row of every step."""
    from sipo_fast.training import reference_table

    f = ctx.config.finetune
    return reference_table(model, pairs + (held or []), ctx.tokenizer, template=ctx.config.model.template,
                           max_length=f.max_length, batch_size=2 * f.batch_size)


def lora_config(ctx: Context):
    from peft import LoraConfig

    a = ctx.config.align
    return LoraConfig(r=a.lora_r, lora_alpha=a.lora_alpha, lora_dropout=a.lora_dropout,
                      target_modules=list(a.target_modules), bias="none", task_type="CAUSAL_LM")


@dataclass
class Policies:
    """N per-objective policies: adapters ``names`` of one PeftModel (LoRA), or full ``models``.

    ``reference`` is π_ref for implicit rewards: None for LoRA (the PEFT base with adapters disabled).
    """

    model: torch.nn.Module
    names: list[str] | None = None
    models: list[torch.nn.Module] | None = None
    reference: torch.nn.Module | None = None

    def decoder(self, ctx: Context):
        from sipo_fast.decoding import MODDecoder

        if self.names is not None:
            return MODDecoder(self.model, ctx.tokenizer, adapter_names=list(self.names))
        return MODDecoder(list(self.models), ctx.tokenizer)

    def reward_models(self):
        """The ``policies`` argument of ``implicit_rewards`` for the N policies."""
        return (self.model, list(self.names)) if self.names is not None else list(self.models)


def load_policies(ctx: Context, policy_dir: Path) -> Policies:
    """Load the per-objective policies saved under ``policy_dir/<objective>`` onto a fresh π_ref."""
    objectives = ctx.config.data.objectives
    base = ctx.load_base()
    if ctx.config.align.use_lora:
        from sipo_fast.models import load_adapters

        return Policies(model=load_adapters(base, [policy_dir / o for o in objectives], objectives),
                        names=list(objectives))
    from sipo_fast.models import load_full_models

    models = load_full_models([policy_dir / o for o in objectives], dtype=ctx.dtype, device=ctx.device)
    return Policies(model=base, models=models, reference=base)


def clean_metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not any(s in k for s in _VOLATILE)} for row in history]


def training_args(ctx: Context, section, scratch: Path, *, evaluate: bool, **fields):
    """``section.trainer_config`` (align's or finetune's recipe, :mod:`..config.sections`) for one run of this
    invocation: its seed, prompt template and progress bars, checkpoints under ``scratch``."""
    return section.trainer_config(output_dir=scratch, seed=ctx.config.seed, prompt_template=ctx.config.model.template,
                                  evaluate=evaluate, disable_tqdm=not ctx.progress, **fields)


def train(ctx: Context, model, pairs: list[dict], *, args, eval_pairs: list[dict] | None = None, ref=None):
    """One preference run of sipo_fast's TRL trainer (fused log-probs) with ``args``, the run's whole
    ``FusedDPOConfig`` (:func:`training_args`), on a fresh LoRA adapter (:func:`lora_config`) unless
    align.use_lora is false. Returns (trained model, TRL log history, whose metric names are TRL's plus
    ``rewards/<objective>/...``)."""
    from datasets import Dataset

    from sipo_fast.training import FusedDPOTrainer

    if bool(eval_pairs) != (args.eval_strategy != "no"):
        raise ValueError(f"{len(eval_pairs or [])} held-out pairs but eval_strategy={args.eval_strategy!r}: build the "
                         "arguments with evaluate=bool(eval_pairs)")
    trainer = FusedDPOTrainer(model, ref, args, train_dataset=Dataset.from_list(pairs),
                              eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
                              processing_class=ctx.tokenizer,
                              peft_config=lora_config(ctx) if ctx.config.align.use_lora else None)
    trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model), list(trainer.state.log_history)


def canonical_adapter_config(path: Path) -> None:
    """PEFT keeps target_modules as a set and writes it in hash order, which changes between processes; sort
    it so that equal adapters give equal bytes (and equal artifact hashes)."""
    cfg_path = path / "adapter_config.json"
    if cfg_path.exists():
        cfg = json.loads(cfg_path.read_text())
        if isinstance(cfg.get("target_modules"), list):
            cfg["target_modules"] = sorted(cfg["target_modules"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def save_model(model, metrics: list[dict]):
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        canonical_adapter_config(tmp)
        (tmp / "train_metrics.json").write_text(json.dumps(clean_metrics(metrics), indent=1, sort_keys=True))
    return write


def copy_policy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> None:
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith(".") and f.name not in skip:
            shutil.copy2(f, dst / f.name)


def log_metrics(parts: Parts, objective: str, history: list[dict]) -> None:
    """TRL's metric names, per objective, in the (unhashed) logs of the stage (rank 0 writes them)."""
    if not parts.dist.is_main:
        return
    logs = parts.work / "logs"
    logs.mkdir(exist_ok=True)
    with open(logs / "metrics.jsonl", "a") as fh:
        for row in history:
            fh.write(json.dumps({"stage": parts.stage, "objective": objective, **row}) + "\n")


def final_metrics(policy_dir: Path) -> dict:
    path = policy_dir / "train_metrics.json"
    if not path.exists():
        return {}
    history = json.loads(path.read_text())
    out = {}
    for row in history:  # later rows win: the last train log and the last (or best) eval
        out.update({k: v for k, v in row.items()
                    if k.startswith(("eval_", "rewards/", "logps/", "nll/", "loss", "train_loss"))})
    return out
