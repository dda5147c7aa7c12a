"""transformers integration: stock HF Llama / Mistral / Qwen2 models run on the shared paged KV cache.

Two hooks of transformers 5 do it, with no change to the model code:
  * :class:`PagedCache`, a ``transformers.Cache`` whose layers write each forward's new K/V into the policy's
    pages (``Cache.update``). The same cache object also travels to the attention function as the model
    keyword ``sipo_paged_cache`` (transformers passes unknown forward kwargs down to the attention
    interface), where ``module.layer_idx`` picks the layer's pages. (An earlier design handed the pages over
    through ``cache.update(..., kwargs=...)``, which transformers 5.17 does not pass.)
  * the attention function ``"sipo_paged"``, registered in ``ALL_ATTENTION_FUNCTIONS``. Decode (one token
    per row) calls :func:`sipo_fast.ops.paged_attention`, which reads the pages in place (C++ on CPU,
    flash-attn/Triton on GPU). Prefill (several tokens per row) gathers the rows' pages and runs SDPA with a
    per-row causal mask built from the step's positions. It is not registered as a mask function, so
    transformers builds no mask of its own for it (the pages, not a 2-D mask, say what each row holds).

Use::

    kv = SharedPagedKV.for_models([model], num_blocks=256, block_size=16)
    seq_ids, ids, mask = kv.add_prompts(prompts)
    with paged_attention_enabled(model):
        kv.begin_forward(seq_ids, mask)
        logits = forward_paged(model, kv, 0, ids)            # (P, L, V)
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from sipo_fast.kv.pool import PagedKVPool, SharedPagedKV, StepInputs

ATTN_IMPLEMENTATION = "sipo_paged"
_KWARG = "sipo_paged_cache"  # model keyword that carries the PagedCache down to the attention function


@dataclass
class PagedAttentionInputs:
    """What the attention function needs for one layer: that layer's pages and the step's bookkeeping."""

    k_cache: torch.Tensor  # (num_blocks, block_size, Hkv, D)
    v_cache: torch.Tensor
    step: StepInputs
    block_size: int


class PagedLayer(CacheLayerMixin):
    """One decoder layer of one policy's paged cache."""

    is_compileable = False
    is_sliding = False

    def __init__(self, kv: SharedPagedKV, pool: PagedKVPool, layer_idx: int):
        super().__init__()
        self.kv, self.pool, self.layer_idx = kv, pool, layer_idx
        self.is_initialized = True  # the pages exist already; nothing is created lazily
        self.device = pool.kv.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        """Write the real new tokens' K/V ``[B, Hkv, q, D]`` into the pages.
        Returns the inputs unchanged: the ``sipo_paged`` attention function reads the pages, not these."""
        step = self.kv.step
        if step is None:
            raise ValueError("PagedCache used before SharedPagedKV.begin_forward(seq_ids, new_mask); call it once "
                             "per forward step, before the policies' forwards")
        batch, _, q_len, _ = key_states.shape
        if (batch, q_len) != tuple(step.new_mask.shape):
            raise ValueError(f"the forward's input is [B={batch}, q={q_len}] but begin_forward was given a mask of "
                             f"shape {tuple(step.new_mask.shape)}; pass the same rows and positions")
        mask = step.new_mask
        # (B, Hkv, q, D) -> (B, q, Hkv, D) -> (T, Hkv, D): the real tokens in row-major order, like step.slots.
        self.pool.write(self.layer_idx, step.slots, key_states.transpose(1, 2)[mask],
                        value_states.transpose(1, 2)[mask])
        return key_states, value_states

    def attention_inputs(self) -> PagedAttentionInputs:
        """What the attention function needs to read this layer's pages for the current step."""
        return PagedAttentionInputs(self.pool.keys(self.layer_idx), self.pool.values(self.layer_idx), self.kv.step,
                                    self.kv.block_size)

    def get_seq_length(self) -> int:
        step = self.kv.step
        return int(step.past_lens.max()) if step is not None and step.past_lens.numel() else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        raise NotImplementedError("a paged cache is reset by freeing its sequences (SharedPagedKV.free)")


class PagedCache(Cache):
    """A ``transformers.Cache`` view of one policy's pool inside a :class:`SharedPagedKV`; ``policy=None``
    views all policies' pools at once (a :meth:`SharedPagedKV.stacked` cache, N·U policy-major rows)."""

    def __init__(self, kv: SharedPagedKV, policy: int | None):
        if policy is None:
            if kv.flat_pool is None:
                raise ValueError("policy=None (all policies in one forward) needs SharedPagedKV.stacked(...)")
            pool = kv.flat_pool
        elif isinstance(policy, int) and 0 <= policy < len(kv.pools):
            pool = kv.pools[policy]
        else:
            raise ValueError(f"policy {policy!r} is out of range: the shared cache has {len(kv.pools)} pools")
        super().__init__(layers=[PagedLayer(kv, pool, i) for i in range(pool.geometry[0])])
        self.kv, self.policy = kv, policy


def _prefill_attention(query, paged: PagedAttentionInputs, scaling, sliding_window):
    """Several query tokens per row: gather each row's pages [0, L_max) and run SDPA with a per-row mask.
    Query i of row b sits at position p = position_ids[b, i] and sees keys j <= p (j >= p - w + 1 with a
    window w); padding queries see key 0 only, so no softmax row is empty (their outputs are discarded)."""
    step, block = paged.step, paged.block_size
    batch, heads, q_len, head_dim = query.shape
    max_len = max(int(step.context_lens.max()), 1)
    t = torch.arange(max_len, device=query.device)
    pages = step.block_tables.long()[:, (t // block).clamp_max(step.block_tables.shape[1] - 1)]  # (B, L)
    slots = pages * block + t % block
    n_blocks, _, kv_heads, _ = paged.k_cache.shape
    k = paged.k_cache.reshape(n_blocks * block, kv_heads, head_dim)[slots].transpose(1, 2)  # (B, Hkv, L, D)
    v = paged.v_cache.reshape(n_blocks * block, kv_heads, head_dim)[slots].transpose(1, 2)
    qpos = step.position_ids[:, :, None]  # (B, q, 1)
    allowed = (t[None, None, :] <= qpos) & (t[None, None, :] < step.context_lens[:, None, None].long())
    if sliding_window is not None:
        allowed &= t[None, None, :] > qpos - sliding_window
    allowed |= ~step.new_mask[:, :, None] & (t == 0)[None, None, :]
    out = F.scaled_dot_product_attention(query, k.to(query.dtype), v.to(query.dtype), attn_mask=allowed[:, None],
                                         scale=scaling, enable_gqa=kv_heads != heads)  # (B, H, q, D)
    return out.transpose(1, 2)  # (B, q, H, D)


def sipo_paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                                 value: torch.Tensor, attention_mask: torch.Tensor | None, dropout: float = 0.0,
                                 scaling: float | None = None, sliding_window: int | None = None, **kwargs):
    """transformers attention function ``"sipo_paged"``: query ``[B, H, q, D]`` -> ``([B, q, H, D], None)``.
    Keys and values come from the pages (``key``/``value`` are this forward's new states, already stored)."""
    cache = kwargs.get(_KWARG)
    paged = cache.layers[module.layer_idx].attention_inputs() if isinstance(cache, PagedCache) else None
    if paged is None:
        raise ValueError("attn_implementation 'sipo_paged' needs a PagedCache passed to the model as "
                         f"{_KWARG}= (forward_paged does it, after SharedPagedKV.begin_forward); use "
                         "paged_attention_enabled(model) only around paged forwards")
    if dropout:
        raise ValueError("the paged attention path is for inference; put the model in eval() mode")
    if query.shape[2] == 1:
        from sipo_fast.ops.attention import paged_attention_unchecked

        # (B, H, 1, D) -> (B, H, D); the kernel reads K/V in place from the block tables, which come from the
        # BlockManager (valid by construction), so the per-call Python checks are skipped.
        out = paged_attention_unchecked(query[:, :, 0], paged.k_cache, paged.v_cache, paged.step.block_tables,
                              paged.step.context_lens, scale=scaling, sliding_window=sliding_window)
        return out[:, None], None  # (B, 1, H, D)
    return _prefill_attention(query, paged, scaling, sliding_window), None


AttentionInterface.register(ATTN_IMPLEMENTATION, sipo_paged_attention_forward)


@contextlib.contextmanager
def paged_attention_enabled(*models):
    """Switch the models' attention to ``"sipo_paged"`` inside the block, restoring it afterwards."""
    configs = [m.config for m in models]
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = ATTN_IMPLEMENTATION
        yield
    finally:
        for c, impl in zip(configs, saved):
            c._attn_implementation = impl


@functools.lru_cache(maxsize=None)
def _cache_kwarg_of(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def cache_kwarg(model) -> str:
    """The keyword this model's forward takes its KV cache by: transformers renamed ``past_key_values`` to
    ``cache`` during the 5.x series (5.17 takes ``past_key_values``, 5.24 ``cache``), and a cache passed under
    the other name never reaches the attention layers. Read from the forward's signature (PEFT: its base)."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _cache_kwarg_of(type(target))


def forward_paged(model, kv: SharedPagedKV, policy: int | None, input_ids: torch.Tensor, *,
                  logits_to_keep: int = 0, **model_kwargs) -> torch.Tensor:
    """One forward of ``model`` (policy ``policy`` of ``kv``; None: every policy of a stacked cache, rows
    policy-major) over the step set by ``kv.begin_forward`` (or ``begin_forward_stacked``); returns logits
    ``[B, q or logits_to_keep, V]``. The model must run with ``paged_attention_enabled``."""
    if kv.step is None or tuple(input_ids.shape) != tuple(kv.step.new_mask.shape):
        raise ValueError("call kv.begin_forward(seq_ids, new_mask) with a mask shaped like input_ids first")
    if model.config._attn_implementation != ATTN_IMPLEMENTATION:
        raise ValueError("run paged forwards inside `with paged_attention_enabled(model):`")
    caches = kv.__dict__.setdefault("_hf_caches", {})  # one PagedCache per policy, reused every step
    if policy not in caches:
        caches[policy] = PagedCache(kv, policy)
    model_kwargs[cache_kwarg(model)] = caches[policy]
    model_kwargs[_KWARG] = caches[policy]
    out = model(input_ids=input_ids, position_ids=kv.step.position_ids, use_cache=True,
                logits_to_keep=logits_to_keep, **model_kwargs)
    return out.logits
