"""π_ref's log-probs computed once, outside the training loop, for every run that trains from that reference
(stage 1's objectives, MODPO's weights, stage 3's policy): :func:`reference_table` scores the sequences with the
trainer's own tokenisation and truncation, :func:`with_reference` puts the numbers in each run's rows, and the
:class:`~sipo_fast.training.trainer.FusedDPOTrainer` then skips its reference forward.
"""
from __future__ import annotations

import torch
from datasets import Dataset

from sipo_fast.training.logprobs import policy_logprobs
from sipo_fast.training.trainer import REF_COLUMNS, FusedDPOConfig, tokenize_pairs


def reference_table(model, pairs: list[dict], tokenizer, *, template: str = "chat", max_length: int = 512,
                    batch_size: int = 16) -> dict[tuple[str, str], float]:
    """log π_ref(y|x) of every (prompt, response) in ``pairs`` (rows with prompt, chosen, rejected), with ``model``
    as π_ref, through exactly the tokenisation (:func:`tokenize_pairs`), truncation and fused log-prob path a
    :class:`FusedDPOTrainer` with these settings uses for its reference, in fixed batches of ``2 * batch_size``
    distinct sequences (a sequence in several pairs is scored once), so the numbers do not depend on the
    training batches. Under several processes each rank scores a share of
    the batches and every rank gets the whole table (:func:`sipo_fast.distributed.batched`).

    Preference runs that share π_ref and their sequences (stage 1's objectives: the same pairs, ordered by
    another preference; MODPO's weights) compute it once: :func:`with_reference` puts it in each run's rows,
    and the trainer then skips its reference forward. Pairs the trainer would drop (a prompt that fills
    ``max_length``) are absent from the table."""
    from sipo_fast.distributed import batched

    rows = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in pairs]
    ds = tokenize_pairs(Dataset.from_list(rows), tokenizer, template, max_length, "reference")
    # The trainer's resolved collator settings (build_preference_trainer's: no bf16/fp16 autocast): TRL's
    # DataCollatorForPreference scores prompt + response, cut to max_length by truncation_mode, right-padded.
    args = FusedDPOConfig(output_dir="unused", report_to="none", max_length=max_length, bf16=False, fp16=False)
    cut = slice(None, max_length) if args.truncation_mode == "keep_start" else slice(-max_length, None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Each distinct (prompt, response) once, those of one prompt side by side, so that a sequence shared by
    # several pairs (stage 3's y_c is the chosen side of two) is scored once and each prompt runs once per batch
    # (policy_logprobs' prompt sharing, shared_prompt.py).
    seqs: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    for row in ds:
        for side in ("chosen", "rejected"):
            key = (row["prompt"], row[side])
            if key not in seqs:
                ids = row["prompt_ids"] + row[f"{side}_ids"]
                mask = [0] * len(row["prompt_ids"]) + [1] * len(row[f"{side}_ids"])
                seqs[key] = (ids[cut], mask[cut])
    first = {p: i for i, p in enumerate(dict.fromkeys(k[0] for k in seqs))}
    keys = sorted(seqs, key=lambda k: first[k[0]])  # grouped by prompt, in order of appearance (stable)

    @torch.no_grad()
    def score(start: int, stop: int) -> torch.Tensor:
        chunk = [seqs[k] for k in keys[start:stop]]
        width = max(len(ids) for ids, _ in chunk)
        batch = {name: torch.zeros(len(chunk), width, dtype=torch.long)
                 for name in ("input_ids", "attention_mask", "response_mask")}
        batch["input_ids"].fill_(pad)
        for i, (ids, mask) in enumerate(chunk):
            batch["input_ids"][i, : len(ids)] = torch.tensor(ids)
            batch["attention_mask"][i, : len(ids)] = 1
            batch["response_mask"][i, : len(ids)] = torch.tensor(mask)
        return policy_logprobs([model], batch, progress=False)[:, 0]

    was_training = model.training
    model.eval()
    try:
        logps = torch.cat(batched(len(keys), 2 * batch_size, score)) if keys else torch.zeros(0)
    finally:
        model.train(was_training)
    return dict(zip(keys, logps.tolist()))


def with_reference(pairs: list[dict], table: dict[tuple[str, str], float] | None) -> list[dict]:
    """``pairs`` with the reference columns from :func:`reference_table` (unchanged if ``table`` is None). A pair
    the table lacks (one the trainer drops for its prompt length) gets NaN, which no loss ever reads."""
    if table is None:
        return pairs
    nan = float("nan")
    return [{**p, REF_COLUMNS[0]: table.get((p["prompt"], p["chosen"]), nan),
             REF_COLUMNS[1]: table.get((p["prompt"], p["rejected"]), nan)} for p in pairs]
