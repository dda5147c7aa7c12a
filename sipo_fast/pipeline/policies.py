"""Policies and the operations stages share on them: loading the per-objective policies, MOD generation,
implicit rewards of (prompt, response) pairs, preference training on sipo_fast's TRL trainer, and saving
adapters so that equal adapters give equal bytes.

Everything model-facing goes through the issue-3/4 APIs (``sipo_fast.decoding.MODDecoder``,
``sipo_fast.training``) and ``sipo_fast.merging``; this module only wires them to the run directory.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .context import Context
from .rundir.files import read_jsonl
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


def all_weights_parts(ctx, parts, prompts: list[dict], weights: list, load, *, max_new_tokens: int,
                      batch_size: int) -> list[dict]:
    """Sample's greedy loop: every weight vector of W decoded in one MOD batch per ``batch_size`` prompts, the
    rows of one prompt sharing its prefill (the decoder's prompt dedupe over the shared KV cache), where a loop
    over W would prefill every prompt |W| times, in |W| batches of 1/|W| the rows. Greedy decoding makes the
    texts those of per-weight decoding up to float rounding (tests/test_pipeline_stages.py compares them).

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

    def decode(batch: list[str]) -> list[str]:
        rows = [t for t in batch for _ in weights]
        outs = loaded[1].generate_text(rows, weights=[w for _ in batch for w in weights], template=template,
                                       max_new_tokens=max_new_tokens, batch_size=len(rows), progress=False)
        return [o.text for o in outs]

    groups = range(0, len(todo), dist.world)
    for g in tqdm(groups, desc="sample (all weights)", unit="batch", disable=not ctx.progress or not dist.is_main):
        group = todo[g:g + dist.world]
        if not loaded:
            policies = load()
            loaded += [policies, policies.decoder(ctx)]
        outs = dist.merge({j: decode(batches[group[j]]) for j in dist.mine(len(group))}, len(group))
        for k, out in zip(group, outs):
            S = len(weights)
            parts.save_part_jsonl(f"parts/b{k}.jsonl", [{"prompt": t, "weight_index": s, "candidate": out[i * S + s]}
                                                   for i, t in enumerate(batches[k]) for s in range(S)])
    done = {(r["prompt"], r["weight_index"]): r["candidate"]
            for k in range(len(batches)) for r in read_jsonl(parts.path(f"parts/b{k}.jsonl"))}
    rows = [{"pid": p["pid"], "weight_index": wi, "weight": w, "candidate": done[(p["prompt"], wi)]}
            for p in prompts for wi, w in enumerate(weights)]
    rows.sort(key=lambda r: (r["pid"], r["weight_index"]))
    parts.write_jsonl("candidates.jsonl", rows)
    parts.remove("parts")
    return rows


def generate(ctx: Context, decoder, prompts: list[str], weights: list[float], *, max_new_tokens: int,
             template: str | None = None, batch_size: int, do_sample: bool = False, temperature: float = 1.0,
             top_p: float = 1.0, seed: int | None = None, desc: str = "MOD") -> list[str]:
    """MOD generation (``MODDecoder.generate_text``) of one response per prompt at one weight vector.

    Greedy decoding of a repeated prompt (HelpSteer pairs share prompts) gives the same text, so each distinct
    prompt is decoded once; with sampling every row is decoded on its own. Under several processes the
    batches are split over the ranks and gathered (:func:`.distributed.generate_text`): every rank returns
    the texts one process would.
    """
    from sipo_fast.distributed import generate_text

    if not prompts:
        return []
    todo = list(prompts) if do_sample else list(dict.fromkeys(prompts))
    log.info("%s: %d prompts, up to %d new tokens", desc, len(todo), max_new_tokens)
    kwargs = dict(weights=weights, max_new_tokens=max_new_tokens, template=template or ctx.config.model.template,
                  batch_size=batch_size, progress=ctx.progress)
    if do_sample:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, seed=seed)
    texts = [o.text for o in generate_text(decoder, todo, **kwargs)]
    if do_sample:
        return texts
    by_prompt = dict(zip(todo, texts))
    return [by_prompt[p] for p in prompts]


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
    from sipo_fast.training import implicit_rewards

    from sipo_fast.distributed import batched, current

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


def clean_metrics(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if not any(s in k for s in _VOLATILE)} for row in history]


def train(ctx: Context, model, pairs: list[dict], *, objective: str, loss: str, beta: float, alpha: float,
           lr: float, epochs: float, max_steps: int, batch_size: int, grad_accum: int, max_length: int,
           use_lora: bool, eval_pairs: list[dict] | None, select_best: bool, eval_steps: float | None, scratch: Path,
           ref=None, optim: dict | None = None, **trainer_kw):
    """One preference run on sipo_fast's TRL trainer (fused log-probs); returns (trained model, TRL log
    history, whose metric names are TRL's plus ``rewards/<objective>/...``). ``optim``: transformers'
    optimiser arguments (:func:`optimiser_args`); ``trainer_kw``: more ``build_preference_trainer`` arguments
    (the MODPO / DPO LW weights)."""
    from datasets import Dataset

    from sipo_fast.training import build_preference_trainer

    extra = dict(max_steps=max_steps, gradient_accumulation_steps=grad_accum, disable_tqdm=not ctx.progress,
                 objective_names=[objective], logging_steps=1, **(optim or {}))
    extra.update(trainer_kw)
    if eval_pairs and eval_steps is not None:
        extra.update(eval_strategy="steps", eval_steps=eval_steps, save_strategy="steps", save_steps=eval_steps)
    if eval_pairs and not select_best:
        extra.update(load_best_model_at_end=False, save_strategy="no", save_total_limit=None)
    trainer = build_preference_trainer(
        model, ref, Dataset.from_list(pairs), ctx.tokenizer, loss_type=loss, beta=beta, alpha=alpha, lr=lr,
        epochs=epochs, batch_size=batch_size, max_length=max_length,
        lora_config=lora_config(ctx) if use_lora else None, output_dir=str(scratch),
        template=ctx.config.model.template, eval_dataset=Dataset.from_list(eval_pairs) if eval_pairs else None,
        seed=ctx.config.seed, **extra)
    trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model), list(trainer.state.log_history)


def optimiser_args(section) -> dict:
    """transformers' arguments for a config section's optimiser recipe (align or finetune). transformers 5 reads a
    ``warmup_steps`` below 1 as a share of the steps (its ``warmup_ratio`` is gone), which warmup_ratio always is."""
    return {"lr_scheduler_type": section.lr_scheduler, "warmup_steps": float(section.warmup_ratio),
            "weight_decay": section.weight_decay}


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
