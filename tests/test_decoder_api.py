"""MODDecoder.generate in transformers' terms. The independent reference is transformers' own ``generate``: with a
one-hot weight, MOD is that one policy, so greedy outputs must equal ``policy.generate`` token for token with
each option transformers has (repetition_penalty, min_new_tokens, stopping criteria, stop_strings, logits
processors, a GenerationConfig). With mixed weights the processors see the mixed logits, checked against a
step-by-step full-recompute reference. Also: option precedence, the prompt and EOS forms, the streamer, the
caller's train/eval modes, the one-time eager warning and transformers' custom_generate hook."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import (GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria,
                          StoppingCriteriaList)
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor
from transformers.generation.streamers import BaseStreamer, TextStreamer

from sipo_fast import MODDecoder
from sipo_fast.data.formatting import encode_prompts, left_pad
from sipo_fast.decoding import custom_generate_dir
from sipo_fast.decoding import hooks as H
from sipo_fast.decoding import inputs as I
from sipo_fast.models import tiny
from sipo_fast.ops.mod import mod_logits

PROMPTS = ["Hello there", "Write a short poem about the sea, please.", "Hi"]
NEW = 12


def _policies(tokenizer, n=2, scale=4.0):
    """Tiny Llamas with spread-out logits (a fresh tiny model's are nearly flat; near-ties make tests fragile)."""
    out = []
    for i in range(n):
        m, _ = tiny("llama", tokenizer=tokenizer, seed=i, tie_word_embeddings=False)
        with torch.no_grad():
            m.get_output_embeddings().weight.mul_(scale)
        out.append(m)
    return out


@pytest.fixture(scope="module")
def models(tokenizer):
    return _policies(tokenizer)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return left_pad(encode_prompts(tokenizer, PROMPTS, "none"), tokenizer.pad_token_id)


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    """Each test sees the once-per-process warnings afresh."""
    monkeypatch.setattr(H, "_warned", set())
    monkeypatch.setattr(I, "_warned", set())


class BoostLastToken(LogitsProcessor):
    """Adds a bias to the previous token: reads input_ids, so it checks what the decoder hands processors (with
    NoRepeatNGramLogitsProcessor(2) after it, a token repeats once and then may not again)."""

    def __call__(self, input_ids, scores):
        return scores.scatter_add(1, input_ids[:, -1:], torch.full_like(scores[:, :1], 8.0))


class StopAfterToken(StoppingCriteria):
    def __init__(self, token: int):
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def _options(tokenizer, free, t):
    """Option sets whose effect shows within NEW tokens, built from the unconstrained greedy output ``free``
    (so every one of them changes the result: the test can fail)."""
    eos = int(free[0, t + 1])  # row 0's second token: EOS would end row 0 at step 2
    stop_text = tokenizer.decode([int(free[1, t + 2])])
    return {
        "repetition_penalty": dict(repetition_penalty=0.5),  # < 1 favours seen tokens: visible at once,
        "eos": dict(eos_token_id=eos),
        "min_new_tokens": dict(eos_token_id=eos, min_new_tokens=6),
        "stop_strings": dict(stop_strings=[stop_text], tokenizer=tokenizer),
        "stopping_criteria": dict(stopping_criteria=StoppingCriteriaList([StopAfterToken(int(free[2, t + 3]))])),
        "logits_processor": dict(logits_processor=LogitsProcessorList([BoostLastToken(), NoRepeatNGramLogitsProcessor(2)])),
        "generation_config": dict(generation_config=GenerationConfig(max_new_tokens=7, repetition_penalty=0.6,
                                                                     eos_token_id=eos, min_new_tokens=4)),
    }


@pytest.mark.parametrize("kv", ["auto", "static"])
def test_one_hot_greedy_equals_transformers_generate_with_each_option(tokenizer, models, batch, kv):
    ids, mask = batch
    t, pad = ids.shape[1], tokenizer.pad_token_id
    dec = MODDecoder(models, tokenizer, kv_cache=kv)
    base = dict(max_new_tokens=NEW, pad_token_id=pad, eos_token_id=[])
    free = dec.generate(ids, mask, weights=[1.0, 0.0], **base).sequences
    ref_free = models[0].generate(input_ids=ids, attention_mask=mask, do_sample=False, **base)
    assert torch.equal(free, ref_free)
    results = {}
    for name, opt in _options(tokenizer, free, t).items():
        kw = {**base, **opt}
        if "generation_config" in opt:
            kw = {k: v for k, v in kw.items() if k not in ("max_new_tokens", "eos_token_id")}
        ref = models[0].generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            got = dec.generate(ids, mask, weights=[1.0, 0.0], **kw)
        assert torch.equal(got.sequences, ref), name
        assert not torch.equal(got.sequences, free), f"{name} changed nothing: the comparison proves nothing"
        results[name] = got
    assert not torch.equal(results["min_new_tokens"].sequences, results["eos"].sequences)
    stopped = results["stopping_criteria"]
    assert stopped.finished[2] and not stopped.stopped_at_eos[2]
    assert stopped.generated_ids(2)[-1] == int(free[2, t + 3])  # the stop token is kept, unlike an EOS


def _reference(models, ids, mask, w, steps, processors):
    """Full recompute each step: z = Σ_i w_i · logits_i (float32), z = processors(seq, z), argmax."""
    seq, m = ids.clone(), mask.clone()
    with torch.no_grad():
        for _ in range(steps):
            pos = (m.cumsum(-1) - 1).clamp(min=0)
            logits = torch.stack([p(input_ids=seq, attention_mask=m, position_ids=pos).logits[:, -1] for p in models])
            z = processors(seq, mod_logits(logits, w, backend="ref"))
            seq = torch.cat([seq, z.argmax(-1)[:, None]], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    return seq


def test_processors_see_the_mixed_logits(tokenizer, models, batch):
    ids, mask = batch
    w = torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.8, 0.2]])
    procs = lambda: LogitsProcessorList([BoostLastToken(), NoRepeatNGramLogitsProcessor(2)])  # noqa: E731
    dec = MODDecoder(models, tokenizer)
    with pytest.warns(RuntimeWarning, match="logits_processor"):
        got = dec.generate(ids, mask, weights=w, max_new_tokens=NEW, eos_token_id=[], logits_processor=procs())
    assert torch.equal(got.sequences, _reference(models, ids, mask, w, NEW, procs()))
    plain = dec.generate(ids, mask, weights=w, max_new_tokens=NEW, eos_token_id=[])
    assert not torch.equal(got.sequences, plain.sequences)
    # the log-probs score the unprocessed policies: equal to re-scoring the emitted tokens
    assert torch.allclose(got.logprobs, _score(models, got.sequences, mask), atol=1e-4)


def _score(models, seq, mask):
    t = mask.shape[1]
    m = torch.cat([mask, torch.ones(seq.shape[0], seq.shape[1] - t, dtype=mask.dtype)], 1)
    pos = (m.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = []
        for p in models:
            lp = torch.log_softmax(p(input_ids=seq, attention_mask=m, position_ids=pos).logits.float(), -1)
            out.append(lp[:, t - 1:-1].gather(-1, seq[:, t:, None])[..., 0].sum(1))
    return torch.stack(out, 1)


def test_output_scores_equal_transformers_and_return_dict_false(tokenizer, models, batch):
    ids, mask = batch
    kw = dict(max_new_tokens=5, eos_token_id=[], pad_token_id=tokenizer.pad_token_id, repetition_penalty=0.5)
    ref = models[0].generate(input_ids=ids, attention_mask=mask, do_sample=False, output_scores=True,
                             output_logits=True, return_dict_in_generate=True, **kw)
    dec = MODDecoder(models, tokenizer)
    with pytest.warns(RuntimeWarning):
        got = dec.generate(ids, mask, weights=[1.0, 0.0], output_scores=True, output_logits=True, **kw)
    assert len(got.scores) == len(ref.scores) == 5 and len(got.logits) == 5
    for a, b in zip(got.scores, ref.scores):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(got.logits, ref.logits):
        torch.testing.assert_close(a, b.float(), rtol=1e-5, atol=1e-5)
    seqs = dec.generate(ids, mask, weights=[1.0, 0.0], return_dict_in_generate=False, **kw)
    assert isinstance(seqs, torch.Tensor) and torch.equal(seqs, ref.sequences)


def test_generation_config_precedence(tokenizer, batch):
    """kwargs > generation_config > models[0].generation_config > decoder defaults, seen in the output length."""
    ids, mask = batch
    models = _policies(tokenizer)
    dec = MODDecoder(models, tokenizer)
    gen = lambda **kw: dec.generate(ids, mask, weights=[0.5, 0.5], eos_token_id=[], **kw).sequences.shape[1] - ids.shape[1]  # noqa: E731
    with pytest.raises(ValueError, match="max_new_tokens is not set"):
        gen()
    models[0].generation_config.max_new_tokens = 3
    assert gen() == 3
    assert gen(generation_config=GenerationConfig(max_new_tokens=5)) == 5
    assert gen(generation_config=GenerationConfig(max_new_tokens=5), max_new_tokens=2) == 2
    assert gen(generation_config=GenerationConfig(max_length=ids.shape[1] + 4)) == 4  # counts the prompt
    with pytest.raises(ValueError, match="max_new_tokens is not set"):
        gen(use_model_defaults=False)
    # sampling settings come from the model's config too (transformers' behaviour)
    models[0].generation_config.do_sample, models[0].generation_config.top_k = True, 5
    a = dec.generate(ids, mask, weights=[0.5, 0.5], seed=1).sequences
    b = dec.generate(ids, mask, weights=[0.5, 0.5], seed=1, do_sample=True, top_k=5, max_new_tokens=3).sequences
    greedy = dec.generate(ids, mask, weights=[0.5, 0.5], do_sample=False).sequences
    assert torch.equal(a, b) and not torch.equal(a, greedy)
    models[0].generation_config.num_beams = 4  # a model default MOD cannot apply: ignored, said once
    with pytest.warns(RuntimeWarning, match="num_beams=4"):
        dec.generate(ids, mask, weights=[0.5, 0.5], do_sample=False)


@pytest.mark.parametrize("cfg,match", [
    (GenerationConfig(num_beams=4), "num_beams=4"),
    (GenerationConfig(max_new_tokens=2, top_k=5, no_repeat_ngram_size=3), "no_repeat_ngram_size=3"),
    ("greedy", "GenerationConfig"),
])
def test_generation_config_field_mod_cannot_apply_raises(tokenizer, models, batch, cfg, match):
    with pytest.raises(ValueError, match=match):
        MODDecoder(models, tokenizer).generate(*batch, weights=[0.5, 0.5], max_new_tokens=2, generation_config=cfg)


@pytest.mark.parametrize("kw,match", [
    (dict(num_return_sequences=2), "identical rows"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(stop_strings=[""]), "stop_strings"),
    (dict(eos_token_id=torch.tensor([[2]])), "0-d or 1-d"),
    (dict(eos_token_id=2.0), "eos_token_id"),
    (dict(return_dict_in_generate="yes"), "True or False"),
])
def test_option_errors(tokenizer, models, batch, kw, match):
    with pytest.raises(ValueError, match=match):
        MODDecoder(models, tokenizer).generate(*batch, weights=[0.5, 0.5], max_new_tokens=2, **kw)


def test_stop_strings_need_a_tokenizer(models, batch):
    with pytest.raises(ValueError, match="stop_strings needs a tokenizer"):
        MODDecoder(models).generate(*batch, weights=[0.5, 0.5], max_new_tokens=2, stop_strings="x")


def test_prompt_forms_and_eos_forms(tokenizer, models, batch):
    """A BatchEncoding, a dict, strings, a ragged list of id lists and one [T] row all decode like the padded
    tensors; EOS as int, list, 0-d and 1-d tensors is the same EOS."""
    ids, mask = batch
    dec = MODDecoder(models, tokenizer)
    kw = dict(weights=[0.4, 0.6], max_new_tokens=6)
    want = dec.generate(ids, mask, **kw).sequences
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    assert torch.equal(dec.generate(enc, **kw).sequences, want)
    assert torch.equal(dec.generate(dict(enc), **kw).sequences, want)
    assert torch.equal(dec.generate(**enc, **kw).sequences, want)
    assert torch.equal(dec.generate(PROMPTS, **kw).sequences, want)
    ragged = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert torch.equal(dec.generate(ragged, **kw).sequences, want)
    row = dec.generate(ragged[1], **kw).sequences
    assert torch.equal(row, want[1:2])
    assert torch.equal(dec.generate(PROMPTS[1], **kw).sequences, row)
    eos = int(want[0, ids.shape[1] + 1])
    outs = [dec.generate(ids, mask, eos_token_id=e, **kw).sequences
            for e in (eos, [eos], (eos,), torch.tensor(eos), torch.tensor([eos]))]
    assert all(torch.equal(o, outs[0]) for o in outs) and not torch.equal(outs[0], want)
    with pytest.raises(ValueError, match="not both"):
        dec.generate(enc, mask, **kw)
    with pytest.raises(ValueError, match="token_type_ids"):
        dec.generate({**enc, "token_type_ids": torch.zeros_like(ids)}, **kw)


class Recorder(BaseStreamer):
    def __init__(self):
        self.values, self.ends = [], 0

    def put(self, value):
        self.values.append(value.clone())

    def end(self):
        self.ends += 1


def test_streamer_gets_prompt_then_each_step(tokenizer, models, batch, capsys):
    ids, mask = batch
    dec = MODDecoder(models, tokenizer)
    rec = Recorder()
    with pytest.warns(RuntimeWarning, match="streamer"):
        out = dec.generate(ids, mask, weights=[0.5, 0.5], max_new_tokens=5, eos_token_id=[], streamer=rec)
    assert rec.ends == 1 and torch.equal(rec.values[0], ids)
    assert torch.equal(torch.stack(rec.values[1:], 1), out.generated)
    ref = models[0].generate(input_ids=ids[:1], attention_mask=mask[:1], do_sample=False, max_new_tokens=5,
                             eos_token_id=[], streamer=(r2 := Recorder()))
    assert len(r2.values) == len(rec.values) and torch.equal(r2.values[0], ids[:1])  # transformers' call pattern
    assert ref.shape[1] == out.sequences.shape[1]
    one = dec.generate(PROMPTS[0], weights=[0.5, 0.5], max_new_tokens=5, eos_token_id=[],
                       streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert capsys.readouterr().out.strip() == tokenizer.decode(one.generated[0]).strip()


def test_num_return_sequences_shares_the_prefill(tokenizer, models, batch, monkeypatch):
    ids, mask = batch
    dec = MODDecoder(models, tokenizer)
    widths = []
    real = type(dec.runner).prefill
    monkeypatch.setattr(type(dec.runner), "prefill", lambda self, s_ids, *a: widths.append(s_ids.shape[0]) or real(self, s_ids, *a))
    w = torch.tensor([[[0.2, 0.8], [0.7, 0.3]]] * 3)  # [B, S, N]: 2 weights per prompt
    out = dec.generate(ids, mask, weights=w, do_sample=True, seed=0, num_return_sequences=3, max_new_tokens=8,
                       eos_token_id=[])
    assert out.sequences.shape[0] == 3 * 2 * 3 and widths == [3]  # 18 rows, one prefill per distinct prompt
    prompts = out.sequences[:, : ids.shape[1]]
    assert torch.equal(prompts, ids.repeat_interleave(6, 0))  # row (b·S + s)·n + j
    gen = out.generated
    assert len({tuple(r.tolist()) for r in gen}) > 9  # sampled rows diverge


def test_decoder_leaves_the_callers_modes_and_decodes_in_eval(tokenizer, batch):
    ids, mask = batch
    models = _policies(tokenizer)
    evaluated = [copy.deepcopy(m).eval() for m in models]
    for m in models:
        m.train()
        for layer in m.model.layers:
            layer.self_attn.attention_dropout = 0.5  # would change every output if generate ran in train mode
    dec = MODDecoder(models, tokenizer)
    assert all(mod.training for m in models for mod in m.modules())
    got = dec.generate(ids, mask, weights=[0.5, 0.5], max_new_tokens=6)
    assert all(mod.training for m in models for mod in m.modules())
    want = MODDecoder(evaluated, tokenizer).generate(ids, mask, weights=[0.5, 0.5], max_new_tokens=6)
    assert torch.equal(got.sequences, want.sequences)
    assert not evaluated[0].training


def test_eager_warning_names_the_option_once(tokenizer, models, batch):
    dec = MODDecoder(models, tokenizer)
    kw = dict(weights=[0.5, 0.5], max_new_tokens=3, repetition_penalty=1.2)
    with pytest.warns(RuntimeWarning, match=r"generate\(repetition_penalty\)"):
        dec.generate(*batch, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dec.generate(*batch, **kw)  # said once
        dec.generate(*batch, weights=[0.5, 0.5], max_new_tokens=3)  # no option, no warning


def test_custom_generate_hook_from_the_local_directory(tokenizer, models, batch, tmp_path, monkeypatch):
    """transformers loads <dir>/custom_generate/generate.py (offline: a local directory is copied into its modules
    cache) and returns the sequences, as its own generate does."""
    import transformers.dynamic_module_utils as dmu

    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path))  # keep the copy out of the user's cache
    ids, mask = batch
    kw = dict(max_new_tokens=6, eos_token_id=[], pad_token_id=tokenizer.pad_token_id)
    out = models[0].generate(input_ids=ids, attention_mask=mask, custom_generate=custom_generate_dir(),
                             trust_remote_code=True, policies=[models[1]], weights=[0.3, 0.7], **kw)
    want = MODDecoder(models, tokenizer).generate(ids, mask, weights=[0.3, 0.7], **kw).sequences
    assert isinstance(out, torch.Tensor) and torch.equal(out, want)
    alone = models[0].generate(input_ids=ids, attention_mask=mask, custom_generate=custom_generate_dir(),
                               trust_remote_code=True, **kw)
    assert torch.equal(alone, models[0].generate(input_ids=ids, attention_mask=mask, do_sample=False, **kw))
    with pytest.raises(ValueError, match="weights"):
        models[0].generate(input_ids=ids, custom_generate=custom_generate_dir(), trust_remote_code=True,
                           policies=[models[1]], **kw)
