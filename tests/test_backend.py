"""One backend vocabulary for every op (sipo_fast.ops.backend): the names and their old aliases, the one bad-name
error, the process-wide default and which implementation each op then runs (spied, and compared with a direct
call of that implementation), the MOD decoder's choices under the "ref" default, and the smoke pipeline with
``backend: ref`` against the default run."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import random_lora_b

import sipo_fast._ext as ext
import sipo_fast.ops.decode as dec_ops
import sipo_fast.ops.logprobs as lp_ops
import sipo_fast.ops.mod as mod_ops
import sipo_fast.ops.attention as pa_ops
from sipo_fast.ops.backend import (BACKENDS, canonical, get_default_backend, requested, resolve,
                                   set_default_backend, use_backend)

from test_paged_attention import make_case


class Spy:
    """Replaces ``obj.name`` with a wrapper that counts calls and calls through (undone by monkeypatch)."""

    def __init__(self, monkeypatch, obj, name):
        self.calls, fn = 0, getattr(obj, name)

        def wrapper(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        monkeypatch.setattr(obj, name, wrapper)


class Reached(Exception):
    pass


# ------------------------------------------------------------------------------------- the ops, as cases
def _mod_inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 3, 17, generator=g), torch.tensor([0.3, 0.7]), torch.rand(3, 17, generator=g)


def _lp_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(5, 8, generator=g), torch.randn(23, 8, generator=g), torch.tensor([0, 3, -100, 22, 7])


def _attn_inputs():
    g = torch.Generator().manual_seed(2)
    q, kc, vc = torch.randn(3, 4, 8, generator=g), torch.randn(3, 2, 9, 8, generator=g), torch.randn(3, 2, 9, 8, generator=g)
    return q, kc, vc, torch.tensor([0, 2, 5]), torch.tensor([7])


def _paged_inputs():
    q, kc, vc, tables, clens, _, _ = make_case([5, 9, 1], 4, 2, 16, 4, torch.float32, seed=4)
    return q, kc, vc, tables, clens


def _case(op):
    """(call(backend), reference(), [module, ref name], [module, cpu name], [module, triton launcher name])."""
    if op == "mod_sample":
        logits, w, u = _mod_inputs()
        return (lambda b: mod_ops.mod_sample(logits, w, uniform=u, temperature=0.8, top_k=9, backend=b),
                lambda: mod_ops.mod_sample_ref(logits, w, uniform=u, temperature=0.8, top_k=9),
                (mod_ops, "mod_sample_ref"), (mod_ops, "_mod_sample_torch"), ("mod_sample", "mod_sample_triton"))
    if op == "mod_mix":
        logits, w, _ = _mod_inputs()
        return (lambda b: mod_ops.mod_mix(logits, w, backend=b), lambda: mod_ops.mod_mix_ref(logits, w),
                (mod_ops, "mod_mix_ref"), (mod_ops, "_mix_torch"), ("mod_sample", "mod_mix_triton"))
    if op == "token_logprobs":
        h, w, y = _lp_inputs()
        return (lambda b: lp_ops.token_logprobs(h, w, y, backend=b), lambda: lp_ops.token_logprobs_ref(h, w, y),
                (lp_ops, "token_logprobs_ref"), (lp_ops, "_chunked_forward"), ("logprobs", "token_logprobs_forward"))
    if op == "paged_attention":
        args = _paged_inputs()
        return (lambda b: pa_ops.paged_attention(*args, backend=b), lambda: pa_ops.paged_attention_ref(*args),
                (pa_ops, "paged_attention_ref"), (ext, "require"), ("paged_attention", "paged_attention_decode"))
    if op == "decode_attention":
        q, kc, vc, starts, length = _attn_inputs()
        return (lambda b: dec_ops.decode_attention(q, kc, vc, starts, length, 0.3, backend=b),
                lambda: dec_ops.decode_attention_ref(q, kc, vc, starts, length, 0.3),
                (dec_ops, "decode_attention_ref"), (dec_ops.F, "scaled_dot_product_attention"),
                ("decode", "decode_attention_triton"))
    raise AssertionError(op)


OPS = ["mod_sample", "mod_mix", "token_logprobs", "paged_attention", "decode_attention"]


def _same(a, b):
    a, b = (a if isinstance(a, tuple) else (a,)), (b if isinstance(b, tuple) else (b,))
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(autouse=True)
def _default_is_auto():
    assert get_default_backend() == "auto"
    yield
    assert get_default_backend() == "auto", "a test left the process default changed"


# ------------------------------------------------------------------------------------------ vocabulary
def test_vocabulary_and_aliases():
    assert BACKENDS == ("auto", "triton", "cpu", "ref")
    assert [canonical(n) for n in (None, "auto", "triton", "cpu", "ref")] == ["auto", "auto", "triton", "cpu", "ref"]
    assert [canonical(n) for n in ("torch", "chunked", "cpp")] == ["cpu", "cpu", "cpu"]
    assert canonical("flash", extra=("flash",)) == "flash"
    x = torch.zeros(2)
    assert resolve(None, x, "op") == resolve("auto", x, "op") == "cpu"  # CPU tensors, default "auto"


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("old", ["torch", "chunked", "cpp"])
def test_old_names_run_the_cpu_path_of_every_op(op, old, monkeypatch):
    call, _, _, cpu, _ = _case(op)
    want = call("cpu")
    spy = Spy(monkeypatch, *cpu)
    assert _same(call(old), want) and spy.calls == 1


@pytest.mark.parametrize("op", OPS + ["rms_norm", "silu_mul", "set_default_backend", "sequence_logprobs"])
def test_bad_name_is_one_error_everywhere(op):
    x = torch.randn(2, 8)
    calls = {"rms_norm": lambda b: dec_ops.rms_norm(x, torch.ones(8), 1e-5, backend=b),
             "silu_mul": lambda b: dec_ops.silu_mul(x, x, backend=b),
             "set_default_backend": set_default_backend,
             "sequence_logprobs": _sequence_logprobs_with}
    call = calls.get(op) or _case(op)[0]
    extra = ", 'flash'" if op == "paged_attention" else ""
    msg = (rf"^{op}: backend='gpu' is not one of 'auto', 'triton', 'cpu', 'ref'{extra} \(None means 'auto'; "
           r"'torch', 'chunked', 'cpp' are old names of 'cpu'\)$")
    with pytest.raises(ValueError, match=msg):
        call("gpu")


def _sequence_logprobs_with(backend):
    from sipo_fast.training.logprobs import sequence_logprobs

    ids = torch.ones(1, 3, dtype=torch.long)
    # a model that must never run: the name is checked first, whichever path the model would take
    return sequence_logprobs(None, ids, torch.ones_like(ids), torch.ones_like(ids), backend=backend)


def test_flash_is_paged_attention_only():
    with pytest.raises(ValueError, match="mod_mix: backend='flash'"):
        _case("mod_mix")[0]("flash")
    with pytest.raises(ValueError, match="set_default_backend: backend='flash'"):
        set_default_backend("flash")


def test_triton_that_cannot_run_is_a_clear_error(monkeypatch):
    import sipo_fast.ops.backend as be

    x = torch.zeros(2)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match=r"mod_mix: backend 'triton' runs on CUDA tensors \(CPU tensors only under "
                                         r"TRITON_INTERPRET=1.*got cpu tensors; use backend='cpu' or 'ref'"):
        resolve("triton", x, "mod_mix")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve("triton", x, "mod_mix") == "triton"
    monkeypatch.setattr(be, "_has_triton", False)
    with pytest.raises(ValueError, match="token_logprobs: backend 'triton' needs the triton package"):
        _case("token_logprobs")[0]("triton")
    with use_backend("triton"), pytest.raises(ValueError, match="needs the triton package"):
        _case("mod_sample")[0](None)  # through the default too
    assert resolve("auto", x, "op") == "cpu"  # auto never asks for what cannot run


# ------------------------------------------------------------------------------------ the default
def test_default_set_restore_and_nesting():
    assert set_default_backend("ref") == "auto"
    try:
        assert get_default_backend() == "ref" and requested(None) == "ref" and requested("cpu") == "cpu"
    finally:
        assert set_default_backend("auto") == "ref"
    with use_backend("cpu"):
        with use_backend("torch"):  # aliases are accepted and stored canonically
            assert get_default_backend() == "cpu"
        with pytest.raises(RuntimeError):
            with use_backend("ref"):
                raise RuntimeError("boom")
        assert get_default_backend() == "cpu"
    with pytest.raises(ValueError):
        with use_backend("nope"):
            pass


@pytest.mark.parametrize("op", OPS)
def test_ref_default_runs_the_reference(op, monkeypatch):
    call, reference, ref, cpu, _ = _case(op)
    want = reference()
    ref_spy, cpu_spy = Spy(monkeypatch, *ref), Spy(monkeypatch, *cpu)
    with use_backend("ref"):
        got, got_auto = call(None), call("auto")
    assert ref_spy.calls == 2 and cpu_spy.calls == 0
    assert _same(got, want) and _same(got_auto, want)


@pytest.mark.parametrize("op", OPS)
def test_cpu_default_runs_the_fast_path_and_explicit_names_win(op, monkeypatch):
    call, _, ref, cpu, _ = _case(op)
    want = call("cpu")
    ref_spy, cpu_spy = Spy(monkeypatch, *ref), Spy(monkeypatch, *cpu)
    with use_backend("cpu"):
        assert _same(call(None), want)
        assert (cpu_spy.calls, ref_spy.calls) == (1, 0)
        call("ref")  # an explicit argument beats the default
        assert (cpu_spy.calls, ref_spy.calls) == (1, 1)
    with use_backend("ref"):
        assert _same(call("cpu"), want)
        assert (cpu_spy.calls, ref_spy.calls) == (2, 1)


def _fake_kernel(monkeypatch, module, name):
    import importlib

    mod = importlib.import_module(f"sipo_fast.kernels.{module}")

    def fake(*args, **kwargs):
        raise Reached(name)
    monkeypatch.setattr(mod, name, fake)


@pytest.mark.parametrize("op", OPS + ["rms_norm", "silu_mul", "rope_kv"])
def test_triton_default_reaches_the_kernel_and_the_others_do_not(op, monkeypatch):
    """Routing only: the launcher is replaced by one that raises, so no kernel runs here."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors may then ask for triton
    if op in ("rms_norm", "silu_mul", "rope_kv"):
        x, kc = torch.randn(3, 16), torch.zeros(3, 2, 5, 8)
        cos, sin = torch.randn(10, 8), torch.randn(10, 8)
        call = {"rms_norm": lambda b: dec_ops.rms_norm(x, torch.ones(16), 1e-5, x, backend=b),
                "silu_mul": lambda b: dec_ops.silu_mul(x, x, backend=b),
                "rope_kv": lambda b: dec_ops.rope_kv(x, x, x, cos, sin, torch.tensor([0, 3, 9]), kc.clone(),
                                                     kc.clone(), torch.tensor([1]), backend=b)}[op]
        kernel = ("decode", f"{op}_triton")
    else:
        call, _, _, _, kernel = _case(op)
    want = call("cpu")
    _fake_kernel(monkeypatch, *kernel)
    with use_backend("triton"), pytest.raises(Reached):
        call(None)
    for default in ("ref", "cpu", "auto"):  # CPU tensors: no default but "triton" reaches the kernel
        with use_backend(default):
            got = call(None)
        if op in ("rms_norm", "silu_mul", "rope_kv"):  # their plain-torch path is their reference
            assert _same(got, want)


def test_paged_attention_select_backend_and_cpu_on_cuda_message():
    q, kc, *_ = _paged_inputs()
    assert pa_ops.select_backend(q, kc) == "cpu"
    with use_backend("ref"):
        assert pa_ops.select_backend(q, kc) == "cpu"  # the device rule alone, whatever the default


# ------------------------------------------------------------------------------------ the MOD decoder
def _two_adapters(tokenizer):
    from peft import LoraConfig, get_peft_model

    from sipo_fast.models import tiny

    base, _ = tiny("llama", tokenizer=tokenizer, seed=0, tie_word_embeddings=False)
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(4.0)  # spread the logits: no near-ties between paths
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                        target_modules=["q_proj", "v_proj"]), adapter_name="helpful")
    pm.add_adapter("harmless", LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]))
    return random_lora_b(pm)


def test_decoder_under_ref_default_takes_dynamic_peft_and_the_ref_sampler(tokenizer, monkeypatch):
    pytest.importorskip("peft")
    from sipo_fast import MODDecoder
    from sipo_fast.data.formatting import encode_prompts, left_pad

    pm, names = _two_adapters(tokenizer), ["helpful", "harmless"]
    ids, mask = left_pad(encode_prompts(tokenizer, ["Hello there", "Why is the sky blue?"], "none"),
                         tokenizer.pad_token_id)
    kw = dict(weights=[[0.2, 0.8], [0.7, 0.3]], max_new_tokens=6)
    fast = MODDecoder(pm, tokenizer, adapter_names=names)
    assert fast.kv_cache == ("paged" if ext.available() else "dynamic")
    assert fast.runner.lora.impl == "bmm" and fast.sample_backend is None
    with use_backend("ref"):
        ref = MODDecoder(pm, tokenizer, adapter_names=names)
    assert ref.kv_cache == "dynamic" and ref.runner.lora.impl == "peft" and ref.sample_backend == "ref"
    spy = Spy(monkeypatch, mod_ops, "mod_sample_ref")
    out_ref = ref.generate(ids, mask, **kw)  # the choices were fixed when the decoder was built
    assert spy.calls > 0
    calls = spy.calls
    out_fast = fast.generate(ids, mask, **kw)
    assert spy.calls == calls
    assert torch.equal(out_fast.sequences, out_ref.sequences)
    torch.testing.assert_close(out_fast.logprobs, out_ref.logprobs, atol=1e-4, rtol=1e-5)


def test_decoder_explicit_choices_win_and_ops_follow_the_default(tokenizer, monkeypatch):
    from sipo_fast import MODDecoder
    from sipo_fast.models import tiny

    if not ext.available():
        pytest.skip("the paged path needs the compiled extension")
    models = [tiny("llama", tokenizer=tokenizer, seed=i)[0] for i in range(2)]
    ids = torch.tensor([[5, 6, 7, 8]])
    with use_backend("ref"):
        dec = MODDecoder(models, tokenizer, kv_cache="paged", sample_backend="torch", lora_impl="auto")
        assert dec.kv_cache == "paged" and dec.sample_backend == "cpu"
        spy = Spy(monkeypatch, pa_ops, "paged_attention_ref")
        dec.generate(ids, torch.ones_like(ids), weights=[0.5, 0.5], max_new_tokens=3, eos_token_id=[])
        assert spy.calls > 0  # the paged path's attention runs its reference under the "ref" default
    with pytest.raises(ValueError, match=r"MODDecoder\(sample_backend=\.\.\.\): backend='fast'"):
        MODDecoder(models, tokenizer, sample_backend="fast")
    with pytest.raises(ValueError, match="lora_impl must be one of"):
        MODDecoder(models, tokenizer, lora_impl="fast")


# ----------------------------------------------------------------------------------------- the pipeline
def test_pipeline_config_key():
    from sipo_fast.pipeline import PipelineConfig, preset

    cfg = preset("smoke")
    assert cfg.backend == "auto" and "backend: auto" in cfg.to_yaml()
    ref = cfg.override(["backend=ref"])
    assert ref.backend == "ref" and PipelineConfig.from_yaml(ref.to_yaml()) == ref
    for bad in ("torch", "gpu", 3):
        with pytest.raises(ValueError, match="backend"):
            cfg.override([f"backend={bad}"])


def test_smoke_pipeline_with_backend_ref_matches_the_default_run(tmp_path, monkeypatch):
    """Stages 1-2.3 of the smoke preset twice: the default run on the fast paths, the ``backend: ref`` run on the
    references (spied); same candidates, survivors and stage fingerprints, rewards within float tolerance."""
    from sipo_fast.decoding.decoder import MODDecoder
    from sipo_fast.pipeline import SIPOPipeline, preset
    from sipo_fast.pipeline.rundir.files import read_jsonl

    spies = {n: Spy(monkeypatch, m, n) for m, n in [(mod_ops, "mod_sample_ref"), (mod_ops, "_mod_sample_torch"),
                                                    (lp_ops, "token_logprobs_ref"), (lp_ops, "_chunked_forward")]}
    decoders = []
    init = MODDecoder.__init__

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        decoders.append((self.kv_cache, self.sample_backend, getattr(getattr(self.runner, "lora", None), "impl", None)))
    monkeypatch.setattr(MODDecoder, "__init__", record)
    runs, STAGES = {}, ("align", "sample", "refine", "filter")
    for backend in ("auto", "ref"):
        for s in spies.values():
            s.calls = 0
        decoders.clear()
        pipe = SIPOPipeline(preset("smoke").override([f"backend={backend}", "eval.enabled=false"]),
                            tmp_path / backend, progress=False)
        summary = pipe.run(list(STAGES))
        assert get_default_backend() == "auto"  # restored after the run
        runs[backend] = dict(summary=summary, calls={n: s.calls for n, s in spies.items()}, decoders=list(decoders),
                             manifest=json.loads(pipe.run_dir.manifest_path.read_text()),
                             **{f: read_jsonl(pipe.run_dir.stage_dir("filter") / f"{f}.jsonl")
                                for f in ("rewards", "survivors")},
                             candidates=read_jsonl(pipe.run_dir.stage_dir("sample") / "candidates.jsonl"))
    fast, ref = runs["auto"], runs["ref"]
    assert fast["calls"]["mod_sample_ref"] == 0 and fast["calls"]["token_logprobs_ref"] == 0
    assert fast["calls"]["_mod_sample_torch"] > 0 and fast["calls"]["_chunked_forward"] > 0
    assert ref["calls"]["_mod_sample_torch"] == 0 and ref["calls"]["_chunked_forward"] == 0
    assert ref["calls"]["mod_sample_ref"] == fast["calls"]["_mod_sample_torch"]
    assert ref["calls"]["token_logprobs_ref"] == fast["calls"]["_chunked_forward"]
    assert ref["decoders"] and all(d == ("dynamic", "ref", "peft") for d in ref["decoders"])
    assert all(d[0] != "dynamic" or not ext.available() for d in fast["decoders"])
    assert [c["candidate"] for c in fast["candidates"]] == [c["candidate"] for c in ref["candidates"]]
    assert fast["survivors"] == ref["survivors"]
    assert len(fast["rewards"]) == len(ref["rewards"]) > 0
    for a, b in zip(fast["rewards"], ref["rewards"]):
        assert a["survives"] == b["survives"]
        for key in ("rewards", "rewards_a", "rewards_b"):
            torch.testing.assert_close(torch.tensor(b[key]), torch.tensor(a[key]), atol=1e-3, rtol=1e-4)
    # backend is not part of any stage's fingerprint: the default run's stages count as done for backend=ref
    switched = SIPOPipeline(preset("smoke").override(["backend=ref", "eval.enabled=false"]), tmp_path / "auto",
                            progress=False)
    assert {r["stage"]: r["state"] for r in switched.status()
            if r["stage"] in ("align", "sample", "refine", "filter")} == dict.fromkeys(STAGES, "done")
    assert fast["manifest"]["stages"]["align"]["config"] == ref["manifest"]["stages"]["align"]["config"]


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
def test_cuda_auto_is_triton_and_cpu_default_keeps_cuda_tensors_off_triton(monkeypatch):
    logits, w, u = (t.cuda() for t in _mod_inputs())
    assert resolve(None, logits, "op") == "triton"
    want = mod_ops.mod_sample_ref(logits.cpu(), w.cpu(), uniform=u.cpu())
    spy = Spy(monkeypatch, mod_ops, "_mod_sample_torch")
    with use_backend("cpu"):
        tok, lp = mod_ops.mod_sample(logits, w, uniform=u)  # the torch fast path runs on CUDA tensors
        assert spy.calls == 1 and torch.equal(tok.cpu(), want[0])
        torch.testing.assert_close(lp.cpu(), want[1])
        q, kc, vc, tables, clens = (t.cuda() for t in _paged_inputs())
        with pytest.raises(ValueError, match="paged_attention: backend 'cpu' \\(the C\\+\\+ kernel\\) runs on CPU"):
            pa_ops.paged_attention(q, kc, vc, tables, clens)
