"""Benchmark: the sample stage's MOD decoding with every weight of W in one batch (each prompt's prefill shared by
its |W| rows, ``all_weights_parts``) against one decoder call per weight (the loop it replaced), same run.

Shape of the ``demo`` preset's sample stage: the embedded SmolLM2-135M-Instruct with two LoRA adapters (r = 16,
random B) as the policies, ``--prompts`` demo prompts (64) × W = {0.2, 0.4, 0.6, 0.8}, ``--max-new-tokens`` (48)
greedy tokens, ``batch_size`` = all prompts. Variants alternate within each repeat; the median ratio is
reported, with the number of rows whose text differs between the two (greedy: float rounding only).

    flock /tmp/sipo_bench.lock .venv/bin/python benchmarks/bench_sample_weights.py [--quick] [--no-record]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import demo_lora_policies, record  # noqa: E402

W = [[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="8 prompts, 8 tokens, 1 repeat, not recorded")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.prompts, a.max_new_tokens, a.repeat, a.no_record = 8, 8, 1, True

    from sipo_fast.data import load_demo
    from sipo_fast.decoding import MODDecoder

    pm, tok = demo_lora_policies()
    prompts = list(dict.fromkeys(r["prompt"] for r in load_demo("train")))[: a.prompts]
    dec = MODDecoder(pm, tok, adapter_names=["helpful", "harmless"])
    kw = dict(max_new_tokens=a.max_new_tokens, progress=False)

    def per_weight() -> list[list[str]]:
        return [[o.text for o in dec.generate_text(prompts, weights=w, batch_size=len(prompts), **kw)] for w in W]

    def all_weights() -> list[list[str]]:
        rows = [q for q in prompts for _ in W]
        outs = dec.generate_text(rows, weights=[w for _ in prompts for w in W], batch_size=len(rows), **kw)
        return [[outs[i * len(W) + s].text for i in range(len(prompts))] for s in range(len(W))]

    times: dict[str, list[float]] = {"per weight": [], "all weights": []}
    texts = {}
    fns = {"per weight": per_weight, "all weights": all_weights}
    for i in range(a.repeat):
        for name in (("per weight", "all weights") if i % 2 == 0 else ("all weights", "per weight")):
            t0 = time.perf_counter()
            texts[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)
    differ = sum(x != y for s in range(len(W)) for x, y in zip(texts["per weight"][s], texts["all weights"][s]))
    ratios = [x / y for x, y in zip(times["per weight"], times["all weights"])]
    rows = len(prompts) * len(W)
    table = [{"variant": f"one decoder call per weight ({len(prompts)} rows each)", "rows": rows,
              "median s": round(statistics.median(times["per weight"]), 1), "speed-up": "1.00×"},
             {"variant": "every weight in one batch (shared prefill)", "rows": rows,
              "median s": round(statistics.median(times["all weights"]), 1),
              "speed-up": f"{statistics.median(ratios):.2f}×"}]
    for row in table:
        print(row)
    print(f"rows whose text differs: {differ} of {rows}; threads = {torch.get_num_threads()}")
    if not a.no_record:
        record("Sample stage: every weight in one MOD batch vs one call per weight (SmolLM2-135M, 2 LoRA)", table,
               notes=f"{len(prompts)} prompts × |W| = {len(W)}, {a.max_new_tokens} greedy tokens, {a.repeat} "
               f"alternating repeats, {torch.get_num_threads()} threads; rows whose text differs: {differ} of {rows}.")


if __name__ == "__main__":
    main()
