"""Generators for :func:`sipo_fast.eval.run_eval`, one per way of turning a weight into responses.

- :func:`mod_generator`: MOD over N policies (stage-1 policies → the "MOD" baseline; SIPO's fine-tuned
  policies → "SIPO + MOD"). Each decoder call takes a batch of prompts with the whole weight set
  (:func:`weight_set_texts`, the decoder's [B, S, N] weights), so each prompt is prefilled once for all weights.
- :func:`soup_generator`: DPO soups, θ(w) = Σ_i w_i θ_i (exact LoRA ΔW interpolation by default, the
  authors' A/B interpolation with ``exact=False``, or full-weight soups of separate models), one model per
  weight, decoded on its own.
- :func:`per_weight_generator`: one given model per weight (MODPO, DPO LW, anything trained per weight).
- :func:`cached_generator`: reuse greedy texts of a model already decoded (another method's endpoint, say).

All decode through :class:`sipo_fast.decoding.MODDecoder` (a single policy with weight [1] is plain
decoding), so every method sees the same prompt template, EOS handling and greedy tie-breaking.
Under several processes each decodes its share of the batches and the texts are gathered
(:func:`sipo_fast.distributed.generate_text`), so every rank gets the sweep one process would.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

_SOUP = "_eval_soup"


def _generate_text(decoder, prompts, **kwargs):
    from sipo_fast.distributed import generate_text

    return generate_text(decoder, prompts, **kwargs)


def _texts(outputs) -> list[str]:
    return [o.text if hasattr(o, "text") else str(o) for o in outputs]


def _decode_kwargs(max_new_tokens, template, batch_size, progress, do_sample, temperature, top_p, seed) -> dict:
    # The method's own settings only: a policy's generation_config (sampling, repetition penalty) would make the
    # methods of one comparison decode differently.
    kw = dict(max_new_tokens=max_new_tokens, template=template, batch_size=batch_size, progress=progress,
              use_model_defaults=False)
    if do_sample:
        kw.update(do_sample=True, temperature=temperature, top_p=top_p, seed=seed)
    return kw


def weight_set_texts(decoder, prompts: Sequence[str], weights, **generate_kwargs) -> list[list[str]]:
    """[B][S] texts: each of the B prompts decoded at each of the S weight vectors ``weights`` [S, N], in one
    :meth:`MODDecoder.generate` call with the weight set [B, S, N] (row b·S + s), so that the S rows of a prompt
    share its prefill. ``generate_kwargs``: ``template``, ``max_new_tokens``, sampling options. The policies' own
    ``generation_config`` is not read (``use_model_defaults=False``): the caller's settings alone decide."""
    S = len(weights)
    sets = [[[float(x) for x in w] for w in weights]] * len(prompts)    # (B, S, N)
    out = decoder.generate(list(prompts), weights=sets, use_model_defaults=False, **generate_kwargs)
    texts = [decoder.tokenizer.decode(out.generated_ids(r)) for r in range(len(prompts) * S)]
    return [texts[b * S:(b + 1) * S] for b in range(len(prompts))]


def mod_generator(decoder, *, max_new_tokens: int, template: str = "chat", batch_size: int = 16,
                  do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, progress: bool = True):
    """``generate(prompts, weights, seed)`` decoding with a :class:`MODDecoder`. Greedy by default, as in the
    paper. The prompts, sorted by length, go ``batch_size // |W|`` at a time (at least one) with the whole
    weight set (:func:`weight_set_texts`), so a batch holds at most ``batch_size`` rows when |W| <= batch_size;
    batch k of a sampled sweep is seeded ``batch_seed(seed, k)``."""
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else {}

    def generate(prompts: Sequence[str], weights: np.ndarray, seed: int | None = None) -> list[list[str]]:
        from tqdm.auto import tqdm

        from sipo_fast.data.formatting import encode_prompts
        from sipo_fast.decoding.inputs import batch_seed
        from sipo_fast.distributed import batched, current

        P, S = len(prompts), len(weights)
        lengths = [len(ids) for ids in encode_prompts(decoder.tokenizer, list(prompts), template)]
        order = sorted(range(P), key=lengths.__getitem__)                # similar lengths batch together
        per = max(1, batch_size // S)
        bar = tqdm(total=P, desc="MOD decoding", unit="prompt", disable=not progress or not current().is_main)

        def decode(start: int, stop: int) -> list[list[str]]:
            texts = weight_set_texts(decoder, [prompts[i] for i in order[start:stop]], weights,
                                     template=template, max_new_tokens=max_new_tokens,
                                     seed=batch_seed(seed, start // per), **sampling)
            bar.update(stop - start)
            return texts
        done = [t for chunk in batched(P, per, decode) for t in chunk]  # (P, S), prompts in length order
        bar.close()
        out = [[""] * P for _ in range(S)]
        for j, i in enumerate(order):
            for s in range(S):
                out[s][i] = done[j][s]
        return out                                                       # (W, P)
    return generate


def _decode_one(policy, tokenizer, prompts, kwargs) -> list[str]:
    """Decode with a single policy: a model, or (peft_model, adapter_name)."""
    from sipo_fast.decoding import MODDecoder

    if isinstance(policy, tuple):
        dec = MODDecoder(policy[0], tokenizer, adapter_names=[policy[1]])
    else:
        dec = MODDecoder([policy], tokenizer)
    return _texts(_generate_text(dec, list(prompts), weights=[1.0], **kwargs))


def soup_generator(policies, tokenizer, *, adapter_names: Sequence[str] | None = None, exact: bool = True,
                   max_new_tokens: int, template: str = "chat", batch_size: int = 16, do_sample: bool = False,
                   temperature: float = 1.0, top_p: float = 1.0, progress: bool = True):
    """DPO soups: at each weight w, decode the single model θ(w) = Σ_i w_i θ_i.

    ``policies``: one ``PeftModel`` carrying the N per-objective LoRA adapters (``adapter_names``, default all,
    in objective order), or a list of N full models. For LoRA, ``exact=True`` uses :func:`lora_soup`
    (ΔW(w) = Σ w_i s_i B_i A_i) and ``exact=False`` the authors' A/B interpolation :func:`lora_soup_ab`.
    The temporary soup adapter is removed afterwards, leaving ``policies`` as it was.
    """
    from sipo_fast.merging import full_soup, lora_soup, lora_soup_ab

    is_peft = hasattr(policies, "peft_config")
    names = list(adapter_names) if adapter_names is not None else (list(policies.peft_config) if is_peft else None)
    if not is_peft and (not isinstance(policies, (list, tuple)) or not policies):
        raise ValueError("soup_generator: pass a PeftModel with one LoRA adapter per objective or a list of models")
    if not is_peft and not exact:
        raise ValueError("soup_generator: exact=False (A/B interpolation) applies to LoRA adapters only")

    def generate(prompts: Sequence[str], weights: np.ndarray, seed: int | None = None) -> list[list[str]]:
        kw = _decode_kwargs(max_new_tokens, template, batch_size, progress, do_sample, temperature, top_p, seed)
        out = []
        for w in np.asarray(weights, dtype=np.float64).tolist():
            if is_peft:
                (lora_soup if exact else lora_soup_ab)(policies, names, w, _SOUP, overwrite=True)
                try:
                    out.append(_decode_one((policies, _SOUP), tokenizer, prompts, kw))
                finally:
                    policies.delete_adapter(_SOUP)
            else:
                out.append(_decode_one(full_soup(policies, w), tokenizer, prompts, kw))
        return out
    return generate


def per_weight_generator(policies, tokenizer, *, max_new_tokens: int, template: str = "chat",
                         batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0,
                         top_p: float = 1.0, progress: bool = True):
    """One policy per weight (a model, or ``(peft_model, adapter_name)``), e.g. MODPO's per-weight models.

    ``policies``: a list with one policy per sweep weight, in order (the generator checks the count), or a
    callable ``policy_for(weight) -> policy``, called only for the weights actually decoded (so a model that
    must be trained first is trained only when its texts are not cached)."""
    fixed = None if callable(policies) else list(policies)

    def generate(prompts: Sequence[str], weights: np.ndarray, seed: int | None = None) -> list[list[str]]:
        if fixed is not None and len(weights) != len(fixed):
            raise ValueError(f"per_weight_generator has {len(fixed)} policies but the sweep has {len(weights)} "
                             "weights; give one policy per weight, in the same order")
        kw = _decode_kwargs(max_new_tokens, template, batch_size, progress, do_sample, temperature, top_p, seed)
        pols = fixed if fixed is not None else [policies(w) for w in np.asarray(weights, dtype=np.float64).tolist()]
        return [_decode_one(p, tokenizer, prompts, kw) for p in pols]
    return generate


def cached_generator(generate, cache, keys: Sequence[str | None]):
    """Wrap ``generate`` with a :class:`~sipo_fast.eval.cache.TextCache`: ``keys[i]`` names the model that
    decodes sweep weight i (None: never cached). Weights whose texts are all cached are not decoded; the
    others go to ``generate`` together, in sweep order. Only for deterministic (greedy) generators."""
    keys = list(keys)

    def gen(prompts: Sequence[str], weights: np.ndarray, seed: int | None = None) -> list[list[str]]:
        if len(weights) != len(keys):
            raise ValueError(f"cached_generator has {len(keys)} keys but the sweep has {len(weights)} weights; give one key "
                             "per sweep weight, in order (None for a weight that must not be cached)")
        from sipo_fast.distributed import current

        # Rank 0's cache decides for every rank (the others hold an empty one), so all decode the same weights.
        out = current().on_main(lambda: [cache.get(k, prompts) if k is not None else None for k in keys])
        todo = [i for i, texts in enumerate(out) if texts is None]
        if todo:
            fresh = generate(prompts, np.asarray(weights)[todo], seed=seed)
            for i, texts in zip(todo, fresh):
                out[i] = list(texts)
                if keys[i] is not None:
                    cache.put(keys[i], prompts, out[i])
        return out
    return gen
