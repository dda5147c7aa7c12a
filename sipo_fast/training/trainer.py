"""TRL's ``DPOTrainer`` with SIPO's losses and the fused log-probs: stage 1 (DPO per objective) and stage 3
(SIPO fine-tuning) of SIPO.md §3, plus MODPO (§4).

What the subclass changes, and why:
  * ``_compute_loss``: log-probs of the concatenated [chosen; rejected] batch come from
    :func:`sipo_fast.training.sequence_logprobs` (backbone hidden states → fused ``token_logprobs`` with the LM
    head weight; no [B, T, V] float32 logits), and the loss is one of ``LOSS_TYPES``:
      - ``"sigmoid"``: plain DPO, identical to TRL's ``loss_type="sigmoid"``;
      - ``"sipo"``: DPO + α · NLL(y_c)/|y_c| per example (α = ``sipo_alpha``), SIPO.md §2. TRL's
        ``["sigmoid", "sft"]`` averages the NLL over all chosen tokens of the batch instead;
      - ``"modpo"``: SIPO.md §4, with margin rewards r_φ from the dataset columns
        ``chosen_margin_rewards`` / ``rejected_margin_rewards`` (a float or a list of N-1 floats per row),
        weights ``modpo_weight`` (w_k) and ``modpo_margin_weights`` (w_{-k});
      - ``"dpo_lw"``: Σ_i w_i · DPO_i on one pair (SIPO.md §4), with objective i's orientation from the dataset
        column ``objective_signs`` (N values ±1 per row) and weights ``dpo_lw_weights``.
  * ``_prepare_dataset``: string prompts are tokenised with sipo_fast's convention (``prompt_template``, prompt
    and response tokenised separately, EOS appended; ``sipo_fast.data.formatting``), so training scores the
    same tokens as the decoder and the filter. TRL instead tokenises prompt+completion as one string and splits
    at the common prefix; conversational (message-list) datasets still go through TRL's own tokenisation.
  * Logging keeps TRL's names (``rewards/chosen``, ``rewards/rejected``, ``rewards/accuracies``,
    ``rewards/margins``, ``logps/chosen``, ``logps/rejected``) and adds one set per objective:
    ``rewards/<objective>/{chosen,rejected,margins,accuracies}`` for the trained objective (the implicit reward)
    and for each margin-reward column. ``sipo`` also logs ``loss/dpo`` and ``nll/chosen``. TRL's token-level
    extras (entropy, logits/*, mean_token_accuracy) need the full logits and are not logged.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

from sipo_fast.data.formatting import encode_prompts
from sipo_fast.training.backbone import is_peft
from sipo_fast.training.logprobs import sequence_logprobs
from sipo_fast.training.losses import dpo_loss, dpo_lw_loss, modpo_loss, sipo_loss

logger = logging.getLogger(__name__)
LOSS_TYPES = ("sigmoid", "sipo", "modpo", "dpo_lw")
MARGIN_COLUMNS = ("chosen_margin_rewards", "rejected_margin_rewards")
SIGNS_COLUMN = "objective_signs"
# TRL's names for precomputed reference log-probs: its collator stacks them, its dataset pass keeps them.
REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class FusedDPOConfig(DPOConfig):
    """``DPOConfig`` plus SIPO's fields. Inherited fields keep TRL's meaning (``beta``, ``max_length``, ...).

    Args:
        loss_type: one of "sigmoid" (DPO), "sipo" (DPO + α·NLL/|y_c|), "modpo"; a one-element list is accepted.
        sipo_alpha: α of the SIPO loss (0.1 in the paper).
        modpo_weight: w_k > 0, weight of the trained objective (required for "modpo").
        modpo_margin_weights: w_{-k}, one weight per margin-reward column (required for "modpo").
        dpo_lw_weights: w, one weight per objective (required for "dpo_lw").
        objective_names: names for the per-objective metrics: [trained objective, margin objectives...].
        prompt_template: how a string prompt is rendered (``sipo_fast.data.formatting``): "none" (default, TRL's
            behaviour: the text as is, so ``DPOConfig`` recipes give TRL's numbers), "chat" (the tokenizer's chat
            template, which SIPO's pipeline asks for) or a format string with ``{prompt}``.
        logprobs_chunk_size: rows per chunk of the fused log-prob op (None: automatic).
        logprobs_backend: None/"auto" (the process default), "triton", "cpu" or "ref" for the fused log-prob op.
    """

    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"],
                                 metadata={"help": "One of 'sigmoid' (DPO), 'sipo', 'modpo'."})
    sipo_alpha: float = field(default=0.1, metadata={"help": "α of the SIPO loss: DPO + α·NLL(y_c)/|y_c|."})
    modpo_weight: float | None = field(default=None, metadata={"help": "MODPO: w_k of the trained objective."})
    modpo_margin_weights: list[float] | None = field(default=None, metadata={"help": "MODPO: w_{-k}."})
    dpo_lw_weights: list[float] | None = field(default=None, metadata={"help": "DPO LW: one weight per objective."})
    objective_names: list[str] | None = field(default=None, metadata={"help": "Names for per-objective metrics."})
    prompt_template: str = field(default="none", metadata={"help": "'none' (TRL's: the prompt as is), 'chat' or a "
                                                                   "format string."})
    logprobs_chunk_size: int | None = field(default=None, metadata={"help": "Rows per fused log-prob chunk."})
    logprobs_backend: str | None = field(default=None, metadata={"help": "auto, triton, cpu or ref."})

    def __post_init__(self):
        super().__post_init__()
        if len(self.loss_type) != 1 or self.loss_type[0] not in LOSS_TYPES:
            raise ValueError(f"FusedDPOConfig.loss_type={self.loss_type}: choose one of {', '.join(LOSS_TYPES)} "
                             "(for TRL's other losses use trl.DPOTrainer)")
        unsupported = {"label_smoothing": self.label_smoothing != 0.0, "ld_alpha": self.ld_alpha is not None,
                       "use_weighting": self.use_weighting, "loss_weights": self.loss_weights is not None,
                       "f_divergence_type": self.f_divergence_type != "reverse_kl"}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"FusedDPOTrainer implements SIPO's exact losses and does not support {bad}; leave "
                             "them at their defaults or use trl.DPOTrainer")
        if self.sipo_alpha < 0:
            raise ValueError(f"sipo_alpha must be >= 0, got {self.sipo_alpha}")
        if self.loss_type[0] == "modpo":
            if self.modpo_weight is None or not self.modpo_weight > 0 or not self.modpo_margin_weights:
                raise ValueError("loss_type='modpo' needs modpo_weight > 0 (w_k) and modpo_margin_weights (w_-k, one "
                                 "per margin-reward column)")
        if self.loss_type[0] == "dpo_lw" and (not self.dpo_lw_weights or min(self.dpo_lw_weights) < 0):
            raise ValueError("loss_type='dpo_lw' needs dpo_lw_weights: one weight >= 0 per objective")


class _PreferenceCollator(DataCollatorForPreference):
    """TRL's preference collator, also stacking the margin-reward columns into [B, N-1] float tensors and the
    DPO LW signs into a [B, N] tensor."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().torch_call(examples)
        for col in MARGIN_COLUMNS:
            if col in examples[0]:
                rows = [e[col] if isinstance(e[col], (list, tuple)) else [e[col]] for e in examples]
                out[col] = torch.tensor(rows, dtype=torch.float32)  # (B, N-1)
        if SIGNS_COLUMN in examples[0]:
            out[SIGNS_COLUMN] = torch.tensor([e[SIGNS_COLUMN] for e in examples], dtype=torch.float32)  # (B, N)
        return out


def tokenize_pairs(dataset, tokenizer, template: str, max_length: int | None, name: str = "train"):
    """The trainer's tokenisation of (prompt, chosen, rejected) rows: the prompt through ``template``, each
    response followed by EOS; rows whose prompt fills ``max_length`` are dropped (nothing to learn from, as TRL)."""
    eos = [tokenizer.eos_token_id]

    def tokenize(example):
        return {"prompt_ids": encode_prompts(tokenizer, [example["prompt"]], template)[0],
                "chosen_ids": tokenizer(example["chosen"], add_special_tokens=False)["input_ids"] + eos,
                "rejected_ids": tokenizer(example["rejected"], add_special_tokens=False)["input_ids"] + eos}

    kw = {"desc": f"Tokenizing {name} dataset"} if isinstance(dataset, Dataset) else {}
    dataset = dataset.map(tokenize, **kw)
    if max_length is not None:
        n = len(dataset) if isinstance(dataset, Dataset) else None
        dataset = dataset.filter(lambda e: len(e["prompt_ids"]) < max_length)
        if n is not None and len(dataset) < n:
            logger.warning("%s: dropped %d examples whose prompt fills max_length=%d", name, n - len(dataset),
                           max_length)
    return dataset


class FusedDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` computing log-probs with the fused op and SIPO's exact losses (see module docstring).

    Same constructor as ``DPOTrainer``, with ``args`` a :class:`FusedDPOConfig` and ``processing_class`` the
    tokenizer (required). With ``ref_model=None`` and no PEFT, a frozen copy of ``model`` is the reference (TRL
    would reload it from ``config._name_or_path``, which a model built in memory does not have).
    """

    def __init__(self, model, ref_model=None, args: FusedDPOConfig | None = None, data_collator=None, *,
                 processing_class=None, **kwargs):
        if not isinstance(args, FusedDPOConfig):
            raise ValueError("FusedDPOTrainer needs args=FusedDPOConfig(...)")
        if processing_class is None:
            raise ValueError("FusedDPOTrainer needs processing_class=<tokenizer>")
        if (ref_model is None and not is_peft(model) and kwargs.get("peft_config") is None
                and not args.precompute_ref_log_probs):
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        if data_collator is None:
            pad = processing_class.pad_token_id
            data_collator = _PreferenceCollator(
                pad_token_id=pad if pad is not None else processing_class.eos_token_id, max_length=args.max_length,
                truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(model, ref_model, args, data_collator, processing_class=processing_class, **kwargs)

    # ---- data -------------------------------------------------------------------------------------------------
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        first = next(iter(dataset))
        if "prompt_ids" in first:  # already tokenised (TRL calls this again from evaluate())
            return dataset
        if not all(isinstance(first.get(k), str) for k in ("prompt", "chosen", "rejected")):
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        return tokenize_pairs(dataset, self._tokenizer, args.prompt_template, args.max_length, dataset_name)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if not self._is_vision_dataset:
            self._signature_columns = list(dict.fromkeys([*self._signature_columns, *MARGIN_COLUMNS, SIGNS_COLUMN]))

    # ---- log-probs --------------------------------------------------------------------------------------------
    def _logps(self, model, inputs) -> torch.Tensor:
        """[2B] log π(y|x) of the concatenated [chosen; rejected] batch (TRL's collator layout)."""
        return sequence_logprobs(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"],
                                 chunk_size=self.args.logprobs_chunk_size, backend=self.args.logprobs_backend)

    @torch.no_grad()
    def _ref_logps(self, inputs) -> torch.Tensor:
        with disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft(self.accelerator.unwrap_model(self.model)):
                peft_model = self.accelerator.unwrap_model(self.model)
                # New adapter: the base is the reference; re-trained adapter: TRL made a frozen copy named "ref".
                with use_adapter(peft_model, adapter_name="ref" if "ref" in peft_model.peft_config else None):
                    return self._logps(self.model, inputs)
            return self._logps(self.ref_model if self.ref_model is not None else self.model, inputs)

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs for TRL's ``precompute_ref_log_probs`` pass, through the fused path."""
        return self._ref_logps(inputs).chunk(2, dim=0)

    # ---- loss and metrics ------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        mode = "train" if self.model.training else "eval"
        chosen_logps, rejected_logps = self._logps(model, inputs).chunk(2, dim=0)  # batch is [chosen; rejected]
        if self.precompute_ref_logps or REF_COLUMNS[0] in inputs:  # TRL's pass, or reference_table's columns
            ref_chosen, ref_rejected = inputs[REF_COLUMNS[0]], inputs[REF_COLUMNS[1]]
        else:
            ref_chosen, ref_rejected = self._ref_logps(inputs).chunk(2, dim=0)
        ref_chosen, ref_rejected = ref_chosen.to(chosen_logps), ref_rejected.to(chosen_logps)
        args, loss_type = self.args, self.args.loss_type[0]
        if loss_type == "sigmoid":
            loss = dpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, beta=self.beta)
        elif loss_type == "sipo":
            chosen_len = inputs["completion_mask"][:, 1:].sum(1).chunk(2, dim=0)[0]  # |y_c|, the scored tokens
            loss = sipo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, chosen_len.clamp(min=1),
                             beta=self.beta, alpha=args.sipo_alpha)
            self._log_mean(mode, "loss/dpo", dpo_loss(chosen_logps.detach(), rejected_logps.detach(), ref_chosen,
                                                      ref_rejected, beta=self.beta, reduction="none"))
            self._log_mean(mode, "nll/chosen", -chosen_logps.detach() / chosen_len.clamp(min=1))
        elif loss_type == "dpo_lw":
            if SIGNS_COLUMN not in inputs:
                raise ValueError(f"loss_type='dpo_lw' needs the dataset column {SIGNS_COLUMN!r} (per row, +1/-1 for "
                                 "each objective: does it prefer the chosen response?)")
            loss = dpo_lw_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected, inputs[SIGNS_COLUMN],
                               weights=args.dpo_lw_weights, beta=self.beta)
        else:
            if not all(c in inputs for c in MARGIN_COLUMNS):
                raise ValueError(f"loss_type='modpo' needs dataset columns {MARGIN_COLUMNS} (margin rewards r_φ of "
                                 "the other objectives on the chosen and rejected responses)")
            loss = modpo_loss(chosen_logps, rejected_logps, ref_chosen, ref_rejected,
                              inputs["chosen_margin_rewards"].to(chosen_logps),
                              inputs["rejected_margin_rewards"].to(chosen_logps),
                              weight=args.modpo_weight, margin_weights=args.modpo_margin_weights, beta=self.beta)
        self._log_preference_metrics(mode, inputs, chosen_logps.detach(), rejected_logps.detach(), ref_chosen,
                                     ref_rejected)
        return (loss, None) if return_outputs else loss

    def _log_mean(self, mode: str, name: str, values: torch.Tensor) -> None:
        self._metrics[mode][name].append(self.accelerator.gather_for_metrics(values).float().mean().item())

    def _log_reward_set(self, mode: str, prefix: str, chosen: torch.Tensor, rejected: torch.Tensor) -> None:
        self._log_mean(mode, f"{prefix}/chosen", chosen)
        self._log_mean(mode, f"{prefix}/rejected", rejected)
        self._log_mean(mode, f"{prefix}/accuracies", (chosen > rejected).float())
        self._log_mean(mode, f"{prefix}/margins", chosen - rejected)

    def _log_preference_metrics(self, mode, inputs, chosen_logps, rejected_logps, ref_chosen, ref_rejected):
        chosen_r = self.beta * (chosen_logps - ref_chosen)
        rejected_r = self.beta * (rejected_logps - ref_rejected)
        self._log_reward_set(mode, "rewards", chosen_r, rejected_r)  # TRL's names
        self._log_mean(mode, "logps/chosen", chosen_logps)
        self._log_mean(mode, "logps/rejected", rejected_logps)
        names = list(self.args.objective_names or [])
        if names:
            self._log_reward_set(mode, f"rewards/{names[0]}", chosen_r, rejected_r)
        if all(c in inputs for c in MARGIN_COLUMNS):
            cm, rm = inputs["chosen_margin_rewards"], inputs["rejected_margin_rewards"]  # (B, N-1)
            for j in range(cm.shape[1]):
                name = names[j + 1] if len(names) > j + 1 else f"margin{j}"
                self._log_reward_set(mode, f"rewards/{name}", cm[:, j], rm[:, j])

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        # No logits exist to return (that is the point); evaluation reports the loss and the logged metrics.
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


# -------------------------------------------------------------------------------------------------------------------
# the function the pipeline calls


def _as_dataset(data) -> Dataset | None:
    if data is None or isinstance(data, Dataset):
        return data
    if isinstance(data, dict):
        return Dataset.from_dict(data)
    if isinstance(data, list):
        return Dataset.from_list(data)
    raise ValueError(f"dataset must be a datasets.Dataset, a dict of columns or a list of rows, got {type(data).__name__}")


def build_preference_trainer(model, ref_model, dataset, tokenizer, *, loss_type: str = "sigmoid", beta: float = 0.1,
                             alpha: float = 0.1, lr: float = 5e-4, epochs: float = 3, batch_size: int = 4,
                             max_length: int = 512, lora_config=None, output_dir: str, template: str = "chat",
                             eval_dataset=None, seed: int = 0, modpo_weight: float | None = None,
                             modpo_margin_weights: list[float] | None = None, objective_names: list[str] | None = None,
                             dpo_lw_weights: list[float] | None = None,
                             gradient_checkpointing: bool = False, logging_steps: int = 10, **config_overrides
                             ) -> FusedDPOTrainer:
    """Build a :class:`FusedDPOTrainer` for one preference run (see :func:`train_preference` for the arguments).
    ``config_overrides`` go to :class:`FusedDPOConfig` (any ``DPOConfig``/``TrainingArguments`` field)."""
    train = _as_dataset(dataset)
    evals = _as_dataset(eval_dataset)
    for name, ds in (("dataset", train), ("eval_dataset", evals)):
        if ds is not None:
            missing = {"prompt", "chosen", "rejected"} - set(ds.column_names)
            if missing or len(ds) == 0:
                raise ValueError(f"{name} needs rows with prompt, chosen and rejected columns (missing {sorted(missing)}, "
                                 f"{len(ds)} rows)")
    has_eval = evals is not None
    cfg = dict(output_dir=output_dir, learning_rate=lr, num_train_epochs=epochs, per_device_train_batch_size=batch_size,
               per_device_eval_batch_size=batch_size, beta=beta, loss_type=[loss_type], sipo_alpha=alpha,
               max_length=max_length, seed=seed, prompt_template=template, modpo_weight=modpo_weight,
               modpo_margin_weights=modpo_margin_weights, objective_names=objective_names, dpo_lw_weights=dpo_lw_weights,
               gradient_checkpointing=gradient_checkpointing, logging_steps=logging_steps,
               # Train in the model's own dtype: TRL's default bf16 autocast would change the numbers on CPU.
               bf16=False, fp16=False, report_to="none", disable_tqdm=False,
               eval_strategy="epoch" if has_eval else "no", save_strategy="epoch" if has_eval else "no",
               load_best_model_at_end=has_eval, metric_for_best_model="eval_loss", greater_is_better=False,
               save_total_limit=1 if has_eval else None, save_only_model=True,
               dataloader_pin_memory=torch.cuda.is_available())
    cfg.update(config_overrides)
    args = FusedDPOConfig(**cfg)
    return FusedDPOTrainer(model, ref_model, args, train_dataset=train, eval_dataset=evals,
                           processing_class=tokenizer, peft_config=lora_config)


def train_preference(model, ref_model, dataset, tokenizer, *, loss_type: str = "sigmoid", beta: float = 0.1,
                     alpha: float = 0.1, lr: float = 5e-4, epochs: float = 3, batch_size: int = 4, max_length: int = 512,
                     lora_config=None, output_dir: str, template: str = "chat", eval_dataset=None, seed: int = 0,
                     **kwargs):
    """Train ``model`` on preference pairs with the fused DPO trainer and return the trained model.

    Args:
        model: a causal LM (``PreTrainedModel``), or a ``PeftModel`` to keep training its adapter.
        ref_model: the reference π_ref, or None: the PEFT base with adapters disabled when LoRA is used, a frozen
            copy of ``model`` otherwise.
        dataset: rows with ``prompt`` (raw user text; rendered with ``template``), ``chosen``, ``rejected`` and,
            for MODPO, ``chosen_margin_rewards`` / ``rejected_margin_rewards``. A ``Dataset``, dict or list.
        loss_type: "sigmoid" (DPO, stage 1), "sipo" (stage 3; ``alpha`` weighs the NLL term), "modpo"
            (pass ``modpo_weight`` and ``modpo_margin_weights``) or "dpo_lw" (pass ``dpo_lw_weights``; rows carry
            ``objective_signs``).
        lora_config: a ``peft.LoraConfig`` (stage 1 uses r=64, lora_alpha=1, q/k/v/o) or None for full training.
        eval_dataset: if given, evaluated each epoch and the best eval-loss checkpoint is loaded at the end.
        kwargs: ``modpo_weight``, ``modpo_margin_weights``, ``objective_names``, ``gradient_checkpointing``,
            ``logging_steps``, or any ``FusedDPOConfig`` field.
    Returns:
        The trained model (a ``PeftModel`` when ``lora_config`` is given; merge it with ``merge_and_unload()``).
    """
    trainer = build_preference_trainer(model, ref_model, dataset, tokenizer, loss_type=loss_type, beta=beta,
                                       alpha=alpha, lr=lr, epochs=epochs, batch_size=batch_size,
                                       max_length=max_length, lora_config=lora_config, output_dir=output_dir,
                                       template=template, eval_dataset=eval_dataset, seed=seed, **kwargs)
    trainer.train()
    return trainer.accelerator.unwrap_model(trainer.model)
