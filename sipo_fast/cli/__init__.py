"""``sipo-fast``: the command line. Thin on purpose: it parses arguments and calls ``sipo_fast.pipeline``.

    sipo-fast demo                                   # the whole pipeline + evaluation on the embedded model
    sipo-fast run --preset smoke --output-dir runs/smoke sample.max_new_tokens=16
    sipo-fast align|sample|refine|filter|finetune|evaluate --preset demo --output-dir runs/demo
    sipo-fast run --preset demo --dry-run            # check every input and the output dir; write nothing
    sipo-fast status --output-dir runs/demo          # which stages are done, stale or waiting, and why
    sipo-fast repair --output-dir runs/demo          # rebuild a broken manifest.json from the stages' stage.json
    sipo-fast config --preset demo > my.yaml         # the resolved config, to edit and pass with --config
    sipo-fast eval ...                               # stand-alone evaluation (sipo_fast.cli.eval)
    sipo-fast env                                    # versions and build facts
    accelerate launch --num_processes 8 -m sipo_fast.cli run --config configs/beavertails.yaml   # 8 GPUs

Under ``accelerate launch`` / ``torchrun`` every rank runs the command; rank 0 alone writes and prints, the
other ranks log warnings only (see ``sipo_fast.distributed``).

Every failure ends in one line ``sipo-fast <command>: error: ...`` (one per problem for a failed preflight)
and exit code 2; ``--debug`` (or ``SIPO_FAST_DEBUG=1``) shows the traceback instead.

No torch import at module level: ``sipo-fast --help`` answers instantly.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

STAGE_COMMANDS = {
    "align": "stage 1: one DPO run per objective from the reference model",
    "sample": "stage 2.1: MOD over the stage-1 policies at every weight, on the conflicting prompts",
    "refine": "stage 2.2: review and rewrite each candidate (a pass-through when refine.enabled=false)",
    "filter": "stage 2.3: keep candidates that strictly dominate both originals; build D_c",
    "finetune": "stage 3: fine-tune each policy on D_c with the SIPO loss",
    "evaluate": "the pipeline's evaluation stage: MOD sweeps of the fine-tuned policies and baselines",
}
_OVERRIDES_HELP = "config overrides section.key=value (value parsed as YAML), e.g. sample.max_new_tokens=32"


def _config_args(p: argparse.ArgumentParser, *, default_preset: str | None = None) -> None:
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of a failure")
    p.add_argument("--config", metavar="FILE.yaml", help="YAML config (mirrors PipelineConfig; see configs/)")
    p.add_argument("--preset", default=default_preset, help="named preset: smoke, demo, beavertails, helpsteer"
                   + (f" (default: {default_preset})" if default_preset else ""))
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=_OVERRIDES_HELP)


def _run_args(p: argparse.ArgumentParser, *, default_preset: str | None = None) -> None:
    _config_args(p, default_preset=default_preset)
    p.add_argument("--output-dir", metavar="DIR", help="run directory (default: runs/<preset or config name>)")
    p.add_argument("--force", action="store_true", help="start over: move an existing run directory (never anything "
                   "else) aside to DIR.old-<time>, deleted once the new run has finished a stage")
    p.add_argument("--dry-run", action="store_true", help="check every input (data, model, LoRA targets, scorers, "
                   "launcher, output dir, free disk) and write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--quiet", action="store_true", help="warnings only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sipo-fast", description="SIPO multi-objective alignment, made fast.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("run", help="run every stage that is not up to date (resumes an interrupted run)",
                       description="Run the pipeline: align, sample, refine, filter, finetune, evaluate. Finished "
                                   "stages whose inputs did not change are skipped; changed ones re-run.")
    _run_args(p)
    p = sub.add_parser("demo", help="the whole pipeline + evaluation on the embedded SmolLM2-135M (about 12 min on 2 cores, 14.5 from a fresh clone with set-up)",
                       description="sipo-fast run --preset demo, ending with the evaluation report.")
    _run_args(p, default_preset="demo")
    for name, text in STAGE_COMMANDS.items():
        p = sub.add_parser(name, help=text, description=f"Run only {text}. Upstream stages must be done (same "
                           "config and --output-dir).")
        _run_args(p)
        p.add_argument("--rerun", action="store_true", help="run the stage even if it is up to date")
    p = sub.add_parser("status", help="show which stages are done, stale or waiting, and why",
                       description="Compares the run directory with its own config.yaml, or with --config/--preset "
                                   "if given (overrides apply to either). Exit 2 if DIR is not a run directory.")
    _config_args(p)
    p.add_argument("--output-dir", metavar="DIR", help="run directory (default: runs/<preset or config name>)")
    p = sub.add_parser("repair", help="rebuild a run directory's manifest.json from its stages' stage.json",
                       description="Every finished stage whose files still match the sizes and hashes in its "
                                   "stage.json is recovered; the others re-run on the next `sipo-fast run`.")
    p.add_argument("--output-dir", metavar="DIR", required=True, help="the run directory")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of a failure")
    p = sub.add_parser("config", help="print the resolved config as YAML")
    _config_args(p)
    p = sub.add_parser("eval", help="stand-alone evaluation of saved policies (sipo_fast.eval)")
    _add_eval_arguments(p)
    sub.add_parser("env", help="print versions and build facts (torch, triton, CUDA, extension)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    return parser


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    from . import eval as eval_cli

    eval_cli.add_arguments(p)
    p.set_defaults(_eval_run=eval_cli.run)


def _load_config(args):
    from sipo_fast.pipeline import load_config

    return load_config(args.config, args.preset, args.overrides)


def _output_dir(args) -> Path:
    if args.output_dir:
        return Path(args.output_dir)
    name = args.preset or (Path(args.config).stem if args.config else "sipo")
    return Path("runs") / name


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (``main`` may run several times in one
    process, e.g. in tests, each with its own stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("sipo_fast")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("[sipo] %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING if quiet else logging.INFO)


def _pipeline(args, config=None):
    from sipo_fast.pipeline import SIPOPipeline

    return SIPOPipeline(config or _load_config(args), _output_dir(args), force=getattr(args, "force", False),
                        progress=not getattr(args, "no_progress", False))


def _status(args) -> int:
    """``sipo-fast status``: the run's own config.yaml unless --config/--preset is given."""
    from sipo_fast.pipeline import PipelineConfig
    from sipo_fast.pipeline.rundir.lock import describe, holder
    from sipo_fast.pipeline.rundir.directory import RunDir

    out = _output_dir(args)
    if not out.exists():
        raise ValueError(f"{out}: no such directory (no run there yet; start one with "
                         f"`sipo-fast run --output-dir {out}`)")
    if not out.is_dir():
        raise ValueError(f"{out} is a file, not a run directory")
    if not RunDir(out).is_run_dir():
        raise ValueError(f"{out} is not a sipo_fast run directory (no manifest.json and no finished stage)")
    if args.config or args.preset:
        config = _load_config(args)
    elif (out / "config.yaml").is_file():
        config = PipelineConfig.from_yaml((out / "config.yaml").read_text())
        config = config.override(args.overrides) if args.overrides else config
    else:
        raise ValueError(f"{out} has no config.yaml (no run there passed validation yet); give --config or --preset")
    info = holder(out)
    if info is not None:
        print(f"running now: {describe(info)}")
    rows = _pipeline(args, config).status()
    for row in rows:
        print(f"{row['stage']:<9} {row['state']:<9} {row['reason']}")
    return 0


def _repair(args) -> int:
    from sipo_fast.pipeline.rundir.lock import RunLock
    from sipo_fast.pipeline.rundir.repair import repair
    from sipo_fast.pipeline.rundir.directory import RunDir
    from sipo_fast.pipeline.stages import STAGES

    run_dir = RunDir(args.output_dir)
    if not run_dir.root.is_dir() or not run_dir.is_run_dir():
        raise ValueError(f"{run_dir.root} is not a sipo_fast run directory (nothing to repair)")
    with RunLock(run_dir.root):
        notes = repair(run_dir, [s.name for s in STAGES])
    print("\n".join(notes) if notes else f"{run_dir.manifest_path} is fine; nothing to repair")
    return 0


def _dry_run(pipe, stages) -> int:
    facts = pipe.preflight(stages)
    print("\n".join(f"ok: {f}" for f in facts))
    print(f"dry run: every check passed; nothing was written to {pipe.run_dir.root}")
    return 0


def _print_summary(out_dir: Path, summary: dict) -> None:
    filt = summary.get("filter")
    if filt:
        print(f"filter: {filt['candidates']} candidates, {filt['rewrites_kept']} rewrites kept, {filt['survivors']} "
              f"strictly dominating, {filt['prompts_covered']}/{filt['conflicting_prompts']} prompts covered, "
              f"{filt['pairs']} pairs")
    report = out_dir / "eval" / "report.md"
    if "eval" in summary and report.exists():
        print(report.read_text())
        print(f"report: {report}")
    print(f"run directory: {out_dir}")


def _parse(argv: list[str] | None):
    """Overrides may come before, between or after options: argparse's one positional list would take only the
    first run of them, so the rest arrive as unknown arguments and are appended here."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        bad = [e for e in extra if e.startswith("-") or "=" not in e or not hasattr(args, "overrides")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides or []) + extra
    return args


def _error_lines(exc: BaseException) -> list[str]:
    """One line per problem: a failed preflight or data check lists several, anything else says one thing."""
    problems = getattr(exc, "problems", None)
    if problems:
        return [" ".join(str(p).split()) for p in problems]
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror:  # "[Errno 28] No space left on device: 'x'" -> "x: No space ..."
        text = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    if isinstance(exc, (ValueError, OSError)):
        return [text or type(exc).__name__]
    return [f"{type(exc).__name__}: {text} (a bug? run with --debug for the traceback)"]


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    debug = getattr(args, "debug", False) or os.environ.get("SIPO_FAST_DEBUG", "") not in ("", "0")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print(f"sipo-fast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure ends in an error line; --debug shows the traceback
        if debug:
            traceback.print_exc()
        for line in _error_lines(exc):
            print(f"sipo-fast {args.command}: error: {line}", file=sys.stderr)
        return 2


def _dispatch(args) -> int:
    if args.command == "env":
        from sipo_fast.env_report import report

        print(report())
        return 0
    if args.command == "config":
        print(_load_config(args).to_yaml(), end="")
        return 0
    if args.command == "status":
        return _status(args)
    if args.command == "repair":
        return _repair(args)
    if args.command == "eval":
        return int(args._eval_run(args) or 0)
    from sipo_fast.distributed import current

    main_rank = current().is_main
    _setup_logging(args.quiet or not main_rank)
    pipe = _pipeline(args)
    stages = None if args.command in ("run", "demo") else ["eval" if args.command in ("evaluate", "eval")
                                                           else args.command]
    if getattr(args, "dry_run", False):
        return _dry_run(pipe, stages)
    summary = pipe.run(stages, rerun=getattr(args, "rerun", False))
    if main_rank:
        _print_summary(pipe.run_dir.root, summary)
    return 0

