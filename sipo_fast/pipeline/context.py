"""What every stage shares: the config, the tokenizer, model loading, the data split, the held-out prompts and
the fail-fast checks.

Model names: ``"default"`` is the embedded SmolLM2-135M-Instruct (``sipo_fast.models.load_default``),
``"tiny"`` / ``"tiny:<arch>"`` a small random model with the same tokenizer (``sipo_fast.models.tiny``), and
anything else a Hugging Face name or local path, loaded with ``trust_remote_code`` only when the config says so.
"""
from __future__ import annotations

import logging
import random
import re
from functools import cached_property
from pathlib import Path

import torch

from .config.pipeline_config import PipelineConfig
from .datacheck import check_rows, check_utf8, read_jsonl_rows
from .rundir.directory import RunDir

log = logging.getLogger("sipo_fast.pipeline")
_NAME_OK = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tokenizer_mismatch(a, b) -> str | None:
    """Why two tokenizers would tokenise differently (vocabulary, special ids), or None if they agree."""
    if len(a) != len(b):
        return f"vocabulary sizes differ ({len(a)} vs {len(b)})"
    for attr in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if getattr(a, attr) != getattr(b, attr):
            return f"{attr} differs ({getattr(a, attr)} vs {getattr(b, attr)})"
    if a.get_vocab() != b.get_vocab():
        return "the token-to-id maps differ"
    return None


def context_length(model_config) -> int | None:
    """Longest sequence the model's position embeddings allow, or None if the config does not say."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _first_byte(path: Path) -> bytes | None:
    """The first non-blank byte of a file (None if it has none), read in small chunks."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 16), b""):
            if chunk.strip():
                return chunk.lstrip()[:1]
    return None


class Context:
    """Shared state of one pipeline invocation (cached tokenizer, data split); stages receive it."""

    def __init__(self, config: PipelineConfig, run_dir: RunDir, *, progress: bool = True):
        self.config, self.run_dir, self.progress = config, run_dir, progress

    # -- device, dtype, models ----------------------------------------------------------------------------
    @cached_property
    def device(self) -> torch.device:
        from sipo_fast.distributed import current

        d = self.config.model.device
        dist = current()
        if dist.device is not None and (d == "auto" or d.startswith("cuda")):
            return dist.device  # one GPU per process under accelerate launch / torchrun: cuda:<local rank>
        if d == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if d.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"model.device={d!r} but no CUDA device is visible; use model.device=auto or cpu")
        return torch.device(d)

    @cached_property
    def dtype(self) -> torch.dtype:
        d = self.config.model.dtype
        if d == "auto":
            from sipo_fast.models import auto_dtype

            return auto_dtype(self.device)
        return _DTYPES[d]

    @cached_property
    def tokenizer(self):
        from sipo_fast.models import tokenizer_for

        return tokenizer_for(self.config.model.name, trust_remote_code=self.config.model.trust_remote_code)

    @cached_property
    def model_config(self):
        name = self.config.model.name
        if name.startswith("tiny"):
            return self.load_base().config  # building a tiny model costs milliseconds
        from transformers import AutoConfig

        if name == "default":
            from sipo_fast.models import default_model_dir

            return AutoConfig.from_pretrained(default_model_dir())
        return AutoConfig.from_pretrained(name, trust_remote_code=self.config.model.trust_remote_code)

    def load_base(self):
        """A fresh copy of π_ref on the run's device and dtype, in eval mode (stages mutate their copy)."""
        from sipo_fast.models import load_base

        return load_base(self.config.model.name, dtype=self.dtype, device=self.device, tokenizer=self.tokenizer,
                         trust_remote_code=self.config.model.trust_remote_code)

    # -- data ---------------------------------------------------------------------------------------------
    @cached_property
    def split(self) -> dict[str, list[dict]]:
        """{"train": rows, "eval": rows} of normalised preferences restricted to the configured objectives.

        Held-out rows first: data.eval_split's rows, or (data.split_method="datasets") the authors' split,
        ``Dataset.train_test_split(test_size=eval_fraction, seed=split_seed)``, or else a seeded shuffle
        (data.split_seed) whose first eval_fraction share is held out after the steps below. Then, on the training
        rows, the conflict mix (data.conflict_ratio) and data.max_rows. Rows carry prompt, response_0, response_1
        and pref_<objective> for each objective.
        """
        cfg = self.config.data
        ds, where = self.load_preferences()
        rows, held = self._rows(ds, where), None
        if cfg.eval_split is not None:  # the authors' HelpSteer: held-out pairs from the dataset's validation split
            from sipo_fast.data.prompts import check_split

            check_split(cfg.source, cfg.eval_split, "data.eval_split")
            held = self._rows(*self.load_preferences(cfg.eval_split))
        elif cfg.split_method == "datasets":  # the authors' PKU split (src/data/preprocess/PKUSafeRLHF.py)
            parts = ds.add_column("_row", list(range(len(ds)))).train_test_split(test_size=cfg.eval_fraction,
                                                                                 seed=cfg.split_seed)
            rows, held = [rows[i] for i in parts["train"]["_row"]], [rows[i] for i in parts["test"]["_row"]]
        else:
            random.Random(cfg.split_seed).shuffle(rows)
        if cfg.conflict_ratio is not None:
            rows = self._mix(rows, cfg.conflict_ratio)
        if cfg.max_rows is not None:
            rows = rows[: cfg.max_rows]
        rows = self._fit_context(rows)
        if held is not None:
            split = {"train": rows, "eval": self._fit_context(held)}
        else:
            n_eval = max(int(round(len(rows) * cfg.eval_fraction)), 1 if cfg.eval_fraction > 0 else 0)
            split = {"train": rows[n_eval:], "eval": rows[:n_eval]}
        if cfg.stage2_reserved is not None:
            # data.holdout_stage2: the first conflicting training rows go to stage 2 only.
            split["stage2"] = self.conflicting(split["train"])[: cfg.stage2_reserved]
            reserved = {id(r) for r in split["stage2"]}
            split["train"] = [r for r in split["train"] if id(r) not in reserved]
        return split

    def _rows(self, ds, where) -> list[dict]:
        """Normalised rows restricted to the configured objectives, after checking the columns and values exist
        (``where(i)`` names row i in messages)."""
        from sipo_fast.data import objectives as available_objectives

        cfg = self.config.data
        have = available_objectives(ds)
        missing = [o for o in cfg.objectives if o not in have]
        if missing:
            raise ValueError(f"unknown objective(s) {missing} for data.source={cfg.source!r}; it provides "
                             f"{have}. Set data.objectives to names from that list")
        cols = ["prompt", "response_0", "response_1"] + [f"pref_{o}" for o in cfg.objectives]
        absent = [c for c in cols if c not in ds.column_names]
        if absent:
            raise ValueError(f"data.source={cfg.source!r} lacks the columns {absent}; preference data needs prompt, "
                             "response_0, response_1 and pref_<objective> (0/1) for each objective")
        rows = [dict(zip(cols, vals)) for vals in zip(*(ds[c] for c in cols))]
        if not rows:
            raise ValueError(f"data.source={cfg.source!r} has no rows; point it at a non-empty preference dataset")
        check_rows(rows, where, [f"pref_{o}" for o in cfg.objectives])
        return rows

    def load_preferences(self, split: str = "train"):
        """(dataset, where) for ``split`` of the data source: "demo", PKU-SafeRLHF or HelpSteer (``sipo_fast.data``),
        or a local .jsonl already in the normalised schema (prompt, response_0, response_1, pref_<objective>...),
        which is how data with more than two objectives comes in. ``where(i)`` names row i in messages
        (``file:line`` for local JSON lines). Local text files are checked for UTF-8 and JSON first."""
        from sipo_fast.data import load_preferences

        cfg = self.config.data
        path = Path(str(cfg.source))
        if path.is_file() and split != "train":
            raise ValueError(f"data.eval_split={split!r} needs a dataset with splits, but data.source={cfg.source!r} "
                             "is a single file; use data.eval_fraction instead")
        where = lambda i: f"data.source={cfg.source!r} row {i}"  # noqa: E731
        if not path.exists() and (path.suffix in (".jsonl", ".json", ".csv", ".parquet")
                                  or str(cfg.source).startswith((".", "/", "~"))):
            raise ValueError(f"data.source={cfg.source!r}: no such file or directory")
        if path.is_file():
            first = _first_byte(path)
            if first is None:
                raise ValueError(f"data.source={cfg.source!r} is an empty file; point it at a preference dataset "
                                 "with rows (prompt, response_0, response_1 and the preference columns)")
            if path.suffix in (".jsonl", ".json") and first == b"{":  # JSON lines
                scanned = read_jsonl_rows(path)  # UTF-8 and JSON, line by line
                lines = [n for n, _ in scanned]
                where = lambda i: f"{path}:{lines[i]}"  # noqa: E731
                if any(k.startswith("pref_") for k in scanned[0][1]):
                    from datasets import Dataset

                    # Values checked before Arrow sees them: a null or a string among ints fails there without
                    # naming the line.
                    check_rows([r for _, r in scanned], where, [f"pref_{o}" for o in cfg.objectives
                                                                  if f"pref_{o}" in scanned[0][1]])
                    return Dataset.from_list([r for _, r in scanned]), where
            else:
                check_utf8(path)
        # HelpSteer rows become pairs per attribute: ask for exactly the configured objectives.
        extra = {"attributes": tuple(cfg.objectives)} if "helpsteer" in str(cfg.source).lower() else {}
        ds = load_preferences(cfg.source, split=split, **extra)
        if "helpsteer" in str(cfg.source).lower():  # pairs are made from rows: no line to name
            where = lambda i: f"data.source={cfg.source!r} pair {i}"  # noqa: E731
        return ds, where

    def _mix(self, rows: list[dict], ratio: float) -> list[dict]:
        """A subset whose share of conflicting rows is ``ratio`` (order kept, seeded reshuffle): the largest one
        (data.conflict_mix="largest"), or the authors' (src/data/raw_data/helpsteer.py, "min"): T = min(#conflicting,
        #agreeing) rows in all, int(T·ratio) conflicting and the rest agreeing."""
        conf = self.conflicting(rows)
        ids = {id(r) for r in conf}
        agree = [r for r in rows if id(r) not in ids]
        if self.config.data.conflict_mix == "min":
            total = min(len(conf), len(agree))
            n_conf = int(total * ratio)
            n_agree = total - n_conf
        else:
            total = min(len(conf) / ratio, len(agree) / (1 - ratio))
            n_conf, n_agree = int(round(total * ratio)), int(round(total * (1 - ratio)))
        if n_conf == 0 or n_agree == 0:
            raise ValueError(f"data.conflict_ratio={ratio}: the data has {len(conf)} conflicting and {len(agree)} "
                             "agreeing pairs, too few for that mix; set data.conflict_ratio=null")
        out = conf[:n_conf] + agree[:n_agree]
        random.Random(self.config.data.split_seed + 1).shuffle(out)
        return out

    def conflicting(self, rows: list[dict]) -> list[dict]:
        """Rows whose objectives prefer different responses (SIPO.md §1)."""
        keys = [f"pref_{o}" for o in self.config.data.objectives]
        return [r for r in rows if len({r[k] for k in keys}) > 1]

    def _fit_context(self, rows: list[dict]) -> list[dict]:
        """Check that every prompt leaves room for a response within the context and align.max_length."""
        from sipo_fast.data.formatting import format_prompt

        ctx_len = context_length(self.model_config)
        if ctx_len is not None:
            for key in ("align.max_length", "filter.max_length", "finetune.max_length"):
                if self.config.get(key) > ctx_len:
                    raise ValueError(f"{key}={self.config.get(key)} exceeds the model's context of {ctx_len} tokens; "
                                     f"set {key}={ctx_len} or less")
        max_length, need = self.config.align.max_length, self.config.sample.max_new_tokens
        tok, template = self.tokenizer, self.config.model.template
        lengths = {p: len(tok(format_prompt(tok, p, template), add_special_tokens=False)["input_ids"])
                   for p in {r["prompt"] for r in rows}}
        # A prompt must leave room for a response in training (max_length < context, checked above).
        too_long = sorted(p for p, n in lengths.items() if n >= max_length)
        if too_long and self.config.data.drop_long_prompts:
            log.warning("dropping %d prompt(s) of align.max_length=%d tokens or more (data.drop_long_prompts=true)",
                        len(too_long), max_length)
            bad = set(too_long)
            rows = [r for r in rows if r["prompt"] not in bad]
        elif too_long:
            raise ValueError(f"{len(too_long)} prompt(s) leave no room for a response: the longest has "
                             f"{max(lengths[p] for p in too_long)} tokens and align.max_length={max_length}. Raise "
                             f"align.max_length (the model's context is {ctx_len}), or set data.drop_long_prompts=true")
        # ... and stage 2 must be able to generate sample.max_new_tokens after it.
        if ctx_len is not None:
            over = [n for p, n in lengths.items() if n < max_length and n + need > ctx_len]
            if over:
                raise ValueError(f"{len(over)} prompt(s) plus sample.max_new_tokens={need} exceed the model's context "
                                 f"of {ctx_len} tokens (longest prompt: {max(over)}); lower sample.max_new_tokens")
        return rows

    def heldout_prompts(self, num_prompts: int | None = None) -> list[str]:
        """The evaluation's held-out prompts: eval.prompt_source (or data.source), eval.prompt_split,
        eval.prompt_select, eval.num_prompts of them (or ``num_prompts``). A data.source that is one file has no
        held-out split (its rows are the training data): the prompts must then come from an eval.prompt_source of
        their own."""
        from sipo_fast.eval.inputs import heldout_prompts

        cfg, e = self.config, self.config.eval
        if e.prompt_source is None and Path(str(cfg.data.source)).is_file():
            raise ValueError(f"{cfg.data.source}: a single file has no held-out split to evaluate on (its rows are "
                             "the training data); set eval.prompt_source to a file or dataset of held-out prompts")
        return heldout_prompts(e.prompt_source or cfg.data.source, num_prompts or e.num_prompts,
                               split=e.prompt_split, select=e.prompt_select)

    # -- fail fast ----------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Every check that can fail before any training: names, data, conflicts, tokenizers, lengths."""
        cfg = self.config
        bad = [o for o in cfg.data.objectives if not _NAME_OK.match(o)]
        if bad:
            raise ValueError(f"objective names {bad} must start with a letter and use only letters, digits, _ or - "
                             "(they name data columns, adapters and directories)")
        if cfg.model.name not in ("default",) and not cfg.model.name.startswith("tiny") \
                and cfg.model.trust_remote_code:
            log.warning("model.trust_remote_code=true: code from %s will run on this machine", cfg.model.name)
        split = self.split  # loads data, checks objectives and prompt lengths
        if not split["train"]:
            raise ValueError("no training rows left after the eval split; lower data.eval_fraction or add rows")
        n_conf = len(self.conflicting(split["train"]))
        if cfg.data.holdout_stage2 and not split["stage2"]:
            raise ValueError("data.holdout_stage2: the training rows hold no conflicting pair to keep for stage 2; "
                             "raise data.max_rows or set data.holdout_stage2=false")
        if n_conf == 0:
            raise ValueError(f"none of the {len(split['train'])} training pairs is conflicting for objectives "
                             f"{cfg.data.objectives}: SIPO has nothing to improve. Use data where the objectives "
                             "disagree (or more rows: raise data.max_rows)")
        if cfg.align.policies is not None:
            self._check_given_policies()
        self._check_splits()
        log.info("data: %d train / %d eval pairs, %d conflicting training prompts (%.0f%%)%s", len(split["train"]),
                 len(split["eval"]), n_conf, 100.0 * n_conf / len(split["train"]),
                 f"; {len(split['stage2'])} conflicting prompts kept for stage 2" if "stage2" in split else "")

    def _check_splits(self) -> None:
        """The evaluation's prompt split exists, where that can be known here (sipo_fast.data.prompts.check_split:
        skipped with a note while the hub is unreachable); data.eval_split was checked when the split loaded."""
        from sipo_fast.data.prompts import check_split

        e = self.config.eval
        if e.enabled:
            check_split(e.prompt_source or self.config.data.source, e.prompt_split, "eval.prompt_split")

    def _check_given_policies(self) -> None:
        """Adopted stage-1 policies must exist, be all LoRA or all full models, and share π_ref's tokenizer."""
        from transformers import AutoTokenizer

        kinds = []
        for path in self.config.align.policies:
            p = Path(path)
            if not p.is_dir():
                raise ValueError(f"align.policies entry {path!r} is not a directory; give LoRA adapter or model dirs")
            kinds.append((p / "adapter_config.json").exists())
            if any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
                why = tokenizer_mismatch(self.tokenizer, AutoTokenizer.from_pretrained(p))
                if why is not None:
                    raise ValueError(f"the tokenizer saved with {path} differs from model.name="
                                     f"{self.config.model.name!r}'s: {why}. All policies must share π_ref's "
                                     "tokenizer; use policies trained from that model")
        if len(set(kinds)) != 1:
            raise ValueError("align.policies mixes LoRA adapters and full models; give one kind")
        if kinds[0] != self.config.align.use_lora:
            raise ValueError(f"align.policies are {'LoRA adapters' if kinds[0] else 'full models'} but "
                             f"align.use_lora={self.config.align.use_lora}; set align.use_lora={kinds[0]}")
