"""Benchmark: the filter's implicit-reward scoring with each shared prompt run once (``share_prompts=True``, the
default) against every row run in full (``share_prompts=False``), in the same process and run.

The call shape is the ``demo`` preset's filter: the embedded SmolLM2-135M-Instruct, two LoRA adapters (r = 16,
random B) and their w = 0.5 soup as the implicit reward models, the base with adapters disabled as π_ref, all
four in one mixed-adapter forward, ``batch_size`` 16 rows, ``max_length`` 96, chat template. Rows: for each of
``--prompts`` conflicting prompts of the shipped demo data, its two originals and ``--candidates`` other
responses of the data standing in for MOD candidates (6 rows per prompt, as in the pipeline). Variants
alternate within each repeat so load drifts hit both; the median ratio is reported, with the largest
difference of the two results (float rounding only: both are the same causal computation).

    flock /tmp/sipo_bench.lock .venv/bin/python benchmarks/bench_filter_scoring.py [--quick] [--no-record]
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


def rows(num_prompts: int, candidates: int) -> tuple[list[str], list[str]]:
    from sipo_fast.data import load_demo

    data = [r for r in load_demo("train") if r["response_0"] and r["response_1"]]
    prompts, responses = [], []
    for i, r in enumerate(data[:num_prompts]):
        others = [data[(i + 1 + j) % len(data)][f"response_{j % 2}"] for j in range(candidates)]
        for y in [r["response_0"], r["response_1"], *others]:
            prompts.append(r["prompt"])
            responses.append(y)
    return prompts, responses


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--candidates", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=96)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="16 prompts, 1 repeat, not recorded")
    p.add_argument("--no-record", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.prompts, a.repeat, a.no_record = 16, 1, True

    from sipo_fast.data.formatting import encode_pairs
    from sipo_fast.merging import lora_soup
    from sipo_fast.training import implicit_rewards

    pm, tok = demo_lora_policies()
    lora_soup(pm, ["helpful", "harmless"], [0.5, 0.5], "soup0")
    pm.eval()
    prompts, responses = rows(a.prompts, a.candidates)
    batch = encode_pairs(tok, prompts, responses, max_length=a.max_length)
    policies = (pm, ["helpful", "harmless", "soup0"])

    def score(share: bool) -> tuple[float, torch.Tensor]:
        t0 = time.perf_counter()
        r = implicit_rewards(policies, None, batch, beta=0.1, batch_size=a.batch_size, progress=False,
                             share_prompts=share)
        return time.perf_counter() - t0, r

    times = {True: [], False: []}
    diff = 0.0
    for i in range(a.repeat):
        for share in ((False, True) if i % 2 == 0 else (True, False)):
            t, r = score(share)
            times[share].append(t)
            if share:
                shared = r
            else:
                plain = r
        diff = max(diff, float((shared - plain).abs().max()))
    ratios = [f / s for f, s in zip(times[False], times[True])]
    n = batch["input_ids"].shape[0]
    table = [{"variant": "every row in full (share_prompts=False)", "rows": n, "median s": round(statistics.median(times[False]), 2),
              "speed-up": "1.00×"},
             {"variant": "shared prompt run once (share_prompts=True)", "rows": n,
              "median s": round(statistics.median(times[True]), 2), "speed-up": f"{statistics.median(ratios):.2f}×"}]
    for row in table:
        print(row)
    print(f"max |Δ reward| = {diff:.2e} (β = 0.1); threads = {torch.get_num_threads()}")
    if not a.no_record:
        record("Filter scoring: shared prompt run once vs every row in full (SmolLM2-135M, 3 adapters + base)",
               table, notes=f"{a.prompts} prompts × {2 + a.candidates} rows, batch {a.batch_size}, max_length "
               f"{a.max_length}, {a.repeat} alternating repeats, {torch.get_num_threads()} threads; "
               f"max |Δ reward| {diff:.2e}.")


if __name__ == "__main__":
    main()
