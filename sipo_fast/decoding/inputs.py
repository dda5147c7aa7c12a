"""Input checks and helpers of :meth:`MODDecoder.generate` that need no decoder state: the prompt forms it
accepts, EOS ids, the generation options and their precedence, and the weight-set expansion.

Options follow transformers' ``generate``. Each one is resolved in this order, the first that sets it wins:

    explicit keyword arguments  >  generation_config=  >  models[0].generation_config  >  decoder defaults

A ``GenerationConfig`` field counts as set when it is not None (transformers 5's convention). The decoder
defaults are greedy decoding, ``temperature=1``, ``top_k=0`` (off, where transformers samples with 50),
``top_p=1`` and no processors. The policies' own config contributes sampling and processing options only
(not ``return_dict_in_generate`` / ``output_scores``, which belong to the calling code), and none of them
with ``use_model_defaults=False``; its EOS and pad ids are always the decoder's fallback ids.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from sipo_fast.ops.mod import check_top_k_top_p


# --------------------------------------------------------------------------------------------- prompts
def split_prompts(input_ids, attention_mask):
    """``(texts, ids, mask)`` from what ``generate`` was given first: texts (a list of str) for a string or a
    list of strings, else ``texts=None`` and the ids of a ``BatchEncoding``/dict (``input_ids`` and
    ``attention_mask``), a [B, T] tensor or nested list, a [T] row, or a ragged list of id lists (then
    ``mask=None`` and ``ids`` the list, for the decoder to left-pad)."""
    if isinstance(input_ids, Mapping):  # BatchEncoding is a Mapping of its fields
        if attention_mask is not None:
            raise ValueError("pass the attention mask inside the BatchEncoding/dict or separately, not both")
        extra = sorted(set(input_ids) - {"input_ids", "attention_mask"})
        if extra or "input_ids" not in input_ids:
            raise ValueError(f"a BatchEncoding/dict prompt needs 'input_ids' (and optionally 'attention_mask'), got "
                             f"keys {sorted(input_ids)}; MOD decoding reads no other model inputs")
        input_ids, attention_mask = input_ids["input_ids"], input_ids.get("attention_mask")
    if isinstance(input_ids, str):
        input_ids = [input_ids]
    if isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(p, str) for p in input_ids):
        if attention_mask is not None:
            raise ValueError("attention_mask goes with token ids; text prompts are padded here, pass none")
        return list(input_ids), None, None
    if input_ids is None:
        raise ValueError("generate() needs prompts: token ids [B, T], a BatchEncoding, or a list of strings")
    if (isinstance(input_ids, (list, tuple)) and input_ids and all(isinstance(r, (list, tuple)) for r in input_ids)
            and len({len(r) for r in input_ids}) > 1):
        if attention_mask is not None:
            raise ValueError("rows of different lengths need no attention_mask: they are left-padded here")
        return None, [list(r) for r in input_ids], None
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:  # one prompt
        ids = ids[None]
        attention_mask = None if attention_mask is None else torch.as_tensor(attention_mask).reshape(1, -1)
    return None, ids, attention_mask


def eos_id_list(eos_token_id, vocab_size: int) -> list[int]:
    """EOS ids given as an int, a list/tuple of ints, or a 0-d/1-d integer tensor, checked against the
    vocabulary."""
    if isinstance(eos_token_id, torch.Tensor):
        if eos_token_id.dim() > 1 or eos_token_id.is_floating_point() or eos_token_id.dtype == torch.bool:
            raise ValueError(f"eos_token_id as a tensor must be a 0-d or 1-d integer tensor, got dtype "
                             f"{eos_token_id.dtype} and shape {tuple(eos_token_id.shape)}")
        ids = eos_token_id.reshape(-1).tolist()
    elif isinstance(eos_token_id, (list, tuple)):
        ids = list(eos_token_id)
    else:
        ids = [eos_token_id]
    ids = [int(i) if hasattr(i, "__index__") and not isinstance(i, bool) else i for i in ids]  # numpy ints too
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos_token_id must be ids in [0, {vocab_size}), got {eos_token_id!r}")
    return ids


# --------------------------------------------------------------------------------------------- options
@dataclass
class GenerateOptions:
    """The generation options :meth:`MODDecoder.generate` reads; the field defaults are the decoder's own."""

    max_new_tokens: int | None = None
    max_length: int | None = None
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    eos_token_id: object = None
    pad_token_id: int | None = None
    stop_strings: str | list[str] | None = None
    return_dict_in_generate: bool = True
    output_scores: bool = False
    output_logits: bool = False


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(GenerateOptions))
_CALLER_ONLY = ("return_dict_in_generate", "output_scores", "output_logits")  # never from the models' config
_ID_FIELDS = ("eos_token_id", "pad_token_id")  # the models' ids: the decoder's fallback, not an option level
# GenerationConfig fields that change nothing here: bookkeeping, cache and speculative-decoding settings.
_IGNORED = {"bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation", "cache_config",
            "max_cache_len", "transformers_version", "_from_model_config", "compile_config", "disable_compile",
            "prefill_chunk_size", "low_memory", "num_assistant_tokens", "num_assistant_tokens_schedule",
            "assistant_confidence_threshold", "assistant_lookbehind", "target_lookbehind", "is_assistant",
            "continuous_batching_config"}
# ... and values of other fields that are no-ops (transformers' own defaults for them).
_NO_OP = {"num_beams": 1, "num_beam_groups": 1, "min_length": 0, "typical_p": 1.0, "epsilon_cutoff": 0.0,
          "eta_cutoff": 0.0, "no_repeat_ngram_size": 0, "encoder_no_repeat_ngram_size": 0,
          "encoder_repetition_penalty": 1.0, "length_penalty": 1.0, "early_stopping": False, "diversity_penalty": 0.0,
          "remove_invalid_values": False, "renormalize_logits": False, "output_attentions": False,
          "output_hidden_states": False, "guidance_scale": 1.0, "token_healing": False, "use_mtp": False}
_warned: set[str] = set()


def _config_values(config, source: str, strict: bool) -> dict:
    """The set (non-None) fields of a GenerationConfig that this decoder reads; a field it cannot honour raises
    (``strict``: the caller's own config) or is ignored with one warning (the models' config)."""
    if config is None:
        return {}
    if isinstance(config, Mapping):
        from transformers import GenerationConfig

        config = GenerationConfig(**config)
    if not hasattr(config, "to_dict"):
        raise ValueError(f"generation_config must be a transformers GenerationConfig, got {type(config).__name__}")
    found, bad = {}, []
    for name, value in config.to_dict().items():
        if value is None or name in _IGNORED or (name in _NO_OP and value == _NO_OP[name]):
            continue
        if name in OPTION_NAMES:
            found[name] = value
        else:
            bad.append(f"{name}={value!r}")
    if bad and strict:
        raise ValueError(f"MODDecoder.generate cannot apply {source} {', '.join(bad)} (MOD decoding is greedy or "
                         f"sampled, with the options {', '.join(OPTION_NAMES)}); unset them")
    if bad and (msg := f"MODDecoder.generate: ignoring {source} {', '.join(bad)}") not in _warned:
        _warned.add(msg)
        warnings.warn(msg + " (MOD decoding does not implement them)", RuntimeWarning, stacklevel=4)
    return found


def resolve_options(explicit: dict, generation_config=None, model_config=None, *,
                    use_model_defaults: bool = True) -> GenerateOptions:
    """The options of one ``generate`` call, by the precedence in the module docstring. ``explicit`` holds the
    keyword arguments the caller passed (None = not passed)."""
    opts = GenerateOptions()
    levels = []
    if use_model_defaults:
        model = _config_values(model_config, "models[0].generation_config", strict=False)
        levels.append({k: v for k, v in model.items() if k not in _CALLER_ONLY + _ID_FIELDS})
    levels.append(_config_values(generation_config, "generation_config", strict=True))
    levels.append({k: v for k, v in explicit.items() if v is not None})
    for level in levels:
        if "max_new_tokens" in level:  # a level's max_new_tokens wins over its (and lower levels') max_length
            opts.max_length = None
        elif "max_length" in level:
            opts.max_new_tokens = None
        for k, v in level.items():
            if not (k == "max_length" and "max_new_tokens" in level):
                setattr(opts, k, v)
    return opts


def check_options(opts: GenerateOptions, seed, prompt_width: int) -> GenerateOptions:
    """Validate resolved options before any work; turns ``max_length`` into ``max_new_tokens`` for a prompt of
    ``prompt_width`` columns (transformers counts the prompt, padding included)."""
    if opts.max_new_tokens is None and opts.max_length is not None:
        if not isinstance(opts.max_length, int) or opts.max_length <= prompt_width:
            raise ValueError(f"max_length={opts.max_length!r} leaves no new tokens after a prompt of {prompt_width} "
                             "tokens; set max_new_tokens instead")
        opts.max_new_tokens = opts.max_length - prompt_width
    if opts.max_new_tokens is None:
        raise ValueError("max_new_tokens is not set: pass max_new_tokens=... (or a generation_config that sets it)")
    check_sampling(opts.max_new_tokens, opts.do_sample, opts.temperature, opts.top_k, opts.top_p, seed)
    if not isinstance(opts.repetition_penalty, (int, float)) or not opts.repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be a number > 0 (1.0 disables it), got {opts.repetition_penalty!r}")
    for name in ("min_new_tokens", "num_return_sequences"):
        v, low = getattr(opts, name), 0 if name == "min_new_tokens" else 1
        if not isinstance(v, int) or isinstance(v, bool) or v < low:
            raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
    if opts.num_return_sequences > 1 and not opts.do_sample:
        raise ValueError(f"num_return_sequences={opts.num_return_sequences} with greedy decoding gives identical rows "
                         "(transformers refuses it too): set do_sample=True")
    s = opts.stop_strings
    if s is not None and not (isinstance(s, str) or (isinstance(s, (list, tuple)) and s and
                                                     all(isinstance(x, str) and x for x in s))):
        raise ValueError(f"stop_strings must be a string or a non-empty list of non-empty strings, got {s!r}")
    for name in _CALLER_ONLY + ("do_sample",):
        if not isinstance(getattr(opts, name), bool):
            raise ValueError(f"{name} must be True or False, got {getattr(opts, name)!r}")
    return opts


def batch_seed(seed: int | None, k: int) -> int | None:
    """The seed of batch ``k`` of a :meth:`MODDecoder.generate_text` call seeded with ``seed``: ``seed`` itself for
    the first batch (a one-batch call samples exactly like ``generate(seed=seed)``), an independent stream
    derived from (seed, k) for the others. Not ``seed + k``: callers seed consecutive calls with seed, seed + 1,
    ... (one per weight), and batch 1 of one call would then replay batch 0 of the next."""
    if seed is None or k == 0:
        return seed
    import numpy as np

    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(k)]).generate_state(1, dtype=np.uint64)[0]
               >> 1)


def expand_weight_sets(ids: torch.Tensor, mask: torch.Tensor, weights):
    """[B, S, N] weights -> B·S rows (row b·S + s is prompt b at weight vector s) and [B·S, N] weights; the
    rows of one prompt are identical, so the decoder's dedupe gives them one shared prefill. Other shapes
    pass through unchanged."""
    w = torch.as_tensor(weights)
    if w.dim() != 3:
        return ids, mask, weights
    if w.shape[0] != ids.shape[0] or w.shape[1] == 0:
        raise ValueError(f"weights [B, S, N] must have B={ids.shape[0]} (one set per prompt) and S >= 1, got "
                         f"{tuple(w.shape)}")
    s = w.shape[1]
    return ids.repeat_interleave(s, 0), mask.repeat_interleave(s, 0), w.reshape(-1, w.shape[2])


def check_sampling(max_new_tokens, do_sample, temperature, top_k, top_p, seed) -> None:
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if do_sample and (not isinstance(temperature, (int, float)) or not temperature > 0):
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r} (for greedy decoding use "
                         "do_sample=False)")
    check_top_k_top_p(top_k, top_p)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed must be an int or None, got {seed!r}")
