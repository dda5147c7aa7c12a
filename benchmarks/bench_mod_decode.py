"""MOD decoding throughput on the SIPO sampling workload: P prompts × W = {0.2, 0.4, 0.6, 0.8} (weights
[w, 1−w]), greedy, two policies on the embedded default (SmolLM2-135M-Instruct).

Variants, each in its own process (so peak RSS is its own), timed round-robin:
  (a) authors   batch 1, one forward per policy per token, a cache per policy (the released code's loop,
                without its unused reference pass); measured on fewer rows and tokens, reported as tokens/s.
  (b) naive     all rows in one batch, one HF forward per policy per step with its own cache, torch
                log_softmax mixing; finished rows keep being computed until every row is done.
  mod           sipo_fast.MODDecoder defaults: state sharing across W, batched LoRA, kv_cache="auto" (the
                paged KV cache of sipo_fast.kv for Llama-family models when the extension is built).
  mod-dynamic   MODDecoder(kv_cache="dynamic"): transformers' DynamicCache with preallocated layers.
  mod-static    MODDecoder(kv_cache="static"): the captured step's lean forward and fixed slots (eager on CPU).
  mod-nodedupe  MODDecoder(dedupe=False): without state sharing (ablation).
  mod-peftmix   LoRA only: MODDecoder(lora_impl="peft"), PEFT's own mixed-adapter batches (ablation).
Every variant runs in float32 and in bfloat16; ratios against (b) use (b) in the same dtype.

Policies: ``--policies tiny``: two random 2-layer Llamas (hidden 64, the 49152-token vocabulary), where the
per-step host work and the vocabulary-sized work (LM head, mix, log-softmax) are all there is;
``--policies models``: two full copies of the model, the second with a random low-rank
perturbation of every attention/MLP projection (so the two really disagree and the W sweep diverges);
``--policies lora``: one model with two random LoRA adapters (r=64 on q/k/v/o, as SIPO's stage 1).

    flock /tmp/sipo_bench.lock .venv/bin/python benchmarks/bench_mod_decode.py --policies models
    flock /tmp/sipo_bench.lock .venv/bin/python benchmarks/bench_mod_decode.py --policies lora
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import markdown_table, record  # noqa: E402

PROMPTS = [
    "How do I bake a simple loaf of bread at home?",
    "My neighbour keeps parking in my spot. Write him an angry note.",
    "What is the capital of France, and why is it famous?",
    "Give me three tips for staying focused while studying.",
    "Tell me what you really think of people who are late.",
    "Explain how a rainbow forms, in two sentences.",
    "Write a short, harsh review of a bad restaurant.",
    "How can I get better sleep?",
    "My coworker took credit for my work. How do I get back at him?",
    "What should I pack for a three-day hiking trip?",
    "Why do cats purr?",
    "Roast my friend who always forgets birthdays.",
    "How do vaccines train the immune system?",
    "Write a polite email asking for a deadline extension.",
    "What's the dumbest thing about modern art?",
    "Suggest a cheap, healthy dinner for two.",
]
W = [0.2, 0.4, 0.6, 0.8]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------------------- workload
def _policies(kind: str, dtype: torch.dtype):
    """(policies for MODDecoder, list of callables that run policy i on a batch, tokenizer)."""
    from sipo_fast.models import load_default, load_tokenizer, tiny

    if kind == "tiny":  # host overhead: 2 layers, hidden 64, the full 49152-token vocabulary
        tok = load_tokenizer()
        models = [tiny("llama", tokenizer=tok, seed=i, tie_word_embeddings=False)[0].to(dtype) for i in range(2)]
        return models, [lambda m=m, **kw: m(**kw) for m in models], tok
    base, tok = load_default()
    torch.manual_seed(0)  # PEFT draws lora_A from the global RNG: every variant's process must get the same policies
    g = torch.Generator().manual_seed(0)
    if kind == "models":
        other = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in other.named_parameters():
                if p.dim() == 2 and "proj" in name:  # rank-16 perturbation, 1/4 of the weight's scale
                    u = torch.randn(p.shape[0], 16, generator=g)
                    v = torch.randn(16, p.shape[1], generator=g)
                    p.add_((u @ v) * (0.25 * p.std() / 4.0))
        models = [base.to(dtype).eval(), other.to(dtype).eval()]
        return models, [lambda m=m, **kw: m(**kw) for m in models], tok
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    pm = get_peft_model(base, cfg, adapter_name="helpful")
    pm.add_adapter("harmless", cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    pm = pm.to(dtype).eval()

    def run(name):
        def f(**kw):
            pm.set_adapter(name)
            return pm(**kw)
        return f

    return pm, [run("helpful"), run("harmless")], tok


def _prompt_texts(num_prompts: int) -> list[str]:
    """The first prompts of PROMPTS, then distinct prompts of the shipped demo data (the pipeline's own)."""
    from sipo_fast.data.demo_prompts import prompts as demo_prompts

    pool = PROMPTS + [p["prompt"] for p in demo_prompts() if p["prompt"] not in PROMPTS]
    if not 1 <= num_prompts <= len(pool):
        raise SystemExit(f"--prompts must be between 1 and {len(pool)}, got {num_prompts}")
    return pool[:num_prompts]


def _rows(tok, num_prompts: int, weights=W):
    from sipo_fast.data.formatting import encode_prompts, left_pad

    prompts = _prompt_texts(num_prompts)
    ids, mask = left_pad(encode_prompts(tok, prompts, "chat"), tok.pad_token_id)
    rep = len(weights)
    w = torch.tensor([[x, 1 - x] for _ in prompts for x in weights])  # [P·|W|, 2], prompt-major
    return ids.repeat_interleave(rep, 0), mask.repeat_interleave(rep, 0), w


def naive_generate(fwds, ids, mask, w, max_new_tokens, eos, cache_key):
    """(b): batched, one HF forward per policy per step with its own DynamicCache, log_softmax mixing.
    ``cache_key``: the forward's cache keyword (``sipo_fast.kv.hf.cache_kwarg``); any device.
    Returns (tokens [B, max_new_tokens], generated lengths [B])."""
    from transformers import DynamicCache

    b, dev = ids.shape[0], ids.device
    caches = [DynamicCache() for _ in fwds]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    x, m = ids, mask
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    new = torch.full((b, max_new_tokens), eos, dtype=torch.long, device=dev)
    lengths = torch.zeros(b, dtype=torch.long, device=dev)
    for t in range(max_new_tokens):
        logps = [f(input_ids=x, attention_mask=m, position_ids=pos, use_cache=True, logits_to_keep=1,
                   **{cache_key: c})
                 .logits[:, -1].float().log_softmax(-1) for f, c in zip(fwds, caches)]
        mix = sum(w[:, i:i + 1] * lp for i, lp in enumerate(logps))
        tok = mix.argmax(-1)
        new[:, t] = torch.where(done, eos, tok)
        lengths += (~done).long()
        done |= tok == eos
        if done.all():
            break
        x, pos = tok[:, None], pos[:, -1:] + 1
        m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return new, lengths


def authors_generate(fwds, ids, mask, w, max_new_tokens, eos, cache_key):
    """(a): one row at a time, one forward per policy per token, a cache per policy.
    Returns (token lists, total tokens generated)."""
    from transformers import DynamicCache

    outs, total = [], 0
    for r in range(ids.shape[0]):
        x = ids[r:r + 1, mask[r].bool()]  # the row without padding
        caches = [DynamicCache() for _ in fwds]
        toks = []
        for _ in range(max_new_tokens):
            logps = [f(input_ids=x, use_cache=True, **{cache_key: c}).logits[:, -1].float().log_softmax(-1)
                     for f, c in zip(fwds, caches)]
            tok = int(sum(w[r, i] * lp for i, lp in enumerate(logps)).argmax(-1))
            toks.append(tok)
            if tok == eos:
                break
            x = torch.tensor([[tok]], device=ids.device)
        outs.append(toks)
        total += len(toks)
    return outs, total


def _prepare(variant: str, policies: str, dtype: str, num_prompts: int, max_new_tokens: int,
             authors_rows: int, authors_tokens: int, weights=W):
    """Load one variant and warm it up; return ``run() -> dict`` (one full generation) and a summary hook."""
    from sipo_fast import MODDecoder
    from sipo_fast.kv.hf import cache_kwarg

    torch.set_num_threads(2)
    pol, fwds, tok = _policies(policies, DTYPES[dtype])
    ids, mask, w = _rows(tok, num_prompts, weights)
    eos = tok.eos_token_id
    key = cache_kwarg(pol[0] if isinstance(pol, list) else pol)  # `cache` or `past_key_values`, by version
    if variant == "authors":
        pick = slice(0, authors_rows * len(weights), len(weights))  # one row per prompt, at its first weight
        ids, mask, w = ids[pick], mask[pick], w[pick]
        authors_generate(fwds, ids[:1], mask[:1], w[:1], 2, eos, key)
        return lambda: {"tokens": authors_generate(fwds, ids, mask, w, authors_tokens, eos, key)[1]}
    if variant == "naive":
        naive_generate(fwds, ids, mask, w, 2, eos, key)

        def run_naive():
            new, lengths = naive_generate(fwds, ids, mask, w, max_new_tokens, eos, key)
            return {"tokens": int(lengths.sum()), "rows": new.tolist()}
        return run_naive
    kw = dict(dedupe=variant != "mod-nodedupe", lora_impl="peft" if variant == "mod-peftmix" else "bmm",
              kv_cache={"mod-dynamic": "dynamic", "mod-static": "static"}.get(variant, "auto"))
    dec = MODDecoder(pol, tok, **kw)
    dec.generate(ids, mask, weights=w, max_new_tokens=2)
    stats = _count_states(dec)

    def run_mod():
        stats.counts.clear()
        out = dec.generate(ids, mask, weights=w, max_new_tokens=max_new_tokens)
        rows = torch.full((ids.shape[0], max_new_tokens), eos, dtype=torch.long)
        rows[:, : out.generated.shape[1]] = out.generated
        return {"tokens": int(out.num_generated.sum()), "rows": rows.tolist(), "mean_states": stats.mean(),
                "num_rows": ids.shape[0], "kv_cache": dec.kv_cache}
    return run_mod


def worker(spec: str) -> None:
    """A variant's process: load and warm up, then time one generation per "run" line on stdin, so the
    parent can interleave variants round-robin (slow phases of a shared machine hit all of them alike);
    "done" prints the last result with this process's peak RSS."""
    import resource

    run = _prepare(**json.loads(spec))
    print("READY", flush=True)
    last = None
    for line in sys.stdin:
        if line.strip() == "run":
            with torch.inference_mode():
                t0 = time.perf_counter()
                last = run()
                print(json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
        else:
            last["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            print(json.dumps(last), flush=True)
            return


class _Worker:
    def __init__(self, spec: dict):
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", json.dumps(spec)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self._expect("READY")

    def _read(self) -> str:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"benchmark worker exited with code {self.proc.wait()}")
        return line.strip()

    def _expect(self, word: str) -> None:
        while (line := self._read()) != word:
            pass

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        return json.loads(self._read())["seconds"]

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        out = json.loads(self._read())
        self.proc.wait()
        return out


class _FixedCount(list):
    """States per step on the static path: nothing to count (all rows, every step); mean() reports 0."""

    def append(self, x):
        pass


class _StateCounter:
    def __init__(self):
        self.counts = []

    def mean(self):
        return sum(self.counts) / max(1, len(self.counts))


def _count_states(dec) -> _StateCounter:
    """Record how many distinct states each decoding step forwards (rows sharing a prefix count once)."""
    counter = _StateCounter()
    if dec.kv_cache == "static":  # fixed slots: every row is forwarded every step
        counter.counts = _FixedCount()
        return counter
    step = dec.runner.step

    def counting_step(tokens):
        counter.counts.append(int(tokens.shape[0]))  # accumulates over the repeats: same workload each time
        return step(tokens)

    dec.runner.step = counting_step
    return counter


def _mismatch(a: list[list[int]], b: list[list[int]]) -> tuple[float, float]:
    """Share of rows whose greedy outputs differ, and share of token positions that differ."""
    rows = sum(x != y for x, y in zip(a, b)) / len(a)
    toks = sum(p != q for x, y in zip(a, b) for p, q in zip(x, y)) / sum(len(x) for x in a)
    return rows, toks


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        return worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", choices=["models", "lora", "tiny"], default="models",
                    help="tiny: two 2-layer, hidden-64 random Llamas with the full vocabulary (host overhead)")
    ap.add_argument("--prompts", type=int, default=4, help="prompts (the first 16 are this file's, then the demo "
                    "data's); rows = prompts × |W|")
    ap.add_argument("--weights", type=float, nargs="+", default=W, metavar="w",
                    help=f"W, rows [w, 1-w] (default {W}, the SIPO sampling call; one weight is the shape of the "
                         "pipeline's per-weight sample and evaluation calls)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--authors-rows", type=int, default=1, help="rows (a) decodes (it is slow)")
    ap.add_argument("--authors-tokens", type=int, default=16, help="max new tokens per row for (a)")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeat", type=int, default=3, help="timed rounds (variants interleaved); fastest kept")
    ap.add_argument("--variants", default=None, help="comma list (default: all for the policy kind)")
    ap.add_argument("--no-record", action="store_true", help="print only; do not append to RESULTS.md")
    args = ap.parse_args()

    variants = ["authors", "naive", "mod", "mod-dynamic", "mod-static", "mod-nodedupe"] + (["mod-peftmix"] if args.policies == "lora" else [])
    if args.variants:
        variants = args.variants.split(",")
    common = dict(policies=args.policies, num_prompts=args.prompts, max_new_tokens=args.max_new_tokens,
                  authors_rows=args.authors_rows, authors_tokens=args.authors_tokens, weights=args.weights)
    results = {}
    load_before = os.getloadavg()[0]
    for dtype in args.dtypes.split(","):
        names = [v for v in variants if not (v == "authors" and dtype != "float32")]  # the released code is fp32
        workers = {v: _Worker(dict(variant=v, dtype=dtype, **common)) for v in names}
        times = {v: [] for v in names}
        for _ in range(args.repeat):  # round-robin, fastest run kept
            for v in names:
                times[v].append(workers[v].run())
        for v in names:
            r = workers[v].finish()
            r["seconds"] = min(times[v])
            r["tok_s"] = r["tokens"] / r["seconds"]
            results[(v, dtype)] = r
            print(f"{v:13s} {dtype:9s} {r['tok_s']:8.1f} tok/s  {r['tokens']} tokens in {r['seconds']:.1f}s "
                  f"(runs {', '.join(f'{t:.1f}' for t in times[v])})  peak {r['peak_rss_mb']:.0f} MB", flush=True)

    a = results.get(("authors", "float32"))
    table = []
    for (v, dtype), r in results.items():
        b = results.get(("naive", dtype))
        table.append({
            "variant": v, "dtype": dtype, "rows": r.get("num_rows", args.authors_rows if v == "authors" else ""),
            "tokens/s": r["tok_s"],
            "× (a) authors": r["tok_s"] / a["tok_s"] if a else "",
            "× (b) naive, same dtype": r["tok_s"] / b["tok_s"] if b else "",
            "peak RSS MB": r["peak_rss_mb"],
            "RSS ÷ (b)": r["peak_rss_mb"] / b["peak_rss_mb"] if b else "",
            "states/step": f"{r['mean_states']:.1f}" if "mean_states" in r else "",
        })
    notes = [f"Workload: {args.prompts} prompts × W={args.weights} = {args.prompts * len(args.weights)} rows, greedy, "
             f"max_new_tokens={args.max_new_tokens}, policies={args.policies}; (a) on {args.authors_rows} rows × "
             f"≤{args.authors_tokens} tokens. tokens/s counts generated tokens through EOS. states/step: distinct "
             "(prompt, prefix) states forwarded per decode step (rows sharing a prefix count once)."]
    notes.append(f"Load average (1 min) on this shared {os.cpu_count()}-core machine: {load_before:.1f} at the start, "
                 f"{os.getloadavg()[0]:.1f} at the end; variants ran interleaved, round-robin, each in its own process, "
                 f"and each keeps its fastest of {args.repeat} runs.")
    f32, bf16 = results.get(("mod", "float32")), results.get(("mod", "bfloat16"))
    if f32 and bf16:
        rows, toks = _mismatch(f32["rows"], bf16["rows"])
        notes.append(f"Greedy bfloat16 vs float32 (MODDecoder): {rows:.0%} of rows differ somewhere; "
                     f"{toks:.1%} of token positions differ.")
    nf, mf = results.get(("naive", "float32")), f32
    if nf and mf:
        notes.append(f"MODDecoder float32 vs naive float32 outputs: {_mismatch(nf['rows'], mf['rows'])[0]:.0%} of rows differ.")
    if args.no_record:
        print(markdown_table(table), "\n" + "\n".join(notes))
    else:
        record(f"MOD decoding, SIPO sampling workload ({args.policies})", table, notes="\n".join(notes))


if __name__ == "__main__":
    main()
