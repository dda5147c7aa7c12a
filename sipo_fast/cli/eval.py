"""``sipo-fast eval``: compare SIPO with the baselines on a pipeline run, or sweep your own policies.

    sipo-fast eval --run-dir runs/demo                                   # sipo, mod, soups; report in runs/demo/comparison
    sipo-fast eval --run-dir runs/demo --methods sipo mod soups modpo dpo_lw --num-prompts 48
    sipo-fast eval --policies adapters/helpful adapters/harmless --model default --data demo --soups

``--run-dir`` goes through :func:`sipo_fast.pipeline.baselines.compare.evaluate_run` (the run's config, artifacts and
fingerprints); ``--policies`` needs no run directory: it loads the base model and the adapters by name
(:mod:`sipo_fast.models`) and sweeps them with :mod:`sipo_fast.eval`'s functions.
``add_arguments(parser)`` and ``run(args)`` are what the main CLI wires in. Nothing heavy is imported until
``run``, so ``sipo-fast --help`` stays instant.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

METHOD_CHOICES = ("sipo", "mod", "soups", "soups_ab", "modpo", "dpo_lw")  # sipo_fast.pipeline.baselines.compare.METHODS


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_argument_group("what to evaluate (one of)")
    src.add_argument("--run-dir", metavar="DIR", help="a pipeline run directory (sipo-fast run/demo --output-dir)")
    src.add_argument("--policies", nargs="+", metavar="DIR", help="your own per-objective policies, in objective "
                     "order: LoRA adapter directories (on --model) or full model directories")
    p.add_argument("--methods", nargs="+", choices=METHOD_CHOICES, default=None,
                   help="with --run-dir: methods to sweep (default: sipo mod soups). modpo and dpo_lw train one "
                        "model per interior weight (as long as stage 1 each)")
    p.add_argument("--weights", nargs="+", metavar="W", help="weights of the sweep: numbers w (two objectives, "
                   "rows [w, 1-w]) or comma-separated vectors such as 0.2,0.3,0.5 (default: W of stage 2 plus the "
                   "endpoints 0 and 1; with --policies: 0 0.2 0.4 0.6 0.8 1)")
    p.add_argument("--num-prompts", type=int, metavar="N", help="held-out prompts per weight")
    p.add_argument("--max-new-tokens", type=int, metavar="N", help="tokens generated per response")
    p.add_argument("--batch-size", type=int, metavar="N", help="rows per decoding batch")
    p.add_argument("--scorers", nargs="+", metavar="SPEC", help="one ground-truth scorer per objective: a name "
                   "(relevance, harmlessness), name:path (beaver_reward:/path, beaver_cost:/path), hf:<model>[#label] "
                   "or module:Class(...); default from the data")
    p.add_argument("--ref", nargs="+", type=float, metavar="X", help="hypervolume reference point, one value per "
                   "objective in maximisation orientation (costs negated); default: below the nadir of all points")
    p.add_argument("--baseline", default="mod", help="method the average gain is measured against (default: mod)")
    p.add_argument("--out", metavar="DIR", help="where sweeps, cache and report go (default: <run-dir>/comparison "
                   "or eval-out/)")
    own = p.add_argument_group("with --policies")
    for flag, kw in _OWN_POLICY_ARGS:
        own.add_argument(flag, **kw)
    p.add_argument("--backend", choices=("auto", "triton", "cpu", "ref"), default="auto",
                   help="kernels for the whole evaluation (sipo_fast.ops.backend): ref runs every op on its reference")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


_OWN_POLICY_ARGS = (
    ("--model", dict(default="default", help="base model of LoRA policies: default (embedded SmolLM2), tiny, or a "
                                             "Hugging Face name/path")),
    ("--data", dict(default="demo", help="held-out prompts: a data source's test split (demo, a PKU path, ...) or a "
                                         ".txt file with one prompt per line")),
    ("--template", dict(default="chat", help="prompt template: chat, none, or a format string with {prompt}")),
    ("--name", dict(default="policies", help="method name for your policies in the report")),
    ("--soups", dict(action="store_true", help="also sweep the DPO soups of your LoRA policies")),
    ("--seed", dict(type=int, default=0, help="seed recorded with the sweep (decoding is greedy)")),
)


def _weights(values: list[str] | None):
    if values is None:
        return None
    rows = [[float(x) for x in v.split(",")] for v in values]
    if all(len(r) == 1 for r in rows):
        return [r[0] for r in rows]
    if len({len(r) for r in rows}) != 1:
        raise ValueError(f"--weights mixes numbers and vectors of different lengths: {values}")
    return rows


def _prompts(data: str, n: int) -> list[str]:
    path = Path(data)
    if path.suffix == ".txt" and path.is_file():
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        if not prompts:
            raise ValueError(f"{path} holds no prompts (one per line)")
        return prompts[:n]
    from sipo_fast.eval.inputs import heldout_prompts

    return heldout_prompts(data, n)


def _own_policies(args) -> dict:
    """Sweep MOD (and soups) over --policies on --model; returns write_report's paths."""
    from sipo_fast.eval.cache import ScoreCache
    from sipo_fast.eval.inputs import DEFAULT_SCORERS, build_scorers
    from sipo_fast.eval.methods import mod_generator, soup_generator
    from sipo_fast.eval.report import write_report
    from sipo_fast.eval.stats import weight_grid
    from sipo_fast.eval.sweep import run_eval

    n = len(args.policies)
    if n < 2:
        raise ValueError("--policies needs one policy per objective, at least two")
    specs = args.scorers or DEFAULT_SCORERS.get(args.data)
    if not specs or len(specs) != n:
        raise ValueError(f"give one scorer per policy with --scorers ({n} policies, got {specs})")
    from sipo_fast.scoring import check_scorer_spec

    bad = [why for why in map(check_scorer_spec, specs) if why]
    if bad:  # before any model loads
        raise ValueError("--scorers: " + "; ".join(bad))
    lora = [(Path(d) / "adapter_config.json").exists() for d in args.policies]
    if len(set(lora)) != 1:
        raise ValueError("--policies mixes LoRA adapters and full models; give one kind")
    import torch

    from sipo_fast.decoding import MODDecoder
    from sipo_fast.models import auto_dtype, load_adapters, load_base, load_full_models, tokenizer_for

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = auto_dtype(device)
    tok = tokenizer_for(args.model)
    if lora[0]:
        names = [f"p{i}" for i in range(n)]
        model = load_adapters(load_base(args.model, dtype=dtype, device=device, tokenizer=tok), args.policies, names)
        decoder, soups = MODDecoder(model, tok, adapter_names=names), (model, names)
    else:
        models = load_full_models(args.policies, dtype=dtype, device=device)
        decoder, soups = MODDecoder(models, tok), (models, None)
    w = _weights(args.weights)
    w = weight_grid(n) if w is None and n == 2 else w
    if w is None:
        raise ValueError(f"give --weights vectors for {n} objectives, e.g. 1,0,0 0,1,0 0,0,1 0.4,0.3,0.3")
    kw = dict(max_new_tokens=args.max_new_tokens or 128, template=args.template, batch_size=args.batch_size or 16,
              progress=not args.no_progress)
    prompts = _prompts(args.data, args.num_prompts or 64)
    scorers = build_scorers(specs)
    out = Path(args.out or "eval-out")
    cache = ScoreCache(out / "scores.sqlite")
    results = [run_eval(mod_generator(decoder, **kw), prompts, scorers, w, f"{args.name} (MOD)", cache=cache,
                        seed=args.seed)]
    if args.soups:
        gen = soup_generator(soups[0], tok, adapter_names=soups[1], **kw)
        results.append(run_eval(gen, prompts, scorers, w, f"{args.name} (soups)", cache=cache, seed=args.seed))
    for r in results:
        r.save(out / "sweeps" / f"{r.method.replace(' ', '_').replace('(', '').replace(')', '')}.json")
    return write_report(results, out, ref=args.ref, baseline=results[0].method, title=f"Pareto fronts of {args.name}")


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sipo-fast eval``; returns the exit status."""
    from sipo_fast.ops.backend import use_backend

    with use_backend(args.backend):
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if bool(args.run_dir) == bool(args.policies):
        print("sipo-fast eval: give exactly one of --run-dir DIR or --policies DIR [DIR ...]", file=sys.stderr)
        return 2
    from sipo_fast.distributed import current

    dist = current()
    if dist.enabled and args.policies:
        print("sipo-fast eval: --policies runs in one process; under accelerate launch / torchrun evaluate a run "
              "directory (--run-dir), whose sweeps are split over the processes", file=sys.stderr)
        return 2
    if args.run_dir:
        from sipo_fast.pipeline.baselines.compare import DEFAULT_METHODS, evaluate_run
        from sipo_fast.pipeline.rundir.lock import RunLock
        from sipo_fast.pipeline.rundir.directory import RunDir

        # It writes into the run directory (comparison/, by default): one writer at a time, as for `run`.
        lock = RunLock(args.run_dir) if dist.is_main and RunDir(args.run_dir).is_run_dir() else None
        try:
            if lock is not None:
                lock.acquire()
            run_ = evaluate_run(args.run_dir, methods=args.methods or DEFAULT_METHODS, weights=_weights(args.weights),
                                num_prompts=args.num_prompts, max_new_tokens=args.max_new_tokens,
                                batch_size=args.batch_size, scorers=args.scorers, ref=args.ref,
                                baseline=args.baseline, out_dir=args.out, progress=not args.no_progress)
        finally:
            if lock is not None:
                lock.release()
        paths = run_.paths
    else:
        paths = _own_policies(args)
    if dist.is_main:
        print(f"report: {paths['markdown']}" + (f"\nplot:   {paths['png']}" if paths.get("png") else ""))
    return 0
