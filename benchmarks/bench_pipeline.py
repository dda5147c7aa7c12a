"""Benchmark: the SIPO pipeline (``sipo_fast.pipeline``).

Two tables:
  1. filter scoring (stage 2.3): the implicit rewards of every (prompt, response) under the K reward models (N
     LoRA policies + |W| exact DPO soups), as ``sipo_fast.pipeline`` computes them (distinct pairs only, one
     batched mixed-adapter forward per chunk with the reference riding along, fused log-probs) against the
     released code's way (``select_sample.py``: one sample at a time, per reward model one policy forward and
     one reference forward over full logits). Same numbers (max |Δr| reported), ratio of wall and CPU time.
  2. per-stage wall time of a whole pipeline run (``--preset``), read from the run directory's stage logs.

    flock /tmp/sipo_bench.lock .venv/bin/python benchmarks/bench_pipeline.py [--preset smoke] [--prompts 8]
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import record  # noqa: E402


def _timed(fn):
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w0, time.process_time() - c0


def _policies(model_name: str, soups: int):
    """π_ref + 2 random LoRA policies (r=64, alpha=1, q/k/v/o: the paper's shape) + exact soups."""
    from peft import LoraConfig, get_peft_model

    from sipo_fast.merging import lora_soup
    from sipo_fast.pipeline import PipelineConfig
    from sipo_fast.pipeline.context import Context
    from sipo_fast.pipeline.rundir.directory import RunDir

    ctx = Context(PipelineConfig.from_dict({"model": {"name": model_name}}), RunDir(tempfile.mkdtemp()),
                  progress=False)
    cfg = LoraConfig(r=64, lora_alpha=1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                     init_lora_weights=False)
    torch.manual_seed(0)
    model = get_peft_model(ctx.load_base(), cfg, adapter_name="helpful")
    model.add_adapter("harmless", cfg)
    names = ["helpful", "harmless"]
    for i in range(soups):
        w = (i + 1) / (soups + 1)
        names.append(lora_soup(model, ["helpful", "harmless"], [w, 1 - w], f"soup{i}"))
    return ctx, model.eval(), names


def _pairs(prompts: int, candidates: int):
    """Each prompt with its two originals and ``candidates`` MOD candidates, two of which coincide (greedy
    decoding at neighbouring weights often returns the same text; the pipeline scores it once)."""
    ps, rs = [], []
    for i in range(prompts):
        base = f"My neighbour {i} keeps parking in my spot and laughs about it. What should I say to them?"
        texts = [f"Calmly ask them to stop, version {i}. " * 4, f"Tell them off loudly, version {i}. " * 4]
        texts += [f"Talk to them politely and suggest a schedule, idea {i} {j % max(1, candidates - 1)}. " * 4
                  for j in range(candidates)]
        ps += [base] * len(texts)
        rs += texts
    return ps, rs


def released_code_scoring(ctx, model, names, prompts, responses, beta=0.1):
    """One sample at a time; per reward model, a policy forward and a reference forward (full logits)."""
    from sipo_fast.pipeline.stages.rewards import encode
    from sipo_fast.training import sequence_logprobs_ref

    out = torch.empty(len(prompts), len(names))
    with torch.no_grad():
        for b, (p, r) in enumerate(zip(prompts, responses)):
            enc = encode(ctx, [p], [r], max_length=512)
            args = (enc["input_ids"], enc["attention_mask"], enc["response_mask"])
            for k, name in enumerate(names):
                model.set_adapter(name)
                lp = sequence_logprobs_ref(model, *args)
                with model.disable_adapter():
                    lp_ref = sequence_logprobs_ref(model, *args)
                out[b, k] = beta * (lp - lp_ref)
    return out


def scoring_rows(args) -> list[dict]:
    from sipo_fast.pipeline.stages.rewards import rewards

    ctx, model, names = _policies(args.model, args.soups)
    prompts, responses = _pairs(args.prompts, args.candidates)
    ours, w_ours, c_ours = _timed(lambda: rewards(ctx, (model, names), None, prompts, responses, beta=0.1,
                                                  max_length=512, batch_size=args.batch_size))
    ref, w_ref, c_ref = _timed(lambda: released_code_scoring(ctx, model, names, prompts, responses))
    return [{"model": args.model, "pairs": len(prompts), "distinct": len(set(zip(prompts, responses))),
             "reward_models": len(names), "released_s": w_ref, "sipo_fast_s": w_ours, "time_ratio": w_ours / w_ref,
             "cpu_time_ratio": c_ours / c_ref, "speedup": w_ref / w_ours,
             "max|Δr|": float((ours - ref).abs().max())}]


def stage_rows(args) -> list[dict]:
    from sipo_fast.pipeline import SIPOPipeline, load_config

    out = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    config = load_config(preset_name=args.preset, overrides=args.overrides)
    t0 = time.perf_counter()
    SIPOPipeline(config, out / "run", progress=False).run()
    total = time.perf_counter() - t0
    rows = []
    manifest = json.loads((out / "run" / "manifest.json").read_text())["stages"]
    for stage in ("align", "sample", "refine", "filter", "finetune", "eval"):
        if stage in manifest:
            secs = json.loads((out / "run" / stage / "logs" / "timing.json").read_text())["seconds"]
            summary = manifest[stage]["summary"]
            facts = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            rows.append({"preset": args.preset, "stage": stage, "seconds": secs, "share": secs / total,
                         "facts": ", ".join(f"{k}={v}" for k, v in facts.items())})
    rows.append({"preset": args.preset, "stage": "total (with loading)", "seconds": total, "share": 1.0, "facts": ""})
    shutil.rmtree(out, ignore_errors=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default", help="default (SmolLM2-135M) or tiny")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--candidates", type=int, default=3, help="MOD candidates per prompt (|W|)")
    p.add_argument("--soups", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--preset", default="smoke", help="preset of the per-stage timing run ('' to skip)")
    p.add_argument("overrides", nargs="*", help="config overrides for the timing run")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    record("Filter-stage implicit-reward scoring: sipo_fast vs the released per-sample loop", scoring_rows(args),
           notes="time_ratio = sipo_fast / released wall time (cpu_time_ratio: process CPU time, steadier on a "
                 "shared machine); lower is better. Released = select_sample.py's way: batch 1, per reward model "
                 "a policy and a reference forward over full logits. sipo_fast = distinct pairs only, one "
                 "mixed-adapter forward per chunk for the K models and the reference, fused log-probs.")
    if args.preset:
        record(f"Pipeline stage times, preset {args.preset}", stage_rows(args),
               notes="Wall time of each stage as logged in <run>/<stage>/logs/timing.json; total includes "
                     "validation, imports and model loading.")


if __name__ == "__main__":
    main()
