"""MODDecoder: batched multi-objective decoding over several Hugging Face policies.

At each step, for every row b with weights w_b on the simplex (SIPO.md §2, reverse-KL MOD):

    tok_b ~ softmax( Σ_i w_bi · logits_i[b] / τ )   restricted by top-k then top-p   (greedy: argmax)
    logprobs[b, i] += log_softmax(logits_i[b])[tok_b]                                (τ = 1, unfiltered)

How it is fast:
  * one forward per policy per step over the whole batch (separate models), or one forward over all N·B
    rows for LoRA adapters of one base (:mod:`sipo_fast.decoding.lora`), instead of batch 1 with one
    forward per policy per token;
  * rows are grouped into *states*: rows with the same prompt and the same tokens so far (e.g. one prompt
    at every weight in W, before their greedy choices part) share one forward and one KV cache row. A
    state forks when its rows choose different tokens. This is exact: a policy's logits depend only on
    the prefix, never on the weights;
  * rows that reached EOS leave the batch, so they stop costing compute;
  * the mix, sampling and per-policy log-probs are one fused op (:func:`sipo_fast.ops.mod_sample`);
  * ``compute_dtype=torch.bfloat16`` runs the forwards in bfloat16 (on CPUs with AMX/AVX512-BF16 the
    matmuls run ~2.7× faster than float32); the mix and log-probs stay float32.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Sequence

import torch

from sipo_fast.decoding.hooks import StepHooks, warn_eager
from sipo_fast.decoding.inputs import (OPTION_NAMES, batch_seed, check_options, eos_id_list, expand_weight_sets,
                                       resolve_options, split_prompts)
from sipo_fast.decoding.output import MODOutput, MODTextOutput
from sipo_fast.decoding.runners import LoraAdapters, SeparateModels
from sipo_fast.decoding.vocab import local_tokenizer, output_vocab_size, check_vocabularies
from sipo_fast.ops.mod import check_weights, mod_sample_unchecked


# ------------------------------------------------------------------------------------------- decoder
class MODDecoder:
    """Multi-objective decoding (reverse-KL MOD) over N policies that share a tokenizer.

    Args:
        policies: a list of N Hugging Face causal LMs, or one ``peft.PeftModel`` carrying N LoRA adapters.
        tokenizer: the shared tokenizer (needed for text prompts and default EOS/padding), or a list with
            one tokenizer per policy, which are checked to match. Models loaded from a local directory that
            holds a tokenizer are checked against it too.
        compute_dtype: None runs the models in their own dtype (float32 models then match a float32
            step-by-step reference exactly); ``torch.bfloat16`` is the reduced-precision fast path
            (models of another dtype are copied, the originals are left untouched).
        adapter_names: for a PEFT model, which adapters are the N policies, in objective order
            (default: all adapters, in insertion order).
        dedupe: share one forward and cache row among rows with the same prompt and prefix (exact).
        lora_impl: "bmm" (batched LoRA), "peft" (PEFT's mixed-adapter batches) or "auto" (bmm; peft under the
            process-wide "ref" backend default, :mod:`sipo_fast.ops.backend`).
        sample_backend: backend of :func:`sipo_fast.ops.mod_sample` (None/"auto": the process default, else by
            device; "ref" under the "ref" default).
        kv_cache: "static" (the captured decode step: a lean forward over a preallocated cache, fixed padded
            batch, replayed as a CUDA graph on GPU; Llama, Mistral, Qwen2), "paged" (the shared paged KV cache
            of :mod:`sipo_fast.kv`: each distinct prompt's KV stored once per policy and shared by every row
            that continues it, forks without copies), "dynamic" (transformers' DynamicCache, rows copied on
            fork) or "auto" (static on CUDA, paged on CPU, where they apply; dynamic under the "ref" default:
            :mod:`sipo_fast.decoding.paths`).
        kv_block_size: tokens per KV block of the paged cache.
        cuda_graph: on the static path on CUDA, record each step once and replay it (False: run it eagerly).
        check_every: on the static path, look for all-finished rows every this many steps (default 16 when
            replaying a CUDA graph, else every step).
    """

    def __init__(self, policies, tokenizer=None, *, compute_dtype: torch.dtype | None = None,
                 adapter_names: Sequence[str] | None = None, dedupe: bool = True, lora_impl: str = "auto",
                 sample_backend: str | None = None, kv_cache: str = "auto", kv_block_size: int = 16,
                 cuda_graph: bool = True, check_every: int | None = None):
        tokenizers = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else None
        self.tokenizer = tokenizers[0] if tokenizers else tokenizer
        if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point):
            raise ValueError(f"compute_dtype must be None or a floating torch.dtype such as torch.bfloat16, got {compute_dtype!r}")
        from sipo_fast.decoding.paths import resolve_kv_cache, resolve_lora_impl, resolve_sampler

        lora_impl = resolve_lora_impl(lora_impl)  # these read the process-wide backend default once, here
        self.dedupe = bool(dedupe)
        self.sample_backend = resolve_sampler(sample_backend)
        models = self._policy_models(policies, adapter_names)
        self._check_vocab(models, tokenizers)
        cast = lambda m: m if compute_dtype in (None, m.dtype) else copy.deepcopy(m).to(compute_dtype)  # noqa: E731
        device = next(models[0].parameters()).device
        self._requested_kv = kv_cache
        self._static_ran = False  # a captured step that ran once is trusted: later failures raise
        self.kv_cache = resolve_kv_cache(kv_cache, models[0], device)
        if self.adapter_names is not None:
            from sipo_fast.decoding.lora import check_adapters

            self.adapter_names = check_adapters(policies, adapter_names)
            self.models = [cast(policies)]
        else:
            self.models = [cast(m) for m in models]  # left in the caller's mode: generate() switches to eval
        self._runner_options = dict(lora_impl=lora_impl, block_size=kv_block_size, cuda_graph=cuda_graph,
                                    check_every=check_every)
        self.runner = self._build_runner(self.kv_cache)
        self.num_policies = self.runner.num_policies
        self.dtype = self.models[0].dtype
        self.device = next(self.models[0].parameters()).device
        self.vocab_size = output_vocab_size(self.models[0] if self.adapter_names is None
                                             else self.models[0].get_base_model())

    # -- construction helpers
    def _build_runner(self, path: str):
        """The runner of one decode path (see :mod:`sipo_fast.decoding.paths`) over ``self.models``."""
        from sipo_fast.decoding.paged import PagedLoraAdapters, PagedSeparateModels

        o, peft = self._runner_options, self.adapter_names is not None
        if path == "static":
            from sipo_fast.decoding.capture import CapturedDecoding
            from sipo_fast.decoding.static import LeanPolicies

            lean = (LeanPolicies(peft_model=self.models[0], adapter_names=self.adapter_names) if peft
                    else LeanPolicies(models=self.models))
            return CapturedDecoding(lean, capture=o["cuda_graph"], check_every=o["check_every"],
                                    sample_backend=self.sample_backend)
        if peft:
            return (PagedLoraAdapters(self.models[0], self.adapter_names, o["lora_impl"], block_size=o["block_size"])
                    if path == "paged" else LoraAdapters(self.models[0], self.adapter_names, o["lora_impl"]))
        return PagedSeparateModels(self.models, block_size=o["block_size"]) if path == "paged" else SeparateModels(self.models)

    def _static_failed(self, exc: Exception) -> bool:
        """With kv_cache="auto", a captured step that fails on its first call (an untested GPU, driver or
        library) gives way to the next path, once, with a warning; True if it did."""
        if self._requested_kv != "auto" or self._static_ran:
            return False
        import warnings

        from sipo_fast.decoding.paths import fallback_after

        base = self.models[0].get_base_model() if self.adapter_names is not None else self.models[0]
        nxt = fallback_after("static", base, self.device)
        warnings.warn(f"MODDecoder(kv_cache='auto'): the captured decode step failed on its first call "
                      f"({type(exc).__name__}: {exc}); using the {nxt!r} path instead", RuntimeWarning, stacklevel=4)
        self.kv_cache, self.runner = nxt, self._build_runner(nxt)
        return True

    def _policy_models(self, policies, adapter_names):
        try:
            from peft import PeftModel
        except ImportError:  # peft is a dependency, but keep plain-model use working without it
            PeftModel = ()
        if PeftModel and isinstance(policies, PeftModel):
            self.adapter_names = list(adapter_names) if adapter_names is not None else list(policies.peft_config)
            return [policies.get_base_model()]
        self.adapter_names = None
        if adapter_names is not None:
            raise ValueError("adapter_names applies to one PEFT model with several adapters; with a list of "
                             "models, each model is one policy")
        if not isinstance(policies, (list, tuple)) or len(policies) == 0:
            raise ValueError("policies must be a non-empty list of causal LMs or one PeftModel with N LoRA adapters")
        for i, m in enumerate(policies):
            if not (isinstance(m, torch.nn.Module) and hasattr(m, "get_output_embeddings")):
                raise ValueError(f"policy {i} is a {type(m).__name__}, not a Hugging Face causal LM")
        devices = {next(m.parameters()).device for m in policies}
        if len(devices) > 1:
            raise ValueError(f"all policies must be on one device, got {sorted(map(str, devices))}")
        return list(policies)

    def _check_vocab(self, models, tokenizers) -> None:
        sizes = [output_vocab_size(m) for m in models]
        if len(set(sizes)) > 1:
            raise ValueError(f"policies have different vocabulary sizes {sizes}; MOD needs one shared vocabulary")
        if tokenizers is not None and len(tokenizers) not in (1, len(models)):
            raise ValueError(f"pass one tokenizer, or one per policy ({len(models)}), not {len(tokenizers)}")
        toks = list(tokenizers or [])
        found = [(f"policy {i}", t) for i, t in enumerate(toks)]
        if not toks:
            local = [(local_tokenizer(m), i) for i, m in enumerate(models)] if self.adapter_names is None else []
            found = [(f"policy {i}", t) for t, i in local if t is not None]
            if self.tokenizer is not None:
                found = [("the tokenizer", self.tokenizer)] + found
        if len(found) > 1:
            check_vocabularies([t for _, t in found], [n for n, _ in found])
        for name, tok in found:
            if len(tok) > sizes[0]:
                raise ValueError(f"{name} has {len(tok)} tokens but the policies' logits have only {sizes[0]}")

    # -- public API
    def generate(self, input_ids=None, attention_mask=None, *, weights, generation_config=None,
                 logits_processor=None, stopping_criteria=None, streamer=None, tokenizer=None,
                 max_new_tokens: int | None = None, max_length: int | None = None, min_new_tokens: int | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_k: int | None = None,
                 top_p: float | None = None, repetition_penalty: float | None = None,
                 num_return_sequences: int | None = None, eos_token_id=None, pad_token_id: int | None = None,
                 stop_strings=None, return_dict_in_generate: bool | None = None, output_scores: bool | None = None,
                 output_logits: bool | None = None, seed: int | None = None, template: str = "none",
                 use_model_defaults: bool = True):
        """Decode a batch with MOD, in the terms of transformers' ``generate``. See the module docstring for the step.

        Args:
            input_ids: the prompts: [B, T] left-padded ids (a tensor or nested lists; a ragged list of id lists is
                left-padded here), a ``BatchEncoding``/dict with ``input_ids`` and ``attention_mask``, or a string
                or list of strings (needs the tokenizer; ``template="chat"`` applies its chat template, "none" uses
                the text as is, or a format string with ``{prompt}``; no other special tokens are added, the
                convention training shares).
            attention_mask: [B, T], 1 on tokens, 0 on left padding (default: all ones).
            weights: [N] for every row, [B, N] per row, or [B, S, N]: S weight vectors per prompt, decoded as
                B·S rows (row b·S + s) that share their prompt; each vector ≥ 0, summing to 1 (within 1e-6).
            generation_config: a ``transformers.GenerationConfig`` (or a dict of its fields). Each option is taken
                from, in order: the keyword argument, ``generation_config``, ``models[0].generation_config``
                (unless ``use_model_defaults=False``), the decoder's defaults (:mod:`sipo_fast.decoding.inputs`).
                A field MOD cannot apply (``num_beams=4``, say) raises.
            max_new_tokens, max_length: at most this many new tokens per row (``max_length`` counts the prompt
                width, as in transformers); a row stops after its EOS.
            do_sample, temperature, top_k, top_p: greedy by default; otherwise softmax(mix/τ) restricted by
                top-k then top-p. ``seed`` makes sampling reproducible.
            repetition_penalty, min_new_tokens, logits_processor: transformers' processors, applied to the
                **mixed** logits Σ_i w_i · logits_i before the choice (:mod:`sipo_fast.decoding.hooks`); the
                per-policy ``logprobs`` stay those of the unprocessed policies.
            stopping_criteria, stop_strings: end a row when a criterion says so (``stop_strings`` needs the
                tokenizer: the decoder's, or ``tokenizer=``).
            streamer: a transformers ``BaseStreamer`` (``TextStreamer``: batch 1): ``put`` gets the prompt ids,
                then each step's [B] tokens (padding for finished rows), and ``end`` at the end.
            num_return_sequences: rows per prompt and weight vector (row r·n + j), sharing the prompt's prefill.
            eos_token_id: an int, a list, or a 0-d/1-d tensor of ids (default: the tokenizer's and the model's
                generation config). pad_token_id: fills each row after its end (default: tokenizer pad, then EOS).
            return_dict_in_generate: True (default here, unlike transformers) returns :class:`MODOutput`; False
                returns only ``sequences``. output_scores / output_logits fill its ``scores`` / ``logits``.

        Options that need Python between steps (processors, stopping criteria, a streamer, the scores) run the
        eager decode loop, not the fused mix-and-sample step or the captured step; one warning names them.

        Returns:
            :class:`MODOutput` with ``sequences`` [B·S·n, T+L] and ``logprobs`` [B·S·n, N]; or ``sequences``.
        """
        explicit = dict(max_new_tokens=max_new_tokens, max_length=max_length, min_new_tokens=min_new_tokens,
                        do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                        repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences,
                        eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_strings=stop_strings,
                        return_dict_in_generate=return_dict_in_generate, output_scores=output_scores,
                        output_logits=output_logits)
        assert set(explicit) == set(OPTION_NAMES)
        opts = resolve_options(explicit, generation_config, getattr(self.models[0], "generation_config", None),
                               use_model_defaults=use_model_defaults)
        eos = self._eos_ids(opts.eos_token_id)
        pad = self._pad_id(opts.pad_token_id, eos)
        texts, ids, mask = split_prompts(input_ids, attention_mask)
        if texts is not None:
            ids, mask = self._encode(texts, template, pad)
        elif mask is None and isinstance(ids, list):
            from sipo_fast.data.formatting import left_pad

            ids, mask = left_pad(ids, pad)
        ids, mask = self._check_batch(ids, mask)
        check_options(opts, seed, ids.shape[1])
        ids, mask, weights = expand_weight_sets(ids, mask, weights)  # [B, S, N] weights
        w = check_weights(weights, self.num_policies, ids.shape[0]).to(self.device)
        if opts.num_return_sequences > 1:  # identical rows: dedupe shares their prefill
            n = opts.num_return_sequences
            ids, mask, w = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0), w.repeat_interleave(n, 0)
        hooks, needs = StepHooks.build(opts, ids, mask, eos, logits_processor=logits_processor,
                                       stopping_criteria=stopping_criteria, streamer=streamer,
                                       tokenizer=tokenizer if tokenizer is not None else self.tokenizer,
                                       sample_backend=self.sample_backend)
        if needs:
            warn_eager(needs, self.kv_cache)
        gen = torch.Generator().manual_seed(seed) if (seed is not None and opts.do_sample) else None
        sampling = dict(do_sample=opts.do_sample, temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                        generator=gen)
        with self._eval_mode(), torch.inference_mode():
            out = self._decode(ids, mask, w, opts.max_new_tokens, sampling, eos, pad, hooks)
        return out if opts.return_dict_in_generate else out.sequences

    def generate_text(self, prompts: Sequence[str], *, weights, max_new_tokens: int, template: str = "chat",
                      batch_size: int = 32, progress: bool = True, shard: tuple[int, int] | None = None,
                      **sampling_kwargs) -> list[MODTextOutput]:
        """Decode a list of prompt strings; returns one :class:`MODTextOutput` per prompt, in input order.

        Prompts are rendered with :func:`sipo_fast.data.formatting.encode_prompts` (``template``: "chat",
        "none" or a format string), sorted by length and batched ``batch_size`` at a time so that
        batches carry little padding. ``weights`` is [N] or one row per prompt [len(prompts), N].
        ``sampling_kwargs`` go to :meth:`generate` (do_sample, temperature, top_k, top_p, seed, ...).
        ``shard=(rank, world)`` decodes only the batches ``k`` with ``k % world == rank`` (the others' entries
        are None): several processes together decode exactly the batches, and seeds, of one process
        (``sipo_fast.distributed.generate_text`` gathers them).
        """
        from tqdm.auto import tqdm

        from sipo_fast.data.formatting import encode_prompts, left_pad

        if self.tokenizer is None:
            raise ValueError("generate_text needs a tokenizer: MODDecoder(policies, tokenizer)")
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not prompts:
            return []
        w = check_weights(weights, self.num_policies, len(prompts))  # [P, N]
        opts = resolve_options({**{k: sampling_kwargs.get(k) for k in OPTION_NAMES}, "max_new_tokens": max_new_tokens},
                               sampling_kwargs.get("generation_config"),
                               getattr(self.models[0], "generation_config", None),
                               use_model_defaults=sampling_kwargs.get("use_model_defaults", True))
        check_options(opts, sampling_kwargs.get("seed"), 1)  # before any work; generate() checks each batch again
        if opts.num_return_sequences != 1 or not opts.return_dict_in_generate:
            raise ValueError("generate_text returns one text per prompt: use generate() for num_return_sequences or "
                             "return_dict_in_generate=False")
        encoded = encode_prompts(self.tokenizer, list(prompts), template)
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # similar lengths batch together
        pad = self._pad_id(opts.pad_token_id, self._eos_ids(opts.eos_token_id))
        results: list[MODTextOutput | None] = [None] * len(prompts)
        if shard is not None and not (len(shard) == 2 and 0 <= shard[0] < shard[1]):
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
        starts = list(enumerate(range(0, len(order), batch_size)))
        if shard is not None:
            starts = starts[shard[0]::shard[1]]
        seed = sampling_kwargs.pop("seed", None)
        for k, start in tqdm(starts, desc="MOD decoding", unit="batch", disable=not progress):
            idx = order[start:start + batch_size]
            ids, mask = left_pad([encoded[i] for i in idx], pad)
            # each batch its own stream, so equal prompts in different batches draw independently
            out = self.generate(ids, mask, weights=w[idx], max_new_tokens=max_new_tokens,
                                seed=batch_seed(seed, k), **sampling_kwargs)
            for r, i in enumerate(idx):
                toks = out.generated_ids(r)
                results[i] = MODTextOutput(prompt=prompts[i], text=self.tokenizer.decode(toks), token_ids=toks,
                                           logprobs=out.logprobs[r].tolist(), finished=bool(out.finished[r]),
                                           weights=w[i].tolist())
        return results  # type: ignore[return-value]  (None only outside this shard)

    # -- internals
    def _encode(self, prompts: list[str], template: str, pad: int):
        from sipo_fast.data.formatting import encode_prompts, left_pad

        if self.tokenizer is None:
            raise ValueError("text prompts need a tokenizer: MODDecoder(policies, tokenizer)")
        return left_pad(encode_prompts(self.tokenizer, prompts, template), pad)

    @contextlib.contextmanager
    def _eval_mode(self):
        """Eval mode (no dropout) for one call; every module gets back the mode it had, so a decoder built over a
        model being trained leaves it training."""
        modes = [(mod, mod.training) for m in self.models for mod in m.modules()]
        for m in self.models:
            m.eval()
        try:
            yield
        finally:
            for mod, training in modes:
                mod.training = training

    def _eager_runner(self):
        """The runner for calls with per-step hooks: the decoder's own, or on the captured path the next path
        ``"auto"`` would take (built once)."""
        if self.kv_cache != "static":
            return self.runner
        if getattr(self, "_hooks_runner", None) is None:
            from sipo_fast.decoding.paths import fallback_after

            base = self.models[0].get_base_model() if self.adapter_names is not None else self.models[0]
            self._hooks_runner = self._build_runner(fallback_after("static", base, self.device))
        return self._hooks_runner

    def _check_batch(self, input_ids, attention_mask):
        ids = torch.as_tensor(input_ids)
        if ids.dim() != 2 or ids.shape[0] == 0 or ids.shape[1] == 0 or ids.is_floating_point():
            raise ValueError(f"input_ids must be a non-empty integer tensor [B, T], got shape {tuple(ids.shape)}")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"input_ids must lie in [0, {self.vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]")
        mask = torch.ones_like(ids) if attention_mask is None else torch.as_tensor(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}")
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("attention_mask must hold only 0 and 1")
        mask = mask.long()
        if (mask.sum(-1) == 0).any():
            raise ValueError(f"row {int((mask.sum(-1) == 0).nonzero()[0])} of attention_mask is all zeros: every prompt needs a token")
        if (mask[:, 1:] < mask[:, :-1]).any():
            row = int((mask[:, 1:] < mask[:, :-1]).any(1).nonzero()[0])
            raise ValueError(f"row {row} is not left-padded (a 0 follows a 1 in attention_mask); pad on the left "
                             "(tokenizer.padding_side = 'left') so every prompt ends at the last column")
        return ids.long().to(self.device), mask.to(self.device)

    def _eos_ids(self, eos_token_id) -> list[int]:
        if eos_token_id is not None:
            return eos_id_list(eos_token_id, self.vocab_size)
        ids = []
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.append(int(self.tokenizer.eos_token_id))
        cfg = getattr(self.models[0], "generation_config", None)
        cfg_eos = getattr(cfg, "eos_token_id", None)
        for i in ([cfg_eos] if isinstance(cfg_eos, int) else list(cfg_eos or [])):
            if i not in ids:
                ids.append(int(i))
        return ids

    def _pad_id(self, pad_token_id, eos: list[int]) -> int:
        if pad_token_id is not None:
            if isinstance(pad_token_id, torch.Tensor) and pad_token_id.numel() == 1 and not pad_token_id.is_floating_point():
                pad_token_id = int(pad_token_id)
            if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool) or pad_token_id < 0:
                raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
            return pad_token_id
        if self.tokenizer is not None and self.tokenizer.pad_token_id is not None:
            return int(self.tokenizer.pad_token_id)
        return eos[0] if eos else 0

    def _decode(self, ids, mask, w, max_new_tokens, sampling, eos, pad, hooks: StepHooks | None = None) -> MODOutput:
        b, t = ids.shape
        dev = ids.device
        # rows -> states: identical (prompt, mask) rows share a state when deduplicating
        if self.dedupe:
            key = torch.cat([ids * mask, mask], dim=1)  # [B, 2T]
            uniq, row_state = torch.unique(key, dim=0, return_inverse=True)
            s_ids, s_mask = uniq[:, :t], uniq[:, t:]
        else:
            row_state = torch.arange(b, device=dev)
            s_ids, s_mask = ids, mask
        if self.kv_cache == "static" and hooks is None:
            try:
                out, lp_sum, num_gen, finished = self.runner.run(s_ids, s_mask, row_state, w, max_new_tokens,
                                                                 sampling, sampling.get("generator"), eos, pad)
            except Exception as exc:
                if not self._static_failed(exc):
                    raise
                return self._decode(ids, mask, w, max_new_tokens, sampling, eos, pad, hooks)
            self._static_ran = True
            return MODOutput(sequences=torch.cat([ids, out], dim=1), logprobs=lp_sum, num_generated=num_gen,
                             finished=finished, prompt_length=t)
        runner = self.runner if hooks is None else self._eager_runner()
        reserve = getattr(runner, "reserve", None)  # the paged runner sizes its pools
        if reserve is not None:
            reserve(b, max_new_tokens)
        logits = runner.prefill(s_ids, s_mask, max_new_tokens)  # [N, U, V]
        out = torch.full((b, max_new_tokens), pad, dtype=torch.long, device=dev)
        lp_sum = torch.zeros((b, self.num_policies), dtype=torch.float32, device=dev)
        num_gen = torch.zeros(b, dtype=torch.long, device=dev)
        finished = torch.zeros(b, dtype=torch.bool, device=dev)
        at_eos = torch.zeros(b, dtype=torch.bool, device=dev)
        eos_t = torch.tensor(eos, dtype=torch.long, device=dev)
        active = torch.arange(b, device=dev)  # rows still decoding
        if hooks is not None:
            hooks.start()
        for step in range(max_new_tokens):
            states = row_state[active]
            num_states = logits.shape[1]
            row_logits = logits if torch.equal(states, torch.arange(num_states, device=dev)) else logits.index_select(1, states)
            if hooks is None:
                tok, lp = mod_sample_unchecked(row_logits, w[active], backend=self.sample_backend, **sampling)
            else:  # processors on the mixed logits, then the choice (hooks.py)
                tok, lp = hooks.choose(row_logits, w[active], active, out, step, sampling)
            out[active, step] = tok
            lp_sum[active] += lp
            num_gen[active] += 1
            done = torch.isin(tok, eos_t)
            at_eos[active[done]] = True
            if hooks is not None:
                stop = hooks.stopped(out, step, active)
                done = done if stop is None else done | stop
                hooks.put(out, step)
            finished[active[done]] = True
            keep = ~done
            active, tok, states = active[keep], tok[keep], states[keep]
            if active.numel() == 0 or step == max_new_tokens - 1:
                break
            # next states: one per distinct (state, token); sorted keys keep parents in order, so the
            # caches are touched only when a state forks or loses all its rows
            key = states * self.vocab_size + tok
            uniq, inverse = torch.unique(key, return_inverse=True)
            parent = uniq // self.vocab_size
            if parent.numel() != num_states or not torch.equal(parent, torch.arange(num_states, device=dev)):
                runner.select(parent)
            row_state = row_state.clone()
            row_state[active] = inverse
            logits = runner.step(uniq % self.vocab_size)
        length = int(num_gen.max())
        extra = {}
        if hooks is not None:
            hooks.end()
            extra = dict(scores=tuple(hooks.scores) if hooks.keep_scores else None,
                         logits=tuple(hooks.logits) if hooks.keep_logits else None)
        return MODOutput(sequences=torch.cat([ids, out[:, :length]], dim=1), logprobs=lp_sum, num_generated=num_gen,
                         finished=finished, prompt_length=t, stopped_at_eos=at_eos, **extra)
