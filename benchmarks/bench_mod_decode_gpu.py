"""MOD decoding on a GPU: the SIPO sampling workload on random-weight policies of real shapes, bf16.

Workload: 16 prompts (random token ids, 24-44 tokens, like chat-templated prompts) × W = {.2, .4, .6, .8}
(weights [w, 1 − w]) = 64 rows, greedy, 128 new tokens, EOS disabled (random weights rarely emit it, and a
fixed length makes the variants do the same work). Two policies per shape:

  * ``135m`` / ``1.7b``: two separate random Llama models shaped like SmolLM2-135M / SmolLM2-1.7B (vocab 49152).
  * ``7b-lora``: one random Llama-2-7B-shaped base (vocab 32000) with two random LoRA adapters, r = 64 on
    q/k/v/o (the paper's setting); policies share one base forward.

Variants, all in this process, timed alternately (best of ``--repeat``):
  authors   the released code's loop: batch 1, one forward per policy per token (few rows; tokens/s)
  naive     all rows in one batch, one HF forward per policy per step, log_softmax mixing
  dynamic   MODDecoder(kv_cache="dynamic"): HF forward, state sharing, eager
  static    MODDecoder(kv_cache="static", cuda_graph=False): the lean step, eager
  captured  MODDecoder() default on CUDA: the lean step replayed as a CUDA graph

ms/step is decode time per generated position (a generation of 128 tokens minus one of 1 token, / 127).
Bounds per step, from the copy bandwidth measured in this run: *weights* = every weight byte the step reads
(both models, or the base + adapters) once; *weights+KV* adds the KV cache bytes attention reads at the mean
context length. Writes a JSON with everything to ``--out`` and appends the table to RESULTS.md unless
``--no-record``.

    python benchmarks/bench_mod_decode_gpu.py --shapes 135m,1.7b,7b-lora --out $OUT/mod_gpu.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_mod_decode import authors_generate, naive_generate  # noqa: E402
from harness import markdown_table, record  # noqa: E402

W = [0.2, 0.4, 0.6, 0.8]
SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                 num_key_value_heads=32, vocab_size=49152, tie_word_embeddings=True),
    "7b-lora": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    # a smoke-test shape: `--device cpu --shapes tiny,tiny-lora --new 4` checks the script without a GPU
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True),
    "tiny-lora": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=False),
}
DEVICE = "cuda"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy rate, bytes read + written per second (the memory ceiling)."""
    if DEVICE != "cuda":
        nbytes = 64 << 20
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE)
    b = torch.empty_like(a)
    b.copy_(a)
    _sync()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        b.copy_(a)
        _sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def build(shape: str, seed: int = 0):
    """(policies for MODDecoder, per-policy forward callables, weight bytes read per step, KV bytes per token)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])
    torch.manual_seed(seed)
    lora = shape.endswith("lora")
    with torch.device(DEVICE):
        models = [LlamaForCausalLM(cfg).to(torch.bfloat16).eval() for _ in range(1 if lora else 2)]
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    if not lora:
        wbytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
        return models, [lambda m=m, **kw: m(**kw) for m in models], wbytes, kv_token
    from peft import LoraConfig, get_peft_model

    lcfg = LoraConfig(r=64, lora_alpha=64, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    pm = get_peft_model(models[0], lcfg, adapter_name="helpful")
    pm.add_adapter("harmless", lcfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    pm = pm.to(torch.bfloat16).eval()
    wbytes = sum(p.numel() * p.element_size() for p in pm.parameters())

    def run(name):
        def f(**kw):
            pm.set_adapter(name)
            return pm(**kw)
        return f
    return pm, [run("helpful"), run("harmless")], wbytes, kv_token


def rows(vocab: int, prompts: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(24, 45, (prompts,), generator=g)
    t = int(lens.max())
    ids = torch.randint(100, vocab, (prompts, t), generator=g)
    mask = (torch.arange(t)[None] >= (t - lens)[:, None]).long()
    ids = ids * mask
    w = torch.tensor([[x, 1 - x] for _ in range(prompts) for x in W])
    return (ids.repeat_interleave(len(W), 0).to(DEVICE), mask.repeat_interleave(len(W), 0).to(DEVICE), w.to(DEVICE))


def timed(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        _sync()
        t0 = time.perf_counter()
        out = fn()
        _sync()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_shape(shape: str, new: int, repeat: int, bw: float, authors_tokens: int) -> list[dict]:
    from sipo_fast import MODDecoder
    from sipo_fast.kv.hf import cache_kwarg

    pol, fwds, wbytes, kv_token = build(shape)
    key = cache_kwarg(pol if not isinstance(pol, list) else pol[0])  # `cache` or `past_key_values`
    ids, mask, w = rows(SHAPES[shape]["vocab_size"])
    b, t = ids.shape
    ctx = t + new / 2  # mean columns attention reads per row (left padding included, as the kernels do)
    n_kv = 2  # policies, each with its own cache
    bound_w = wbytes / bw * 1e3
    bound_wkv = (wbytes + n_kv * b * ctx * kv_token) / bw * 1e3
    res, toks = [], {}
    with torch.inference_mode():
        # EOS -1: no token ends a row, so every variant generates exactly `new` tokens per row
        tok_s = authors_tokens / timed(lambda: authors_generate(fwds, ids[:1], mask[:1], w[:1], authors_tokens, -1,
                                                                key), 1)[0]
        res.append({"shape": shape, "variant": "authors (batch 1)", "tok/s": tok_s, "× authors": 1.0,
                    "ms/step": 1e3 / tok_s, "× naive": "", "÷ weights bound": "", "÷ weights+KV bound": ""})
        decs = {"dynamic": MODDecoder(pol, kv_cache="dynamic"),
                "static": MODDecoder(pol, kv_cache="static", cuda_graph=False),
                "captured": MODDecoder(pol, kv_cache="auto")}
        runs = {"naive": lambda n: naive_generate(fwds, ids, mask, w, n, -1, key)[0]}
        for k, d in decs.items():
            runs[k] = lambda n, d=d: d.generate(ids, mask, weights=w, max_new_tokens=n, eos_token_id=[]).generated
        for k, f in runs.items():
            f(2)  # warm-up: Triton compilation, graph capture, cuBLAS handles
        for k, f in runs.items():
            t_full, toks[k] = timed(lambda: f(new), repeat)
            t_one, _ = timed(lambda: f(1), repeat)
            step = (t_full - t_one) / (new - 1) * 1e3
            res.append({"shape": shape, "variant": k, "tok/s": b * new / t_full, "× authors": b * new / t_full / tok_s,
                        "ms/step": step, "× naive": None, "÷ weights bound": step / bound_w,
                        "÷ weights+KV bound": step / bound_wkv})
        assert DEVICE != "cuda" or decs["captured"].kv_cache == "static", decs["captured"].kv_cache
    naive_step = next(r["ms/step"] for r in res if r["variant"] == "naive")
    for r in res[1:]:
        r["× naive"] = naive_step / r["ms/step"]
    same = lambda a, c: float((toks[a] == toks[c]).all(1).float().mean())  # noqa: E731
    extra = dict(shape=shape, weights_bound_ms=bound_w, weights_kv_bound_ms=bound_wkv, weight_gb=wbytes / 1e9,
                 rows_equal_captured_vs_static=same("captured", "static"),
                 rows_equal_captured_vs_naive=same("captured", "naive"),
                 rows_equal_dynamic_vs_naive=same("dynamic", "naive"))
    del pol, fwds, decs
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return res, extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="135m,1.7b,7b-lora")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--authors-tokens", type=int, default=16)
    ap.add_argument("--out", default=None)
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script (tiny shapes)")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    bw = copy_bandwidth()
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "CPU"
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s on {name}", flush=True)
    table, extras = [], []
    for shape in args.shapes.split(","):
        try:
            res, extra = bench_shape(shape, args.new, args.repeat, bw, args.authors_tokens)
        except Exception as exc:  # one shape failing must not lose the others' numbers
            import traceback

            traceback.print_exc()
            extras.append(dict(shape=shape, error=repr(exc)))
            continue
        table += res
        extras.append(extra)
        print(markdown_table(res), "\n", json.dumps(extra), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(bandwidth=bw, table=table, extras=extras), indent=2))
    notes = (f"64 rows (16 random prompts of 24-44 tokens × W = {W}), greedy, {args.new} new tokens, bf16, random "
             f"weights; copy bandwidth measured {bw / 1e12:.2f} TB/s. ms/step = (t({args.new}) − t(1)) / {args.new - 1} "
             "(authors: per token at batch 1). "
             + " ".join(f"{e['shape']}: weights bound {e.get('weights_bound_ms', 0):.2f} ms, weights+KV "
                        f"{e.get('weights_kv_bound_ms', 0):.2f} ms, captured = static rows "
                        f"{e.get('rows_equal_captured_vs_static', 0):.0%}, captured = naive rows "
                        f"{e.get('rows_equal_captured_vs_naive', 0):.0%}." if "error" not in e else
                        f"{e['shape']}: FAILED {e['error']}." for e in extras))
    if args.no_record:
        print(markdown_table(table), "\n" + notes)
    else:
        record("MOD decoding on GPU (bf16, random-weight policies)", table, notes=notes)


if __name__ == "__main__":
    main()
