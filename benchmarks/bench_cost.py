"""Benchmark: what SIPO costs against MODPO, on the same machine, the same data and objectives, in one run.

    .venv/bin/python benchmarks/bench_cost.py [--preset demo] [--no-record] [section.key=value ...]

Three pipelines, all training their policies the way the preset says (LoRA shape, lengths, epochs):

1. **SIPO (sipo_fast)**, measured: the pipeline of the preset (its evaluation off) in a fresh run directory,
   wall and CPU seconds of each stage (align, sample, refine, filter, finetune) from ``<stage>/logs/timing.json``.
2. **MODPO as the paper trains it**, measured: the stage-1 DPO of the margin objective (the second objective's
   policy supplies the margin reward; its time is the trainer's own ``train_runtime`` in the align stage), then
   one MODPO run per weight w in W (``sipo_fast.pipeline.baselines.trained.train_modpo``, first objective trained, margins
   and π_ref's log-probs computed once, in the first run, for every weight), each timed. Both pipelines
   therefore pay for π_ref's log-probs once.
3. **The authors' SIPO pipeline, projected** from rates measured here: training as in (1) (their trainer is
   TRL's DPOTrainer without fused log-probs, so this is generous to them); sampling at the rate of their
   decoding loop (batch 1, one forward per policy plus an unused reference forward per token, separate KV
   caches), measured on a few prompts and multiplied out to prompts × |W| × the tokens sipo_fast generated;
   filtering at their per-sample scoring rate (one sample at a time, a policy and a reference forward per
   reward model, ``bench_pipeline.released_code_scoring``) multiplied out to every original and candidate.
   Refinement, when enabled, is projected at the decoding rate too.

A projection to the paper's 7B BeaverTails workload needs a GPU decode rate; it is printed only when
benchmarks/RESULTS.md holds one (a "GPU" section of bench_mod_decode), and labelled a projection.

Prints one table, appends it to benchmarks/RESULTS.md unless ``--no-record``, and ends with the line
``SIPO/MODPO = <wall-time ratio>``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

STAGES = ("align", "sample", "refine", "filter", "finetune")


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


# ------------------------------------------------------------------------------------------------ 1. SIPO
def run_sipo(config, run_dir: Path, progress: bool) -> dict[str, tuple[float, float]]:
    """{stage: (wall s, CPU s)} of a fresh pipeline run (evaluation off)."""
    from sipo_fast.pipeline import SIPOPipeline

    shutil.rmtree(run_dir, ignore_errors=True)  # a reused stage would cost 0 s: always measure from scratch
    SIPOPipeline(config, run_dir, progress=progress).run()
    out = {}
    for s in STAGES:
        t = json.loads((run_dir / s / "logs" / "timing.json").read_text())
        out[s] = (t["seconds"], t["cpu_seconds"])
    return out


def objective_runtime(run_dir: Path, objective: str) -> float:
    """Wall seconds of one objective's DPO in the align stage: the trainer's own ``train_runtime`` (training and
    its held-out evaluations; π_ref's log-probs, computed once before the objectives, are not in it)."""
    for line in (run_dir / "align" / "logs" / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "train_runtime" in row and row["objective"] == objective:
            return row["train_runtime"]
    raise ValueError(f"{run_dir}: no train_runtime for objective {objective!r} in align/logs/metrics.jsonl")


# ------------------------------------------------------------------------------------------------ 2. MODPO
def run_modpo(config, run_dir: Path, progress: bool) -> list[tuple[str, float, float]]:
    """(weight, wall s, CPU s) of one MODPO run per weight in W on the SIPO run's stage-1 split and policies."""
    from sipo_fast.pipeline.baselines.trained import train_modpo
    from sipo_fast.pipeline.context import Context
    from sipo_fast.pipeline.rundir.directory import RunDir

    ctx = Context(config, RunDir(run_dir), progress=progress)
    root = run_dir / "bench_modpo"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir()
    out = []
    for i, w in enumerate(config.sample.weights):
        _, wall, cpu = _timed(lambda: train_modpo(ctx, run_dir / "align", w, root / f"w{i}", scratch=root / ".scratch"))
        out.append((str([round(x, 3) for x in w]), wall, cpu))
    return out


# ------------------------------------------------------------------------------------------------ 3. authors
def authors_decode_rate(run_dir: Path, config, prompts: list[str], weight: list[float], new_tokens: int) -> float:
    """Tokens/s of the released MOD loop: batch 1, per token one forward per policy and one (unused) reference
    forward, each with its own KV cache, logits mixed as Σ w_i·logits_i, greedy. Written here because that
    loop is what is being projected; sipo_fast's decoder exists to replace it."""
    from sipo_fast.data.formatting import encode_prompts
    from sipo_fast.pipeline.context import Context
    from sipo_fast.pipeline.policies import load_policies
    from sipo_fast.pipeline.rundir.directory import RunDir

    ctx = Context(config, RunDir(run_dir), progress=False)
    pol = load_policies(ctx, run_dir / "align" / "policies")
    model, names = pol.model, pol.names
    tokens, t0 = 0, time.perf_counter()
    with torch.no_grad():
        for ids in encode_prompts(ctx.tokenizer, prompts, config.model.template):
            ids = torch.tensor([ids])
            caches, step = [None] * (len(names) + 1), ids
            for _ in range(new_tokens):
                logits = []
                for k in range(len(names) + 1):
                    if k < len(names):
                        model.set_adapter(names[k])
                        o = model(input_ids=step, past_key_values=caches[k], use_cache=True)
                    else:
                        with model.disable_adapter():
                            o = model(input_ids=step, past_key_values=caches[k], use_cache=True)
                    caches[k] = o.past_key_values
                    logits.append(o.logits[:, -1].float())
                mixed = sum(w * lg for w, lg in zip(weight, logits[: len(names)]))
                step = mixed.argmax(-1, keepdim=True)
                tokens += 1
    return tokens / (time.perf_counter() - t0)


def authors_scoring_seconds(run_dir: Path, config, pairs: list[tuple[str, str]], soups: list) -> float:
    """Seconds per (prompt, response) of the released per-sample scoring under the filter's K reward models."""
    from bench_pipeline import released_code_scoring

    from sipo_fast.merging import lora_soup
    from sipo_fast.pipeline.context import Context
    from sipo_fast.pipeline.policies import load_policies
    from sipo_fast.pipeline.rundir.directory import RunDir

    ctx = Context(config, RunDir(run_dir), progress=False)
    pol = load_policies(ctx, run_dir / "align" / "policies")
    names = list(pol.names)
    for i, w in enumerate(soups):
        names.append(lora_soup(pol.model, list(pol.names), w, f"soup{i}"))
    _, wall, _ = _timed(lambda: released_code_scoring(ctx, pol.model, names, [p for p, _ in pairs],
                                                      [r for _, r in pairs], beta=config.filter.beta))
    return wall / len(pairs)


def generated_tokens(run_dir: Path, tokenizer) -> int:
    """Tokens sipo_fast generated in stage 2 (every candidate, plus EOS where it stopped early)."""
    from sipo_fast.pipeline.rundir.files import read_jsonl

    rows = read_jsonl(run_dir / "sample" / "candidates.jsonl")
    return sum(len(tokenizer(r["candidate"], add_special_tokens=False)["input_ids"]) + 1 for r in rows)


def project_authors(config, run_dir: Path, sipo: dict, args) -> tuple[list[dict], float]:
    """Rows of the projected authors' pipeline and its total seconds."""
    from sipo_fast.pipeline.context import Context
    from sipo_fast.pipeline.rundir.directory import RunDir
    from sipo_fast.pipeline.rundir.files import read_jsonl

    ctx = Context(config, RunDir(run_dir), progress=False)
    prompts = read_jsonl(run_dir / "sample" / "prompts.jsonl")
    cands = read_jsonl(run_dir / "refine" / "candidates.jsonl")
    probe = [p["prompt"] for p in prompts[: args.probe_prompts]]
    rate = authors_decode_rate(run_dir, config, probe, config.sample.weights[0], args.probe_tokens)
    tokens = generated_tokens(run_dir, ctx.tokenizer)
    by_pid = {p["pid"]: p for p in prompts}
    pairs = [(by_pid[c["pid"]]["prompt"], c["candidate"]) for c in cands[: args.probe_samples]]
    per_sample = authors_scoring_seconds(run_dir, config, pairs, config.soup_weights if config.filter.soups else [])
    n_scored = len(prompts) * 2 + len(cands)  # both originals of every prompt and every candidate, one at a time
    rows = [
        {"pipeline": "authors (projected)", "part": "align", "wall_s": sipo["align"][0], "cpu_s": sipo["align"][1],
         "how": "= sipo_fast's measured align (same trainer settings)"},
        {"pipeline": "authors (projected)", "part": "sample", "wall_s": tokens / rate, "cpu_s": float("nan"),
         "how": f"{tokens} tokens at {rate:.2f} tok/s (batch-1 loop, measured on {len(probe)} prompts x "
                f"{args.probe_tokens} tokens)"},
    ]
    if config.refine.enabled:
        ref_tokens = sum(len(ctx.tokenizer(c[k] or "", add_special_tokens=False)["input_ids"]) + 1
                         for c in cands for k in ("review", "rewrite"))
        rows.append({"pipeline": "authors (projected)", "part": "refine", "wall_s": ref_tokens / rate,
                     "cpu_s": float("nan"), "how": f"{ref_tokens} review+rewrite tokens (as generated here) at "
                                                   f"{rate:.2f} tok/s"})
    rows += [
        {"pipeline": "authors (projected)", "part": "filter", "wall_s": n_scored * per_sample, "cpu_s": float("nan"),
         "how": f"{n_scored} sequences x {per_sample:.3f} s (per-sample scoring, measured on {len(pairs)})"},
        {"pipeline": "authors (projected)", "part": "finetune", "wall_s": sipo["finetune"][0],
         "cpu_s": sipo["finetune"][1], "how": "= sipo_fast's measured finetune"},
    ]
    return rows, sum(r["wall_s"] for r in rows)


def gpu_projection() -> str:
    """The 7B projection needs a GPU decode rate recorded in RESULTS.md; say so when there is none."""
    text = harness.RESULTS.read_text() if harness.RESULTS.exists() else ""
    if "NVIDIA" not in text and "cuda" not in text.lower():
        return ("7B BeaverTails projection: not made. benchmarks/RESULTS.md holds no GPU decode measurement yet "
                "(run benchmarks/gpu_check.sh on a GPU first).")
    return ("7B BeaverTails projection: not made. benchmarks/RESULTS.md has GPU sections, but this script does not "
            "read GPU decode rates yet (a known gap); project by hand from a measured tok/s there.")


# ------------------------------------------------------------------------------------------------ main
def build_rows(config, run_dir: Path, args) -> tuple[list[dict], float, float, float]:
    sipo = run_sipo(config, run_dir, not args.no_progress)
    rows = [{"pipeline": "SIPO (sipo_fast)", "part": s, "wall_s": w, "cpu_s": c, "how": "measured"}
            for s, (w, c) in sipo.items()]
    sipo_wall = sum(w for w, _ in sipo.values())
    rows.append({"pipeline": "SIPO (sipo_fast)", "part": "total", "wall_s": sipo_wall,
                 "cpu_s": sum(c for _, c in sipo.values()), "how": "sum of the stages"})
    margin_obj = config.data.objectives[1]
    runtime = objective_runtime(run_dir, margin_obj)
    dpo = (runtime, runtime * sipo["align"][1] / sipo["align"][0])  # CPU s at the align stage's CPU/wall ratio
    rows.append({"pipeline": "MODPO", "part": f"DPO ({margin_obj}, margin reward)", "wall_s": dpo[0], "cpu_s": dpo[1],
                 "how": "its train_runtime in the measured align stage (π_ref's log-probs: in the first MODPO run)"})
    modpo = run_modpo(config, run_dir, not args.no_progress)
    rows += [{"pipeline": "MODPO", "part": f"MODPO w={w}", "wall_s": wall, "cpu_s": cpu,
              "how": "measured (the first includes scoring the margins and π_ref's log-probs, shared by every weight)"
              if i == 0 else "measured"}
             for i, (w, wall, cpu) in enumerate(modpo)]
    modpo_wall = dpo[0] + sum(w for _, w, _ in modpo)
    rows.append({"pipeline": "MODPO", "part": "total", "wall_s": modpo_wall,
                 "cpu_s": dpo[1] + sum(c for _, _, c in modpo), "how": f"DPO + {len(modpo)} MODPO runs"})
    authors, authors_wall = project_authors(config, run_dir, sipo, args)
    rows += authors
    rows.append({"pipeline": "authors (projected)", "part": "total", "wall_s": authors_wall, "cpu_s": float("nan"),
                 "how": "projection from rates measured in this run"})
    return rows, sipo_wall, modpo_wall, authors_wall


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="demo")
    p.add_argument("--run-dir", default=None, help="where the measured pipeline runs (default runs/bench_cost/<preset>; "
                                                   "emptied first)")
    p.add_argument("--probe-prompts", type=int, default=2, help="prompts of the batch-1 decoding probe")
    p.add_argument("--probe-tokens", type=int, default=16, help="new tokens per probe prompt")
    p.add_argument("--probe-samples", type=int, default=6, help="samples of the per-sample scoring probe")
    p.add_argument("--no-record", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="config overrides (section.key=value)")
    args = p.parse_args(argv)
    from sipo_fast.pipeline import load_config

    torch.set_num_threads(min(2, torch.get_num_threads()))
    config = load_config(preset_name=args.preset, overrides=["eval.enabled=false", *args.overrides])
    run_dir = Path(args.run_dir or f"runs/bench_cost/{args.preset}")
    load0 = harness_load()
    rows, sipo_wall, modpo_wall, authors_wall = build_rows(config, run_dir, args)
    title = f"Cost: SIPO (sipo_fast) vs MODPO vs the authors' SIPO (projected), preset {args.preset}"
    notes = (f"|W| = {len(config.sample.weights)}; load average at start / end: {load0} / {harness_load()}. "
             f"SIPO/MODPO wall = {sipo_wall / modpo_wall:.2f}; authors (projected)/MODPO = "
             f"{authors_wall / modpo_wall:.2f}; authors (projected)/SIPO = {authors_wall / sipo_wall:.2f}. "
             "MODPO ends with |W| models, one per weight; SIPO with N policies that MOD mixes at any weight. "
             + gpu_projection())
    if args.no_record:
        print(harness.markdown_table(rows) + "\n\n" + notes)
    else:
        harness.record(title, rows, notes=notes)
    print(f"SIPO/MODPO = {sipo_wall / modpo_wall:.3f}")


def harness_load() -> str:
    """The 1-minute load average (a shared machine's timings need it beside them)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"


if __name__ == "__main__":
    main()
