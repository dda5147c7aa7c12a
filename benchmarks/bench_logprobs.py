"""Benchmark: fused token log-probs (``sipo_fast.ops.token_logprobs``) and implicit-reward scoring
(``sipo_fast.implicit_rewards``) against the naive path (full float32 logits + log_softmax + gather).

Two tables, each variant in its own process (``harness.run_isolated``) so peak memory is comparable:
  1. op level: M rows of hidden states against SmolLM2's LM head (H = 576, V = 49152), forward and
     forward+backward; on a GPU also achieved bandwidth (minimum bytes moved / time) and useful TFLOP/s.
  2. scoring: implicit rewards r = β(log π - log π_ref) of the embedded SmolLM2-135M on B sequences of T tokens
     (a prompt of 64 tokens, the rest response), with a perturbed copy as the reference.
Peak memory is the working memory of the calls (warm-up included, so memory the allocator keeps from one call
to the next is counted): on CPU, the peak RSS (VmHWM, reset after set-up) minus the RSS after set-up; on GPU,
``max_memory_allocated`` minus what was allocated after set-up.

    flock /tmp/sipo_bench.lock .venv/bin/python benchmarks/bench_logprobs.py [--quick]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import record, run_isolated  # noqa: E402


# ---- measuring inside a variant's own process --------------------------------------------------------------------

def _proc_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


class _Peak:
    """Working-memory peak of the code run between start() and stop(), in MiB."""

    def __init__(self, device: str):
        self.cuda = device == "cuda"

    def start(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = _proc_mb("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def stop(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return _proc_mb("VmHWM") - self.base


def measure(fn, repeat: int) -> tuple[float, float]:
    """Median wall time and median CPU time (this process, all threads) of ``fn()``, in seconds. The CPU time
    is the steadier number on a shared machine: other tenants stretch wall time, not the work done."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    walls, cpus = [], []
    for _ in range(repeat):
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return statistics.median(walls), statistics.median(cpus)


def _setup(threads: int) -> str:
    torch.set_num_threads(threads)
    return "cuda" if torch.cuda.is_available() else "cpu"


def op_variant(variant: str, M: int, H: int, V: int, dtype: str, backward: bool, repeat: int, frozen_head: bool = False,
               threads: int = 2):
    """Time and working memory of token_logprobs (variant = backend) or token_logprobs_ref ("naive");
    ``frozen_head``: only the hidden states need a gradient (the LoRA case)."""
    from sipo_fast.ops.logprobs import token_logprobs, token_logprobs_ref

    device = _setup(threads)
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(M, H, generator=g).to(device, dt).requires_grad_(backward)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dt).requires_grad_(backward and not frozen_head)
    y = torch.randint(0, V, (M,), generator=g).to(device)

    def step():
        out = token_logprobs_ref(h, w, y) if variant == "naive" else token_logprobs(h, w, y, backend=variant)
        if backward:
            out.sum().backward()
            h.grad = w.grad = None
        return out

    with torch.no_grad() if not backward else torch.enable_grad():
        peak = _Peak(device)
        peak.start()
        step()  # warm-up (Triton compiles here)
        t, c = measure(step, repeat)
        extra = peak.stop()
    return {"time_s": t, "cpu_s": c, "extra_mb": extra, "device": device}


def scoring_variant(variant: str, B: int, T: int, prompt_len: int, policies: int, repeat: int, threads: int = 2):
    """Implicit rewards of ``policies`` perturbed copies of SmolLM2-135M against another perturbed copy."""
    from sipo_fast.models import load_default
    from sipo_fast.training import implicit_rewards, sequence_logprobs_ref

    device = _setup(threads)
    base, _ = load_default(device=device)
    g = torch.Generator().manual_seed(0)

    def perturbed(i):
        m = copy.deepcopy(base)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=g).to(device) * 1e-3 * (i + 1))
        return m

    models = [base] + [perturbed(i) for i in range(policies)]  # policies..., reference = base
    pol, ref = models[1:], models[0]
    ids = torch.randint(100, 40000, (B, T), generator=g).to(device)
    attn = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    resp[:, prompt_len:] = 1
    batch = {"input_ids": ids, "attention_mask": attn, "response_mask": resp}

    @torch.no_grad()
    def naive():
        ref_lp = sequence_logprobs_ref(ref, **batch)
        return torch.stack([0.1 * (sequence_logprobs_ref(m, **batch) - ref_lp) for m in pol], 1)

    fn = naive if variant == "naive" else (lambda: implicit_rewards(pol, ref, batch, beta=0.1, progress=False))
    peak = _Peak(device)
    peak.start()
    fn()  # warm-up
    t, c = measure(fn, repeat)
    extra = peak.stop()
    rewards = fn().float().cpu()
    return {"time_s": t, "cpu_s": c, "extra_mb": extra, "rewards": rewards.flatten().tolist(), "device": device}


# ---- driver ------------------------------------------------------------------------------------------------------

def _op_rows(args) -> list[dict]:
    cuda = torch.cuda.is_available()
    fast = "triton" if cuda else "chunked"
    M, H, V = args.rows, 576, 49152
    dtypes = ["float32", "bfloat16"] if cuda else ["float32"]
    rows = []
    for dtype in dtypes:
        for backward, frozen in ((False, False), (True, True), (True, False)):
            res = {v: run_isolated("bench_logprobs:op_variant", dict(variant=v, M=M, H=H, V=V, dtype=dtype,
                                                                     backward=backward, frozen_head=frozen,
                                                                     repeat=args.repeat))
                   for v in ("naive", fast)}
            n, f = res["naive"], res[fast]
            name = "fwd" if not backward else ("fwd+bwd, frozen W" if frozen else "fwd+bwd, W trained")
            row = {"pass": name, "dtype": dtype, "M×H×V": f"{M}×{H}×{V}",
                   "naive_s": n["time_s"], f"{fast}_s": f["time_s"], "time_ratio": f["time_s"] / n["time_s"],
                   "cpu_time_ratio": f["cpu_s"] / n["cpu_s"],
                   "naive_MiB": n["extra_mb"], f"{fast}_MiB": f["extra_mb"],
                   "mem_reduction": n["extra_mb"] / max(f["extra_mb"], 1e-3)}
            if cuda:
                elt = torch.finfo(getattr(torch, dtype)).bits // 8
                passes = 1 if not backward else (2 if frozen else 3)  # fwd; + dh; + dW
                io = (M * H + V * H) * elt * passes + M * 8  # read h, W (+ dh, dW written)
                flops = 2 * M * H * V * passes
                row["GB/s"] = io / f["time_s"] / 1e9
                row["TFLOP/s"] = flops / f["time_s"] / 1e12
            rows.append(row)
    return rows


def _scoring_rows(args) -> list[dict]:
    kw = dict(B=args.batch, T=args.seq, prompt_len=64, policies=args.policies, repeat=args.repeat)
    n = run_isolated("bench_logprobs:scoring_variant", dict(variant="naive", **kw))
    f = run_isolated("bench_logprobs:scoring_variant", dict(variant="fused", **kw))
    max_diff = max(abs(a - b) for a, b in zip(n["rewards"], f["rewards"]))
    return [{"B×T": f"{args.batch}×{args.seq}", "models": f"{args.policies}+ref", "device": f["device"],
             "naive_s": n["time_s"], "fused_s": f["time_s"], "time_ratio": f["time_s"] / n["time_s"],
             "cpu_time_ratio": f["cpu_s"] / n["cpu_s"],
             "naive_MiB": n["extra_mb"], "fused_MiB": f["extra_mb"],
             "mem_reduction": n["extra_mb"] / max(f["extra_mb"], 1e-3),
             "mean_abs_r": sum(abs(r) for r in n["rewards"]) / len(n["rewards"]), "max_abs_dr": max_diff}]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run), results not recorded")
    p.add_argument("--rows", type=int, default=4096, help="M for the op-level table (B·T)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--policies", type=int, default=1, help="policies scored besides the reference")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--skip-op", action="store_true")
    p.add_argument("--skip-scoring", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.rows, args.batch, args.seq, args.repeat = 256, 2, 128, 1
    os.environ.pop("TRITON_INTERPRET", None)  # variants must run the real CPU/GPU paths
    notes = ("time_ratio = fused / naive wall time, cpu_time_ratio the same for process CPU time (steadier on a "
             "shared machine); lower is better. mem_reduction = naive / fused working memory. "
             "Naive = full logits in float32 + log_softmax + gather. The fused path skips prompt positions "
             "(64 of each row in the scoring table).")
    if not args.skip_op:
        rows = _op_rows(args)
        if not args.quick:
            record("Fused token log-probs vs naive (op level)", rows, notes=notes)
        else:
            print(rows)
    if not args.skip_scoring:
        rows = _scoring_rows(args)
        if not args.quick:
            record("Implicit-reward scoring, SmolLM2-135M, fused vs naive", rows, notes=notes)
        else:
            print(rows)


if __name__ == "__main__":
    main()
