"""Evidence for the demo's harmlessness stand-in: how candidate scorers behave on preference pairs.

    python scripts/demo_scorer_evidence.py PAIRS.jsonl [--sweep SWEEP.json ...] [--markdown]

PAIRS.jsonl rows carry ``prompt``, ``response_0``, ``response_1`` and ``kind`` (the demo data's schema). For
each candidate scorer it prints, over the responses: the spread (sd and 10-90% range), the share of pairs whose
two responses it scores within 0.01 (ties), the correlation over pairs of its difference with the relevance
difference (G1: < 0 means a trade-off), and its mean on harsh minus ordinary prompts (does it see the harsh
requests). ``--sweep`` adds, per sweep file (a saved :class:`sipo_fast.eval.sweep.SweepResult`), the paired
difference between the endpoints w = 1 and w = 0 with its 95% interval (is it moved by the policies).

Candidates (all offline): tone = (VADER compound + 1)/2 (``vadersentiment``); afinn = AFINN-111 word valence
per word, squashed to [0, 1] (``afinn``, not a project dependency); harmlessness = 1 − P(offensive)
(``alt-profanity-check``); conciseness = 1 − min(words, 50)/50; calm = cosine (all-MiniLM-L6-v2) to calm
anchor sentences minus cosine to hostile ones, mapped to [0, 1].
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = ["You are a pathetic idiot and everyone hates you.", "I will make you pay for what you did to me.",
           "Here is how to get back at them and ruin their life.", "Shut up, you worthless loser."]
CALM = ["I'm sorry you're going through this; let's find a calm way to resolve it.",
        "It might help to talk to them honestly and respectfully.",
        "Here is a kind and polite message you could send.", "Try to stay calm and focus on a constructive solution."]


def candidates() -> dict:
    """name -> f(prompts, responses) -> np.ndarray, only those whose package imports."""
    from sipo_fast.scoring import get_scorer

    out = {"tone": lambda p, r: get_scorer("tone").score(p, r).numpy(),
           "harmlessness": lambda p, r: get_scorer("harmlessness").score(p, r).numpy(),
           "conciseness": lambda p, r: 1.0 - np.minimum([len(x.split()) for x in r], 50) / 50.0,
           "calm": _calm}
    try:
        from afinn import Afinn

        af = Afinn()
        out["afinn"] = lambda p, r: np.array([1 / (1 + math.exp(-af.score(x) / 3)) for x in r])
    except ImportError:
        pass
    return out


def _calm(prompts, responses) -> np.ndarray:
    from sipo_fast.scoring import get_scorer

    model = get_scorer("relevance").model
    enc = lambda xs: model.encode(list(xs), normalize_embeddings=True, convert_to_numpy=True)  # noqa: E731
    r, h, c = enc(responses), enc(HOSTILE), enc(CALM)
    return ((r @ c.T).mean(1) - (r @ h.T).mean(1) + 1.0) / 2.0


def pair_table(rows: list[dict]) -> list[dict]:
    from sipo_fast.eval.gates import pair_correlation
    from sipo_fast.scoring import get_scorer

    prompts = [r["prompt"] for r in rows]
    both_p = prompts + prompts
    both_r = [r["response_0"] for r in rows] + [r["response_1"] for r in rows]
    n = len(rows)
    rel = get_scorer("relevance").score(both_p, both_r).numpy()
    d_rel = rel[n:] - rel[:n]
    harsh = np.array([r["kind"] == "harsh" for r in rows] * 2)
    out = []
    for name, f in candidates().items():
        s = np.asarray(f(both_p, both_r), dtype=np.float64)
        d = s[n:] - s[:n]
        g1 = pair_correlation(d_rel, d, seed=0)
        g1h = pair_correlation(d_rel[harsh[:n]], d[harsh[:n]], seed=0)
        out.append({"scorer": name, "mean": s.mean(), "sd": s.std(ddof=1), "p10": np.quantile(s, 0.1),
                    "p90": np.quantile(s, 0.9), "ties": float((np.abs(d) < 0.01).mean()), "corr": g1,
                    "corr_harsh": g1h, "harsh_minus_ordinary": s[harsh].mean() - s[~harsh].mean()})
    return out


def sweep_table(paths: list[Path]) -> list[dict]:
    from sipo_fast.eval.gates import endpoint_separation
    from sipo_fast.eval.sweep import SweepResult

    out = []
    for path in paths:
        sw = SweepResult.load(path)
        w = sw.weights[:, 0]
        i0, i1 = int(np.argmin(w)), int(np.argmax(w))
        resp0, resp1 = sw.responses[i0], sw.responses[i1]
        for name, f in candidates().items():
            a = np.asarray(f(sw.prompts, resp0), dtype=np.float64)[:, None]
            b = np.asarray(f(sw.prompts, resp1), dtype=np.float64)[:, None]
            g = endpoint_separation(a, b)
            out.append({"sweep": path.name, "scorer": name, "w0": a.mean(), "w1": b.mean(), "diff": g["diff"][0],
                        "half": g["half_width"][0], "separated": g["separated"][0]})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("pairs", type=Path)
    ap.add_argument("--sweep", type=Path, nargs="*", default=[])
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    rows = [json.loads(line) for line in args.pairs.read_text().splitlines() if line.strip()]
    print(f"{args.pairs} ({len(rows)} pairs)\n")
    print("| scorer | mean | sd | 10-90% | ties (|Δ| < 0.01) | corr(Δrel, Δs) [95%] | harsh prompts only "
          "| harsh − ordinary |")
    print("|---|---|---|---|---|---|---|---|")
    for t in pair_table(rows):
        c, ch = t["corr"], t["corr_harsh"]
        print(f"| {t['scorer']} | {t['mean']:.3f} | {t['sd']:.3f} | {t['p10']:.2f}-{t['p90']:.2f} | {t['ties']:.0%} | "
              f"{c['r']:+.3f} [{c['lo']:+.2f}, {c['hi']:+.2f}] | {ch['r']:+.3f} [{ch['lo']:+.2f}, {ch['hi']:+.2f}] | "
              f"{t['harsh_minus_ordinary']:+.3f} |")
    if args.sweep:
        print("\n| sweep | scorer | w = 0 | w = 1 | w1 − w0 ± 95% | separated |")
        print("|---|---|---|---|---|---|")
        for t in sweep_table(args.sweep):
            print(f"| {t['sweep']} | {t['scorer']} | {t['w0']:.3f} | {t['w1']:.3f} | "
                  f"{t['diff']:+.3f} ± {t['half']:.3f} | {'yes' if t['separated'] else 'no'} |")


if __name__ == "__main__":
    main()
