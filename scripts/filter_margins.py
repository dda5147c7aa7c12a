"""Why the filter kept what it kept: per run directory, how the candidates' implicit rewards compare with
the two original responses of their prompt (from ``<run>/filter/rewards.jsonl``, written by the filter
stage).

    .venv/bin/python scripts/filter_margins.py runs/demo [runs/other ...] [--plot margins.png]

For each run: candidates; survivors (beat both originals under every implicit reward model, SIPO.md §3);
candidates that beat the *weaker* original of their pair under every model; and the best candidate's
margin against the *stronger* one, min_k (r_k(y) − max(r_k(y_a), r_k(y_b))), which is > 0 exactly for
survivors (in units of β·log-ratio, the rewards' own units).

``--plot FILE.png`` draws, per implicit reward model k (pooled over the runs given), histograms of
r_k(y) − min(r_k(y_a), r_k(y_b)) and r_k(y) − max(r_k(y_a), r_k(y_b)): the margins against the weaker and
the stronger original. A candidate survives when its margin against the stronger is > 0 under every model.
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
    rows = _rows(run_dir)
    if not rows:
        raise SystemExit(f"{path} is empty: the filter stage scored no candidate")
    weaker = sum(all(y > min(a, b) for y, a, b in zip(r["rewards"], r["rewards_a"], r["rewards_b"])) for r in rows)
    worst = [min(y - max(a, b) for y, a, b in zip(r["rewards"], r["rewards_a"], r["rewards_b"])) for r in rows]
    survivors = sum(bool(r["survives"]) for r in rows)
    return {"run": str(run_dir), "candidates": len(rows), "survivors": survivors,
            "survival rate": survivors / len(rows), "beat weaker original on all": weaker,
            "best margin vs stronger": max(worst)}


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "filter" / "rewards.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def model_names(run_dir: Path, k: int) -> list[str]:
    """The reward models' names from filter/stage.json (objectives, then soups), else r0..r{K-1}."""
    meta = run_dir / "filter" / "stage.json"
    names = json.loads(meta.read_text())["summary"].get("reward_models") if meta.exists() else None
    return list(names) if names and len(names) == k else [f"r{i}" for i in range(k)]


def margin_arrays(run_dirs: list[Path]) -> tuple[list[str], list[list[float]], list[list[float]]]:
    """(names, weak[k], strong[k]): every candidate's margin against the weaker / stronger original under
    reward model k, pooled over the runs."""
    names, weak, strong = None, None, None
    for d in run_dirs:
        rows = _rows(d)
        k = len(rows[0]["rewards"])
        names = names or model_names(d, k)
        weak = weak or [[] for _ in range(k)]
        strong = strong or [[] for _ in range(k)]
        for r in rows:
            for i, (y, a, b) in enumerate(zip(r["rewards"], r["rewards_a"], r["rewards_b"])):
                weak[i].append(y - min(a, b))
                strong[i].append(y - max(a, b))
    return names, weak, strong


def plot(run_dirs: list[Path], out: Path) -> Path:
    """One column per reward model; top row: margin vs the weaker original, bottom: vs the stronger."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, weak, strong = margin_arrays(run_dirs)
    fig, axes = plt.subplots(2, len(names), figsize=(3.2 * len(names), 5.2), squeeze=False, sharey="row")
    for i, name in enumerate(names):
        for row, (vals, what) in enumerate(((weak[i], "weaker"), (strong[i], "stronger"))):
            ax = axes[row][i]
            ax.hist(vals, bins=30, color="tab:blue" if row == 0 else "tab:orange")
            ax.axvline(0.0, color="black", lw=0.8)
            above = sum(v > 0 for v in vals)
            ax.set_title(f"{name}: vs {what} ({above}/{len(vals)} > 0)", fontsize=9)
            ax.set_xlabel("r(y) − r(original)", fontsize=8)
    fig.suptitle(f"candidate margins under each implicit reward model ({len(run_dirs)} run(s))", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dirs", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, metavar="FILE.png", help="histograms of the margins per reward model")
    args = p.parse_args(argv)
    out = [margins(d) for d in args.run_dirs]
    cols = list(out[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in out:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    if args.plot:
        print(f"plot: {plot(args.run_dirs, args.plot)}")


if __name__ == "__main__":
    sys.exit(main())
