"""Shared paged KV cache vs unshared caches in SIPO sampling: P prompts × |W| = 4 weights, greedy MOD over
two policies, prompts about as long as the responses.

Variants, each in a fresh process (so peak RSS is its own), same prompts and models:
  * unshared      kv_cache="dynamic", dedupe=False: every (prompt, weight) row is its own sequence with its own
                  prefill and its own KV, as in the authors' code (which also runs batch 1; this is batched).
  * dedupe-dyn    kv_cache="dynamic", dedupe=True: the decoder merges rows of one prompt into one state until
                  their tokens differ, then copies the state's DynamicCache rows when it forks.
  * paged         kv_cache="paged", dedupe=True: each prompt prefilled once per policy, its KV blocks shared by
                  all rows that continue it (fork = reference counts, no copy; copy-on-write of one block).
Reported per variant: prefill positions forwarded (rows × padded width) and real prompt tokens among them,
peak KV held (MiB; for paged also blocks), end-to-end generate() time and its speedup over "unshared".
The paged run's tokens are checked equal to the unshared run's (greedy).

    flock /tmp/sipo_bench.lock .venv/bin/python benchmarks/bench_kv_sharing.py            # SmolLM2-135M x 2
    flock /tmp/sipo_bench.lock .venv/bin/python benchmarks/bench_kv_sharing.py --quick    # tiny models, seconds
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import record, run_isolated  # noqa: E402

VARIANTS = {"unshared": ("dynamic", False), "dedupe-dyn": ("dynamic", True), "paged": ("paged", True)}
WEIGHTS = [[0.2, 0.8], [0.4, 0.6], [0.6, 0.4], [0.8, 0.2]]  # SIPO's W = {0.2, 0.4, 0.6, 0.8} as [w, 1 - w]
TEXT = ("Multi-objective alignment trains one policy per objective and combines them at decoding time. "
        "When two objectives disagree about which response is better, the preference pair is conflicting, "
        "and training on such pairs pulls the Pareto front down. Self-improvement asks the policies to write "
        "a response that beats both original responses on every objective, then trains on those pairs. ")


def _policies(model: str):
    """Two policies: the base model and a copy with perturbed weights (a stand-in for two DPO policies)."""
    from sipo_fast.models import load_default, load_tokenizer, tiny

    if model == "default":
        base, tok = load_default()
    else:
        tok = load_tokenizer()
        base, _ = tiny("llama", tokenizer=tok, hidden_size=128, num_layers=4, intermediate_size=256)
    import copy

    other = copy.deepcopy(base)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02 * p.std())
    return [base, other], tok


def _prompts(tok, num_prompts: int, prompt_len: int):
    """Ragged prompts (prompt_len ± 25%) cut from different offsets of one text, left-padded."""
    from sipo_fast.data.formatting import left_pad

    ids = tok(TEXT * 8, add_special_tokens=False)["input_ids"]
    rows = []
    for i in range(num_prompts):
        n = prompt_len + (i % 5 - 2) * prompt_len // 8
        start = (i * 37) % (len(ids) - n)
        rows.append(ids[start:start + n])
    return left_pad(rows, tok.pad_token_id)


def _kv_bytes(runner) -> int:
    """KV bytes the runner holds right now (paged: used blocks; dynamic: every cache buffer)."""
    if getattr(runner, "kv", None) is not None:
        return runner.kv.kv_bytes()
    caches = getattr(runner, "caches", None) or [runner.cache]
    total = 0
    for cache in caches:
        for layer in cache.layers:
            for name in ("_k", "_v") if getattr(layer, "_k", None) is not None else ("keys", "values"):
                t = getattr(layer, name, None)
                total += t.numel() * t.element_size() if t is not None else 0
    return total


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _instrument(runner, stats: dict) -> None:
    """Wrap the runner's verbs to count prefill positions, time prefill and decode steps, and track peak KV."""
    prefill, step = runner.prefill, runner.step

    def track():
        stats["peak_kv_bytes"] = max(stats["peak_kv_bytes"], _kv_bytes(runner))

    def counted_prefill(ids, mask, *args, **kwargs):
        stats["prefill_positions"] += ids.numel()
        stats["prefill_tokens"] += int(mask.sum())
        _sync()
        t0 = time.perf_counter()
        out = prefill(ids, mask, *args, **kwargs)
        _sync()
        stats["prefill_s"] += time.perf_counter() - t0
        track()
        return out

    def tracked_step(tokens):
        _sync()
        t0 = time.perf_counter()
        out = step(tokens)
        _sync()
        stats["step_s"] += time.perf_counter() - t0
        stats["steps"] += 1
        track()
        return out

    runner.prefill, runner.step = counted_prefill, tracked_step


def run_variant(variant: str, model: str, num_prompts: int, prompt_len: int, new_tokens: int, repeat: int,
                block_size: int, threads: int, device: str = "cpu") -> dict:
    """One variant, in its own process: returns its metrics and its generated tokens."""
    from sipo_fast import MODDecoder

    torch.set_num_threads(threads)
    kv_cache, dedupe = VARIANTS[variant]
    models, tok = _policies(model)
    models = [m.to(device) for m in models]
    ids, mask = (t.to(device) for t in _prompts(tok, num_prompts, prompt_len))
    dec = MODDecoder(models, tok, kv_cache=kv_cache, dedupe=dedupe, kv_block_size=block_size)
    weights = torch.tensor(WEIGHTS, device=device)[None].expand(num_prompts, -1, -1)  # (P, |W|, N): P·|W| rows
    kw = dict(weights=weights, max_new_tokens=new_tokens, eos_token_id=[])  # no EOS: the same work every run
    dec.generate(ids, mask, weights=weights, max_new_tokens=2, eos_token_id=[])  # warm-up
    stats: dict = {}
    _instrument(dec.runner, stats)
    times, out = [], None
    for _ in range(repeat):
        stats.update(prefill_positions=0, prefill_tokens=0, peak_kv_bytes=0, prefill_s=0.0, step_s=0.0, steps=0)
        t0 = time.perf_counter()
        out = dec.generate(ids, mask, **kw)
        _sync()
        times.append((time.perf_counter() - t0, dict(stats)))
    times.sort(key=lambda x: x[0])
    total, stats = times[len(times) // 2]  # the median run, with its own prefill/step timings
    result = dict(stats, time_s=total, tokens=out.sequences.tolist())
    if kv_cache == "paged":
        result["peak_blocks"] = dec.runner.stats["peak_blocks_used"]
    return result


def _median_run(runs: list[dict]) -> dict:
    return sorted(runs, key=lambda r: r["time_s"])[len(runs) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["default", "tiny"], default="default")
    ap.add_argument("--prompts", type=int, default=8, help="P, distinct prompts (rows = 4P)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=1, help="timed generate() calls per process (median)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run the variants in this many interleaved rounds (fresh processes); on a shared machine "
                         "the speedup is the median of per-round ratios, so slow drift in load cancels")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny models, P=4, 24+24 tokens")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.model, args.prompts, args.prompt_len, args.new_tokens = "tiny", 4, 24, 24
    kwargs = dict(model=args.model, num_prompts=args.prompts, prompt_len=args.prompt_len,
                  new_tokens=args.new_tokens, repeat=args.repeat, block_size=args.block_size, threads=args.threads,
                  device=args.device)
    load_start = os.getloadavg()[0]  # other jobs on a shared machine skew absolute times: say how busy it was
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for rnd in range(args.rounds):
        for variant in VARIANTS:
            print(f"round {rnd + 1}/{args.rounds}: {variant} ...", flush=True)
            runs[variant].append(run_isolated("bench_kv_sharing:run_variant", dict(variant=variant, **kwargs)))
    base_runs = runs["unshared"]
    base = _median_run(base_runs)
    rows = []
    for variant, rs in runs.items():
        r = _median_run(rs)
        ratios = [b["time_s"] / x["time_s"] for b, x in zip(base_runs, rs)]
        rows.append({
            "variant": variant, "kv_cache/dedupe": "/".join(map(str, VARIANTS[variant])),
            "prefill positions": r["prefill_positions"], "prefill prompt tokens": r["prefill_tokens"],
            "peak KV MiB": r["peak_kv_bytes"] / 2**20, "peak KV blocks": r.get("peak_blocks", "-"),
            "prefill s": r["prefill_s"], "decode ms/step": 1e3 * r["step_s"] / max(r["steps"], 1),
            "time s": r["time_s"], "speedup vs unshared": statistics.median(ratios),
            "same tokens as unshared": all(x["tokens"] == base["tokens"] for x in rs),
            "peak RSS MB": r["peak_rss_mb"],
        })
    notes = (f"P={args.prompts} prompts x |W|=4 weights = {4 * args.prompts} rows, 2 policies "
             f"({'SmolLM2-135M + perturbed copy' if args.model == 'default' else 'tiny llama x2'}, float32), "
             f"prompts ~{args.prompt_len} tokens, {args.new_tokens} new tokens (greedy, no EOS), "
             f"block size {args.block_size}, {args.threads} threads, device {args.device}; time = median of "
             f"{args.repeat} call(s) after a "
             f"warm-up, median over {args.rounds} interleaved round(s); speedup = median of per-round ratios. "
             "Prefill positions count padded rows x width per policy; KV counts both policies. "
             f"1-min load average at start/end: {load_start:.1f}/{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores.")
    if args.no_record:
        from harness import markdown_table

        print(markdown_table(rows), "\n", notes)
    else:
        record("KV sharing: shared paged cache vs unshared (bench_kv_sharing.py)", rows, notes=notes)


if __name__ == "__main__":
    main()
