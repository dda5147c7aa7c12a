"""Vocabulary checks for MOD: the policies mix logits token by token, so they must share one tokenizer."""
from __future__ import annotations

from typing import Sequence


def output_vocab_size(model) -> int:
    emb = model.get_output_embeddings()
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    return int(model.config.vocab_size)


def _first_vocab_difference(a: dict[str, int], b: dict[str, int]) -> tuple[int, str | None, str | None] | None:
    """Lowest token id whose token differs between two token→id maps (None if they are identical)."""
    if a == b:
        return None
    ia = {i: t for t, i in a.items()}
    ib = {i: t for t, i in b.items()}
    for i in range(max(len(ia), len(ib), max(ia, default=-1) + 1, max(ib, default=-1) + 1)):
        if ia.get(i) != ib.get(i):
            return i, ia.get(i), ib.get(i)
    return None


def check_vocabularies(tokenizers: Sequence, names: Sequence[str] | None = None) -> None:
    """Raise ValueError unless every tokenizer has the same size and the same token→id mapping; the
    message names the first differing token id and what each side maps it to."""
    names = list(names) if names is not None else [f"policy {i}" for i in range(len(tokenizers))]
    vocab0 = tokenizers[0].get_vocab()
    for name, tok in zip(names[1:], tokenizers[1:]):
        vocab = tok.get_vocab()
        diff = _first_vocab_difference(vocab0, vocab)
        if diff is not None:
            i, t0, t1 = diff
            raise ValueError(f"{name}'s vocabulary differs from {names[0]}'s ({len(vocab)} vs {len(vocab0)} tokens): "
                             f"first difference at token id {i}: {t1!r} in {name} but {t0!r} in {names[0]}. "
                             "MOD mixes logits token by token, so all policies must share one tokenizer")


def local_tokenizer(model):
    """The tokenizer saved beside a model loaded from a local directory, or None."""
    import os

    path = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    if not path or not os.path.isdir(path):
        return None
    if not any(os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception:  # a directory without a loadable tokenizer: nothing to compare
        return None
