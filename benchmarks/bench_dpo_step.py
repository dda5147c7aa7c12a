"""Benchmark: one DPO training step (forward + backward, LoRA as in SIPO stage 1) on the embedded SmolLM2-135M,
for three log-prob paths on the same batch and weights, each in its own process (``harness.run_isolated``):

  * ``trl``:   TRL 1.16's stock ``DPOTrainer`` (its own chunked fused LM head);
  * ``fused``: ``sipo_fast.training.FusedDPOTrainer`` (``token_logprobs``, chunked CPU / Triton GPU path);
  * ``naive``: the same trainer with ``logprobs_backend="ref"`` (full float32 logits + log_softmax + gather).

Reported: median step time, working-memory peak over all steps, warm-up included (CPU: peak RSS minus RSS after
set-up; GPU: max_memory_allocated minus allocated after set-up), the loss, and the relative L2 difference of the LoRA gradients
and of the loss against TRL's (target ≤ 1e-4). Batch: B/2 preference pairs, i.e. B sequences of T tokens in the
concatenated [chosen; rejected] forward, 64 prompt tokens each. Gradient checkpointing on (TRL's default).

    flock /tmp/sipo_bench.lock .venv/bin/python benchmarks/bench_dpo_step.py [--quick]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_logprobs import _Peak, _setup, measure  # noqa: E402
from harness import record, run_isolated  # noqa: E402


def step_variant(variant: str, B: int, T: int, prompt_len: int, repeat: int, grads_path: str, threads: int = 2):
    os.environ["TQDM_DISABLE"] = "1"
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from sipo_fast.models import load_default
    from sipo_fast.training import FusedDPOConfig, FusedDPOTrainer

    device = _setup(threads)
    model, tok = load_default(device=device)
    # SIPO stage 1's LoRA shape; random (non-zero) B so that policy != reference and the loss is not log 2
    lora = LoraConfig(r=64, lora_alpha=1, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      init_lora_weights=False)
    common = dict(output_dir=tempfile.mkdtemp(), report_to="none", bf16=False, gradient_checkpointing=True,
                  per_device_train_batch_size=B // 2, max_length=T, seed=0, use_cpu=device == "cpu")
    ds = Dataset.from_list([{"prompt": "Hi", "chosen": "Hello", "rejected": "Bye"}])
    if variant == "trl":
        trainer = DPOTrainer(model, None, DPOConfig(**common), train_dataset=ds, processing_class=tok,
                             peft_config=lora)
    else:
        backend = "ref" if variant == "naive" else None
        trainer = FusedDPOTrainer(model, None, FusedDPOConfig(**common, logprobs_backend=backend), train_dataset=ds,
                                  processing_class=tok, peft_config=lora)
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(100, 40000, (n,), generator=g).tolist()  # noqa: E731
    examples = [{"prompt_ids": ids(prompt_len), "chosen_ids": ids(T - prompt_len), "rejected_ids": ids(T - prompt_len)}
                for _ in range(B // 2)]
    batch = {k: v.to(device) for k, v in trainer.data_collator(examples).items()}
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's train loop; training_step reads it
    params = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]

    def step():
        for _, p in params:
            p.grad = None
        return trainer.training_step(trainer.model, batch)

    peak = _Peak(device)
    peak.start()
    loss = step().item()  # warm-up, and the loss/gradients compared across variants
    torch.save({n: p.grad.detach().float().cpu() for n, p in params}, grads_path)
    t, c = measure(step, repeat)
    extra = peak.stop()
    return {"time_s": t, "cpu_s": c, "extra_mb": extra, "loss": loss, "device": device}


def _rel(a: dict, b: dict) -> float:
    keys = sorted(b)
    x = torch.cat([a[k].flatten() for k in keys])
    y = torch.cat([b[k].flatten() for k in keys])
    return ((x - y).norm() / y.norm()).item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shapes (smoke run), results not recorded")
    p.add_argument("--batch", type=int, default=8, help="sequences per step (B/2 pairs)")
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--repeat", type=int, default=1)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq = 2, 128
    if args.batch % 2:
        raise SystemExit("--batch must be even (chosen and rejected of B/2 pairs)")
    os.environ.pop("TRITON_INTERPRET", None)
    tmp = Path(tempfile.mkdtemp())
    res, grads = {}, {}
    for v in ("trl", "fused", "naive"):
        res[v] = run_isolated("bench_dpo_step:step_variant", dict(variant=v, B=args.batch, T=args.seq, prompt_len=64,
                                                                  repeat=args.repeat, grads_path=str(tmp / f"{v}.pt")))
        grads[v] = torch.load(tmp / f"{v}.pt")
    base = res["trl"]
    rows = [{"variant": v, "B×T": f"{args.batch}×{args.seq}", "device": r["device"], "step_s": r["time_s"],
             "time_vs_trl": r["time_s"] / base["time_s"], "cpu_time_vs_trl": r["cpu_s"] / base["cpu_s"], "extra_MiB": r["extra_mb"],
             "mem_vs_trl": r["extra_mb"] / base["extra_mb"], "loss": r["loss"],
             "loss_rel_diff": abs(r["loss"] - base["loss"]) / abs(base["loss"]),
             "grad_rel_diff": _rel(grads[v], grads["trl"])} for v, r in res.items()]
    notes = ("Ratios against TRL's stock DPOTrainer step in the same run (lower is better); cpu_time_vs_trl uses "
             "process CPU time, steadier than wall time on a shared machine. LoRA r=64 on q/k/v/o "
             "(SIPO stage 1), gradient checkpointing on, float32. grad_rel_diff = ||g - g_trl|| / ||g_trl|| over "
             "all LoRA gradients.")
    if args.quick:
        print(rows)
    else:
        record("One DPO training step, SmolLM2-135M + LoRA: fused vs naive vs TRL", rows, notes=notes)


if __name__ == "__main__":
    main()
