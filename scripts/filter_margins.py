"""Why the filter kept what it kept: per run directory, how the candidates' implicit rewards compare with
the two original responses of their prompt (from ``<run>/filter/rewards.jsonl``, written by the filter
stage).

    .venv/bin/python scripts/filter_margins.py runs/demo [runs/other ...]

For each run: candidates; survivors (beat both originals under every implicit reward model, SIPO.md §3);
candidates that beat the *weaker* original of their pair under every model; and the best candidate's
margin against the *stronger* one, min_k (r_k(y) − max(r_k(y_a), r_k(y_b))), which is > 0 exactly for
survivors (in units of β·log-ratio, the rewards' own units).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def margins(run_dir: Path) -> dict:
    path = run_dir / "filter" / "rewards.jsonl"
    if not path.exists():
        raise SystemExit(f"{path} not found: run the filter stage first (sipo-fast filter --output-dir {run_dir})")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise SystemExit(f"{path} is empty: the filter stage scored no candidate")
    weaker = sum(all(y > min(a, b) for y, a, b in zip(r["rewards"], r["rewards_a"], r["rewards_b"])) for r in rows)
    worst = [min(y - max(a, b) for y, a, b in zip(r["rewards"], r["rewards_a"], r["rewards_b"])) for r in rows]
    return {"run": str(run_dir), "candidates": len(rows), "survivors": sum(bool(r["survives"]) for r in rows),
            "beat weaker original on all": weaker, "best margin vs stronger": max(worst)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    args = p.parse_args(argv)
    out = [margins(d) for d in args.run_dirs]
    cols = list(out[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in out:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")


if __name__ == "__main__":
    sys.exit(main())
