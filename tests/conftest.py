"""Test setup. Triton kernels run on CPU tensors through the interpreter, which must be switched on
before triton is imported; on a machine with a GPU they compile for real."""
import importlib.util
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    from sipo_fast.models import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama(tokenizer):
    from sipo_fast.models import tiny

    return tiny("llama", tokenizer=tokenizer)[0]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device (run benchmarks/gpu_check.sh on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def random_lora_b(model, std: float = 0.5, seed: int = 0):
    """Give every LoRA B matrix N(0, std) entries (PEFT starts B at zero, which makes adapters no-ops), seeded;
    returns the model in eval mode."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std)
    return model.eval()


def load_script(path: Path):
    """Import a script of scripts/ or benchmarks/ (not a package) as a module, by file path."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
