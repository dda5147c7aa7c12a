"""Shared benchmark harness: timing, peak memory, machine facts, and appending results to RESULTS.md.

Machines here are noisy and shared, so every benchmark reports ratios against a baseline measured in the
same run; absolute times are printed for context only.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def timeit(fn: Callable[[], object], *, warmup: int = 1, repeat: int = 5) -> float:
    """Median wall time of ``fn()`` in seconds (synchronising CUDA when present)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_isolated(module_fn: str, kwargs: dict, *, timeout: float = 1800) -> dict:
    """Run ``module:function(**kwargs)`` in a fresh Python process and return its JSON result, with the
    process's peak RSS (``peak_rss_mb``) added. A fresh process per variant makes peak memory comparable:
    one variant's allocations cannot inflate another's high-water mark."""
    mod, fn = module_fn.split(":")
    code = (
        "import json, resource, sys; sys.path.insert(0, %r); import importlib;"
        "r = getattr(importlib.import_module(%r), %r)(**json.loads(sys.argv[1]));"
        "r['peak_rss_mb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024;"
        "print('@@RESULT@@' + json.dumps(r))"
    ) % (str(Path(__file__).resolve().parent), mod, fn)
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True,
                         timeout=timeout)
    for line in out.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"{module_fn} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU only, {os.cpu_count()} cores"
    return f"{cpu}; {dev}; torch {torch.__version__}; threads {torch.get_num_threads()}"


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    cols = list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def record(title: str, rows: list[dict], *, notes: str = "", command: str | None = None) -> str:
    """Print the table and append it to benchmarks/RESULTS.md with the command, machine and date."""
    command = command or " ".join([Path(sys.executable).name] + sys.argv)
    text = (f"\n## {title}\n\n- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
            f"- machine: {machine()}\n- command: `{command}`\n\n{markdown_table(rows)}\n")
    if notes:
        text += f"\n{notes}\n"
    print(text)
    with open(RESULTS, "a") as f:
        f.write(text)
    return text


def dump_json(path: str | os.PathLike, obj) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(obj, indent=2))


def demo_lora_policies(r: int = 16, std: float = 0.02, seed: int = 0):
    """``(peft_model, tokenizer)``: the embedded SmolLM2-135M-Instruct with the demo preset's two LoRA adapters
    ("helpful", "harmless"; r, alpha 2r, q/k/v/o), their B matrices N(0, std) so they differ, in eval mode: the
    stand-in for trained stage-1 policies in benchmarks of the pipeline's call shapes."""
    from peft import LoraConfig, get_peft_model

    from sipo_fast.models import load_default

    torch.manual_seed(seed)
    model, tok = load_default()
    lora = dict(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    pm = get_peft_model(model, LoraConfig(**lora), adapter_name="helpful")
    pm.add_adapter("harmless", LoraConfig(**lora))
    with torch.no_grad():
        for name, prm in pm.named_parameters():
            if "lora_B" in name:
                prm.normal_(0, std)
    return pm.eval(), tok
