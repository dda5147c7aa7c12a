"""Evidence for issue 7: SIPO's Pareto front against MOD, DPO soups, MODPO and DPO LW on the embedded default model
(SmolLM2-135M-Instruct, the shipped demo data, relevance vs harmlessness scorers), over several seeds.

    .venv/bin/python benchmarks/pareto_demo.py --seeds 0 1 2

Not under the benchmark lock: it runs for hours and measures quality, not speed (its wall times are context).

For each seed s: the demo pipeline (``--preset demo``, ``seed=s``, its own eval stage off) in
``<runs-dir>/seed<s>``, then :func:`sipo_fast.pipeline.baselines.compare.evaluate_run` for each method on W ∪ {0, 1}, timed.
Then one report over all seeds with one reference point for every hypervolume: ``<out>/<name>.md`` and
``.png`` (the per-seed pipeline diagnostics and timings in its notes), and a summary section appended to
benchmarks/RESULTS.md. Finished stages and sweeps are reused, so an interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from sipo_fast.eval.report import diagnostics_markdown  # noqa: E402
from sipo_fast.pipeline.baselines.compare import evaluate_run  # noqa: E402
from sipo_fast.eval.report import build_report, plot_fronts  # noqa: E402
from sipo_fast.pipeline import SIPOPipeline, load_config  # noqa: E402

STAGES = ("align", "sample", "refine", "filter", "finetune")


def stage_seconds(run_dir: Path) -> dict[str, float]:
    """Wall time of each pipeline stage, from its unhashed logs/timing.json (0 if it was reused)."""
    out = {}
    for s in STAGES:
        f = run_dir / s / "logs" / "timing.json"
        out[s] = json.loads(f.read_text())["seconds"] if f.exists() else float("nan")
    return out


def run_seed(seed: int, args) -> tuple[list, dict, dict, dict]:
    run_dir = Path(args.runs_dir) / f"seed{seed}"
    config = load_config(preset_name=args.preset, overrides=[f"seed={seed}", "eval.enabled=false", *args.override])
    t0 = time.perf_counter()
    SIPOPipeline(config, run_dir, progress=not args.no_progress).run()
    logging.info("seed %d: pipeline done in %.0f s", seed, time.perf_counter() - t0)
    results, method_seconds, diag = [], {}, {}
    for m in args.methods:
        t = time.perf_counter()
        ev = evaluate_run(run_dir, methods=[m], num_prompts=args.num_prompts, progress=not args.no_progress,
                          write=False, baseline=None)
        method_seconds[m] = time.perf_counter() - t
        results += ev.results
        diag = ev.diagnostics
    return results, diag, stage_seconds(run_dir), method_seconds


def filter_markdown(run_dirs: dict, png: Path | None) -> str:
    """Per seed, the filter's counts from filter/stage.json (survival rate, candidates beating the weaker /
    the stronger original under every implicit reward model and under each one), and the margin histograms."""
    lines = ["| seed | candidates | survivors | survival rate | beat weaker on all | best min-margin vs stronger | "
             "beat weaker, per model | beat stronger, per model |", "|---|---|---|---|---|---|---|---|"]
    for seed, d in run_dirs.items():
        summ = json.loads((d / "filter" / "stage.json").read_text())["summary"]
        m = summ.get("margins", {})
        per = lambda key: ", ".join(f"{k} {v}" for k, v in m.get(key, {}).items())  # noqa: E731
        lines.append(f"| {seed} | {summ['candidates']} | {summ['survivors']} | {m.get('survival_rate', float('nan')):.1%} | "
                     f"{m.get('beat_weaker_all', '—')} | {m.get('best_margin_vs_stronger', '—')} | "
                     f"{per('beat_weaker_per_model')} | {per('beat_stronger_per_model')} |")
    text = ("Margins are r_k(y) − r_k(original) in β·log-ratio units; a candidate survives when it beats the stronger "
            "original under every model k (counts from each seed's filter/stage.json).\n\n" + "\n".join(lines))
    if png is not None:
        text += f"\n\n![Filter margins per implicit reward model]({png.name})"
    return text


def paired_gains_markdown(results: list, method: str = "sipo", baseline: str = "mod") -> str:
    """Per weight and objective, method − baseline paired on the same (seed, prompt): mean ± 95% Student-t
    half-width over all seeds' prompts (``sipo_fast.eval.stats.mean_ci``), maximisation orientation."""
    from sipo_fast.eval.stats import mean_ci

    by = {(r.method, r.seed): r for r in results}
    seeds = sorted(s for m, s in by if m == method and (baseline, s) in by)
    if not seeds:
        return f"(no seed has both {method} and {baseline})"
    ref = by[(method, seeds[0])]
    diffs = np.concatenate([by[(method, s)].maximised() - by[(baseline, s)].maximised() for s in seeds], axis=1)
    mean, half = mean_ci(diffs, 0.95, axis=1)                                   # [W, N]
    lines = ["| w | " + " | ".join(f"{o}: {method} − {baseline} ± 95%" for o in ref.objectives) + " |",
             "|---|" + "---|" * len(ref.objectives)]
    for i, w in enumerate(ref.weights):
        lines.append(f"| {w[0]:.2g} | " + " | ".join(f"{mean[i, k]:+.4f} ± {half[i, k]:.4f}"
                                                   for k in range(len(ref.objectives))) + " |")
    return (f"Paired over {diffs.shape[1]} (seed, prompt) pairs ({len(seeds)} seed(s)); an interval that excludes 0 "
            "is a per-weight difference the prompts support.\n\n" + "\n".join(lines))


def timing_markdown(stage_s: dict, method_s: dict) -> str:
    lines = ["| seed | " + " | ".join(STAGES) + " | SIPO pipeline total | " +
             " | ".join(f"eval {m}" for m in next(iter(method_s.values()))) + " |",
             "|---|" + "---|" * (len(STAGES) + 1 + len(next(iter(method_s.values()))))]
    for seed in stage_s:
        st, ms = stage_s[seed], method_s[seed]
        lines.append(f"| {seed} | " + " | ".join(f"{st[s]:.0f}" for s in STAGES) + f" | {sum(st.values()):.0f} | " +
                     " | ".join(f"{v:.0f}" for v in ms.values()) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--preset", default="demo")
    p.add_argument("--override", nargs="*", default=[], metavar="section.key=value",
                   help="extra config overrides for every seed's pipeline")
    p.add_argument("--methods", nargs="+", default=["sipo", "mod", "soups", "modpo", "dpo_lw"])
    p.add_argument("--num-prompts", type=int, default=None, help="held-out prompts (default: the preset's eval.num_prompts)")
    p.add_argument("--runs-dir", default="runs/pareto_demo")
    p.add_argument("--out", default="docs")
    p.add_argument("--name", default="demo_report")
    p.add_argument("--commentary", metavar="FILE.md", help="hand-written reading of the numbers, put at the top")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-record", action="store_true", help="do not append to benchmarks/RESULTS.md (trial runs)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(min(2, torch.get_num_threads()))

    results, diags, stage_s, method_s = [], {}, {}, {}
    for seed in args.seeds:
        r, diags[seed], stage_s[seed], method_s[seed] = run_seed(seed, args)
        results += r
    objectives = results[0].objectives
    out = Path(args.out)
    run_dirs = {seed: Path(args.runs_dir) / f"seed{seed}" for seed in args.seeds}
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from filter_margins import plot as plot_margins
    filter_png = plot_margins(list(run_dirs.values()), out / f"{args.name}_filter.png")
    commentary = Path(args.commentary).read_text().strip() + "\n\n" if args.commentary else ""
    cmd = ".venv/bin/python " + " ".join(["benchmarks/pareto_demo.py"] + sys.argv[1:])
    notes = (f"### How this was made\n\n- command: `{cmd}`\n- machine: {harness.machine()}\n"
             f"- preset `{args.preset}` with seed = s for each s in {args.seeds} (training seed, and the seed "
             "recorded with each sweep; decoding is greedy). The pipeline's data split and prompts are the same "
             "for every seed, so the per-weight table pools the same prompts once per seed: its CIs treat seeds as extra "
             "samples and are narrower than a fresh-prompt CI would be.\n- methods: " + ", ".join(args.methods) + "; each method's front is its per-weight "
             "mean points. MODPO's and DPO LW's endpoints are the stage-1 policies (at a one-hot weight both are DPO "
             "on that objective; MODPO's w_k → 0 tends to the other objective's DPO policy).\n\n"
             "### Pipeline diagnostics per seed\n\n" + diagnostics_markdown(diags, objectives) +
             "\n\n### The filter per seed\n\n" + filter_markdown(run_dirs, filter_png) +
             ("\n\n### Per-weight gain of sipo over mod, paired\n\n" + paired_gains_markdown(results)
              if {"sipo", "mod"} <= set(args.methods) else "") +
             "\n\n### Wall time per seed (seconds)\n\nEval columns include generation, scoring and, for modpo and "
             "dpo_lw, training one model per interior weight.\n\n" + timing_markdown(stage_s, method_s))
    title = (f"{' vs '.join(args.methods)} on preset {args.preset} ({', '.join(objectives)}; "
             f"{len(args.seeds)} seed{'s' if len(args.seeds) > 1 else ''})")
    report = build_report(results, baseline="mod" if "mod" in args.methods else None, title=title, notes=notes)
    png = plot_fronts(report, out / f"{args.name}.png")
    report.plot_path = png.name
    md = report.to_markdown()
    if commentary:
        head, _, rest = md.partition("\n\n")
        md = f"{head}\n\n## Reading\n\n{commentary}{rest}"
    (out / f"{args.name}.md").write_text(md)
    print(f"report: {out / (args.name + '.md')}")
    if args.no_record:
        return
    rows = []
    for m in report.methods:
        hv = report.hypervolumes(m)
        rows.append({"method": m, "seeds": len(hv), "HV mean": float(np.mean(hv)),
                     "HV sd": float(np.std(hv, ddof=1)) if len(hv) > 1 else float("nan"),
                     "HV / HV(mod)": float(np.mean(hv) / np.mean(report.hypervolumes("mod")))
                     if "mod" in report.methods else float("nan")})
    harness.record("Pareto front: SIPO vs baselines on the embedded default", rows, command=cmd,
                   notes=f"Reference point {np.round(report.ref, 4).tolist()} (maximisation; nadir − 10% of range). "
                         f"Full report: {out / (args.name + '.md')}.")


if __name__ == "__main__":
    main()
