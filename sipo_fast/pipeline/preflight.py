"""Preflight: resolve everything a run will need before its first training step (``sipo-fast run --dry-run``,
and the start of every run).

Each check is independent and adds facts (what was resolved) or problems (one line each, naming the
dataset, model, path or key at fault), so one invocation lists every problem at once:

- config: every section re-validated (catches fields edited in Python after the config was built);
- data: each dataset, split and column, the value of every cell (``datacheck``), the conflicts SIPO needs,
  prompt lengths against the context, given stage-1 policies;
- model: tokenizer, config, chat template (when ``model.template`` is "chat");
- LoRA: every ``align.target_modules`` name matches a linear layer of the model (built on the meta device:
  no weights are read or allocated);
- scorers: ``eval.scorers`` (or the data source's defaults) name known scorers with existing paths;
- world: the launcher's environment (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``) and the devices it needs;
- output: the run directory is a directory, not someone else's, not in use, writable, with free disk for an
  estimate of the artifacts.

Nothing here writes: no directory is created, no lock taken, no artifact made.
"""
from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("sipo_fast.pipeline")


class PreflightError(ValueError):
    """Problems found before any work; ``problems`` holds one line each."""

    def __init__(self, problems: list[str] | str):
        # a str is the joined message (Dist.on_main rebuilds exceptions from their message on other ranks)
        self.problems = problems.split("\n") if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


@dataclass
class Findings:
    facts: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    estimate_bytes: int = 0

    def guard(self, label: str, fn) -> object:
        """``fn()``; any exception becomes one problem line per message line (``DataError`` lists several)."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - a preflight reports every failure as a line, never a traceback
            lines = getattr(exc, "problems", None) or [_one_line(exc)]
            self.problems.extend(f"{label}: {line}" for line in lines)
            return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, (ValueError, OSError)) else f"{type(exc).__name__}: {text}"


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# ------------------------------------------------------------------------------------------------ inputs


def check_inputs(ctx, stages=None) -> Findings:
    """Config, data, model, LoRA targets, scorers and world of ``ctx`` (a :class:`.context.Context`)."""
    out = Findings()
    out.guard("config", lambda: type(ctx.config).from_dict(ctx.config.to_dict()))
    out.guard("world", lambda: out.facts.append(_world(ctx)))
    _offline_if_unreachable(ctx, out)
    label = f"model.name={ctx.config.model.name!r}"
    tok = out.guard(label, lambda: _model(ctx, out))
    if tok is not None:
        out.guard("data", lambda: _data(ctx, out))
    else:  # no tokenizer for the length checks; still load the data, so that its own problems are listed too
        out.guard("data", ctx.load_preferences)
    modules = out.guard(label, lambda: _linear_layers(ctx)) if tok is not None else None
    if modules is not None:
        out.guard("align.target_modules", lambda: _lora(ctx, modules, out))
    if ctx.config.eval.enabled and (stages is None or "eval" in stages):
        out.guard("eval.scorers", lambda: _scorers(ctx.config, out))
        if tok is not None:
            out.guard("eval prompts", lambda: _eval_prompts(ctx, out))
    return out


def _hub_names(config) -> list[str]:
    """Model and dataset names that only the Hugging Face hub (or its local cache) can resolve."""
    names = []
    if config.model.name != "default" and not config.model.name.startswith("tiny") \
            and not Path(config.model.name).exists():
        names.append(config.model.name)
    for source in (config.data.source, config.eval.prompt_source if config.eval.enabled else None):
        if source is not None and source != "demo" and not Path(str(source)).exists() and str(source) not in names:
            names.append(str(source))
    return names


def go_offline() -> None:
    """Offline mode for huggingface_hub, transformers and datasets in this process: loads use the local cache
    and fail at once when it lacks a file, instead of retrying an unreachable hub for about a minute each."""
    from huggingface_hub import constants

    os.environ["HF_HUB_OFFLINE"] = "1"
    constants.HF_HUB_OFFLINE = True  # read by huggingface_hub.is_offline_mode, which transformers calls
    try:
        import datasets.config as dconf

        dconf.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def _offline_if_unreachable(ctx, out: Findings) -> None:
    from huggingface_hub import constants

    from sipo_fast.data.prompts import hub_reachable

    names = _hub_names(ctx.config)
    if names and (constants.HF_HUB_OFFLINE or not hub_reachable()):
        go_offline()
        out.facts.append(f"the Hugging Face hub is unreachable: {names} are resolved from the local cache only")


def _model(ctx, out: Findings):
    name = ctx.config.model.name
    if (name.startswith(("/", ".", "~")) or name.count("/") > 1) and not Path(name).expanduser().exists():
        raise ValueError("no such directory (a local model path; hub names look like org/name)")
    tok = ctx.tokenizer
    if ctx.config.model.template == "chat" and not getattr(tok, "chat_template", None):
        raise ValueError("model.template='chat' but its tokenizer has no chat template; set "
                         "model.template to 'none' or a format string with {prompt}")
    ctx_len = _context_length(ctx)
    out.facts.append(f"model {name}: tokenizer with {len(tok)} tokens, context {ctx_len or 'unknown'}, "
                     f"template {ctx.config.model.template!r}")
    return tok


def _context_length(ctx):
    from .context import context_length

    return context_length(ctx.model_config)


def _data(ctx, out: Findings) -> None:
    ctx.validate()  # loads the data (datacheck on every cell), checks objectives, conflicts, lengths, policies
    split = ctx.split
    n_conf = len(ctx.conflicting(split["train"]))
    out.facts.append(f"data {ctx.config.data.source}: {len(split['train'])} train / {len(split['eval'])} eval pairs, "
                     f"{n_conf} conflicting, objectives {ctx.config.data.objectives}")
    out.estimate_bytes += 8 * sum(len(r["prompt"]) + len(r["response_0"]) + len(r["response_1"])
                                  for rows in split.values() for r in rows)


def _linear_layers(ctx) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every linear layer, and the parameter count under
    "" (the model is built on the meta device: nothing is allocated)."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(ctx.model_config,
                                                 trust_remote_code=ctx.config.model.trust_remote_code)
    layers = {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers[""] = (sum(p.numel() for p in model.parameters()), 0)
    return layers


def _lora(ctx, layers: dict, out: Findings) -> None:
    """Every target name must match a linear layer as PEFT matches it (the full name, or its last parts)."""
    a, n_obj = ctx.config.align, len(ctx.config.data.objectives)
    n_params = layers[""][0]
    bytes_per = 2 if ctx.config.model.dtype in ("bfloat16", "float16") else 4
    if not a.use_lora:
        # per objective: align + finetune models, plus a transient trainer checkpoint (weights + 2 moments)
        out.estimate_bytes += n_obj * n_params * bytes_per * 5
        out.facts.append(f"full fine-tuning of {n_params / 1e6:.1f} M parameters per objective")
        return
    names = [n for n in layers if n]
    hits = {t: [n for n in names if n == t or n.endswith("." + t)] for t in a.target_modules}
    missing = [t for t, found in hits.items() if not found]
    if missing:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
        raise ValueError(f"{missing} match no linear layer of {ctx.config.model.name!r}; its linear layers are "
                         f"named {leaves}")
    lora = sum(a.lora_r * sum(layers[n]) for found in hits.values() for n in found)
    # float32 adapters: align r, finetune r_align + r_finetune (concatenated), a transient checkpoint (x3)
    out.estimate_bytes += n_obj * lora * 4 * 6
    out.facts.append(f"LoRA r={a.lora_r} on {a.target_modules}: {sum(map(len, hits.values()))} layers, "
                     f"{lora / 1e6:.2f} M parameters per adapter")


def _scorers(config, out: Findings) -> None:
    from sipo_fast.eval.inputs import DEFAULT_SCORERS
    from sipo_fast.scoring import available_scorers

    specs = config.eval.scorers or DEFAULT_SCORERS.get(config.data.source)
    if not specs:
        raise ValueError(f"not set, and data.source={config.data.source!r} has no default ground-truth scorers: "
                         "set eval.scorers='[name:path, ...]' (one per objective, e.g. beaver_reward:/models/reward) "
                         "or eval.enabled=false")
    known, bad = available_scorers(), []
    for spec in specs:
        name, _, path = str(spec).partition(":")
        if name not in known:
            bad.append(f"unknown scorer {name!r} (known: {', '.join(known)})")
        elif name.startswith("beaver") and not path:
            bad.append(f"{name} needs a model directory: {name}:/path/to/model")
        elif path and not Path(path).is_dir():
            bad.append(f"{spec}: no such directory {path!r} (download the scorer model there first)")
    if bad:
        raise ValueError("; ".join(bad))
    out.facts.append(f"scorers {list(specs)}")


def _eval_prompts(ctx, out: Findings) -> None:
    """The held-out prompts the evaluation stage will score (the same call it makes), so that a data source
    without a usable test split fails now rather than after every training stage."""
    prompts = ctx.heldout_prompts()
    e = ctx.config.eval
    out.facts.append(f"evaluation: {len(prompts)} held-out prompts of {e.prompt_source or ctx.config.data.source} "
                     f"(split {e.prompt_split!r}, {e.prompt_select})")


def _world(ctx) -> str:
    env = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    bad = [f"{k}={v!r}" for k, v in env.items() if v not in (None, "") and not v.isdigit()]
    if bad:
        raise ValueError(f"launcher environment {', '.join(bad)} is not a process count/index")
    world = int(env["WORLD_SIZE"] or 1)
    if world > 1:
        import torch

        if not torch.distributed.is_available():
            raise ValueError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
        local = int(env["LOCAL_RANK"] or 0)
        if ctx.device.type == "cuda" and local >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return f"{world} process(es), device {ctx.device}, dtype {str(ctx.dtype).replace('torch.', '')}"


# ------------------------------------------------------------------------------------------------ output


def existing_ancestor(path: Path) -> Path:
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_output(run_dir, *, force: bool, identity: dict, estimate_bytes: int, held: bool = False) -> Findings:
    """The run directory: a directory (or creatable), sipo_fast's, free (unless this caller ``held`` its lock
    already), compatible, writable, with room."""
    from .rundir.directory import ManifestError
    from .rundir.lock import describe, holder

    out, root = Findings(), run_dir.root
    label = f"--output-dir {root}"
    base = existing_ancestor(root)
    if base.exists() and not base.is_dir():
        out.problems.append(f"{label}: {base} is a file, not a directory")
        return out
    if root.is_dir():
        info = None if held else holder(root)  # first: a run creating the directory now is not a foreign one
        if info is not None:
            out.problems.append(f"{label}: in use by another sipo-fast run: {describe(info)}")
            return out
        extra = run_dir.foreign_files()
        if extra:
            out.problems.append(f"{label}: not a sipo_fast run directory (no manifest.json; found {extra[:5]}); "
                                + ("--force only replaces run directories, " if force else "")
                                + "choose an empty or new directory")
            return out
        try:
            why = None if force else run_dir.identity_conflict(identity)
            if why is not None:
                out.problems.append(f"{label}: {why}")
        except ManifestError:
            out.facts.append(f"{root / 'manifest.json'} is unreadable: the run will rebuild it from the stages' "
                             "stage.json (sipo-fast repair)")
    if not os.access(base, os.W_OK | os.X_OK):
        out.problems.append(f"{label}: {base} is not writable by this user")
    free = shutil.disk_usage(base).free
    need = int(estimate_bytes * 1.2) + 50_000_000  # 20% and 50 MB of slack: logs, reports, caches
    if free < need:
        out.problems.append(f"{label}: {human(free)} free on {base}, the run's artifacts need an estimated "
                            f"{human(need)}; free some space or choose another directory")
    out.facts.append(f"output {root}: writable, {human(free)} free, artifacts estimated at {human(need)}")
    return out
