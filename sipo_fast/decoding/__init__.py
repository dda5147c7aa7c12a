"""Multi-objective decoding (MOD) over several Hugging Face policies: :class:`MODDecoder`.

    from sipo_fast import MODDecoder
    dec = MODDecoder([helpful_model, harmless_model], tokenizer)
    out = dec.generate(input_ids, attention_mask, weights=[[0.2, 0.8], [0.6, 0.4]], max_new_tokens=64)
    out.sequences, out.logprobs   # [B, T+L] prompt + response, [B, N] log π_i(y|x) per policy

``generate`` takes transformers' options (``generation_config``, ``logits_processor``, ``stopping_criteria``,
``stop_strings``, ``streamer``, ...; :mod:`sipo_fast.decoding.inputs`, :mod:`sipo_fast.decoding.hooks`), and
``custom_generate_dir()`` offers the same decoding through ``model.generate(custom_generate=...)``
(:mod:`sipo_fast.decoding.hub`).
"""
from sipo_fast.decoding.decoder import MODDecoder, check_vocabularies
from sipo_fast.decoding.hub import custom_generate_dir
from sipo_fast.decoding.output import MODOutput, MODTextOutput

__all__ = ["MODDecoder", "MODOutput", "MODTextOutput", "check_vocabularies", "custom_generate_dir"]
