"""Multi-objective decoding (MOD) over several Hugging Face policies: :class:`MODDecoder`.

    from sipo_fast import MODDecoder
    dec = MODDecoder([helpful_model, harmless_model], tokenizer)
    out = dec.generate(input_ids, attention_mask, weights=[[0.2, 0.8], [0.6, 0.4]], max_new_tokens=64)
    out.sequences, out.logprobs   # [B, T+L] prompt + response, [B, N] log π_i(y|x) per policy
"""
from sipo_fast.decoding.decoder import MODDecoder, check_vocabularies
from sipo_fast.decoding.output import MODOutput, MODTextOutput

__all__ = ["MODDecoder", "MODOutput", "MODTextOutput", "check_vocabularies"]
