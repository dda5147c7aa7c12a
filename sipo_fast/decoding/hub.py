"""MOD decoding as transformers' ``custom_generate`` hook: ``model.generate(..., custom_generate=dir)``.

transformers (>= 4.56) loads ``<dir>/custom_generate/generate.py`` from a hub repository or a local directory
and calls its ``generate(model=..., **every generate argument)`` in place of its own decoding. A local
directory works offline: transformers copies the file into its modules cache (``HF_MODULES_CACHE``) and imports
it; ``trust_remote_code=True`` is required even for a local directory, since the file is code it runs.
:func:`custom_generate_dir` is that directory inside this package; the file re-exports :func:`generate`.
"""
from __future__ import annotations

from pathlib import Path

# generate() arguments of transformers that MOD decoding has no counterpart for
_UNSUPPORTED = ("prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask")


def custom_generate_dir() -> str:
    """The local directory to pass as ``custom_generate=`` (it holds ``custom_generate/generate.py``)."""
    return str(Path(__file__).with_name("mod_generate"))


def generate(model, inputs=None, *, policies=None, weights=None, tokenizer=None, decoder_kwargs: dict | None = None,
             synced_gpus=None, **kwargs):
    """MOD over ``[model, *policies]`` with :class:`sipo_fast.decoding.MODDecoder`, called by transformers.

    Args:
        model: the policy whose ``generate`` was called (objective 0); transformers passes it.
        inputs / input_ids, attention_mask: the prompts, as for ``model.generate``.
        policies: the other N-1 policies (causal LMs sharing the tokenizer). None: ``model`` alone.
        weights: [N] or [B, N] MOD weights (default [1.0] for ``model`` alone; required with ``policies``).
        tokenizer: the shared tokenizer (for string prompts, ``stop_strings``, default EOS/padding).
        decoder_kwargs: :class:`MODDecoder` constructor arguments (``kv_cache``, ``compute_dtype``, ...).
        kwargs: :meth:`MODDecoder.generate` options (``generation_config``, ``logits_processor``, ``streamer``,
            ``max_new_tokens``, ...). Returns, as transformers does, the sequences tensor unless
            ``return_dict_in_generate=True`` (then a :class:`~sipo_fast.decoding.MODOutput`).
    """
    from sipo_fast.decoding.decoder import MODDecoder

    bad = [k for k in _UNSUPPORTED if kwargs.pop(k, None) is not None]
    if synced_gpus:
        bad.append("synced_gpus")
    if bad:
        raise ValueError(f"MOD decoding (custom_generate) does not support {', '.join(bad)}")
    input_ids = kwargs.pop("input_ids", None)
    input_ids = inputs if input_ids is None else input_ids
    others = list(policies) if isinstance(policies, (list, tuple)) else [] if policies is None else [policies]
    if weights is None:
        if others:
            raise ValueError(f"custom_generate MOD over {1 + len(others)} policies needs weights=[...] (one per policy, "
                             "summing to 1)")
        weights = [1.0]
    config = kwargs.get("generation_config")
    if kwargs.get("return_dict_in_generate") is None and getattr(config, "return_dict_in_generate", None) is None:
        kwargs["return_dict_in_generate"] = False  # transformers' default: the sequences tensor
    decoder = MODDecoder([model, *others], tokenizer, **(decoder_kwargs or {}))
    return decoder.generate(input_ids, weights=weights, tokenizer=tokenizer, **kwargs)
