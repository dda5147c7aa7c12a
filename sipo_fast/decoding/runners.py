"""The state-sharing runners over transformers' own forward, and the :class:`Runner` protocol they share.

The decoder's runners live in :mod:`sipo_fast.decoding`: these (``kv_cache="dynamic"``), the paged ones
(:mod:`sipo_fast.decoding.paged`, ``"paged"``) and the captured step (:mod:`sipo_fast.decoding.capture`,
``"static"``, which owns fixed slots and runs a whole generation instead). A state-sharing runner holds U
decoding *states* (a prompt plus the tokens generated so far) and, for each, the KV cache of every policy.
It has three verbs, and nothing else in the decoder touches a cache:

    prefill(input_ids [U, T], attention_mask [U, T], max_new_tokens) -> logits [N, U, V]   per policy
    step(tokens [U])                                 -> logits [N, U, V]   append one token per state
    select(index [U'])                                                     keep / fork / reorder states

``select`` is how the decoder drops finished states and forks a state whose rows (several MOD weights
sharing one prefix) chose different tokens. The caches are transformers' ``DynamicCache`` with
:class:`PreallocatedLayer` layers: each layer's keys/values live in one buffer sized for prompt +
max_new_tokens and every step writes one column in place, where the stock layer re-concatenates the whole
cache each step (a copy of all of it, on every layer, every token). A paged cache (sipo_fast.kv) plugs in
by implementing the three verbs above.

Two runners:
  * :class:`SeparateModels`: N independent causal LMs; one forward per model per step over all U states.
  * :class:`LoraAdapters`: one PEFT model with N LoRA adapters; one forward per step over the N·U rows
    (policy-major: rows [i·U, (i+1)·U) use adapter i), with the adapters applied by
    :mod:`sipo_fast.decoding.lora` so the base weights are read once per step for all policies.
"""
from __future__ import annotations

import functools

from typing import Protocol

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from sipo_fast.kv.hf import cache_kwarg


class Runner(Protocol):
    """What :class:`~sipo_fast.decoding.MODDecoder` asks of a state-sharing runner (dynamic and paged caches).
    A runner may also define ``reserve(max_rows, max_new_tokens)``, called before ``prefill`` to size its pools."""

    num_policies: int

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                max_new_tokens: int = 0) -> torch.Tensor:
        """Prompts ``[U, T]`` (left-padded) -> next-token logits ``[N, U, V]``."""

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per state ``[U]`` -> logits ``[N, U, V]``."""

    def select(self, index: torch.Tensor) -> None:
        """New state j continues old state ``index[j]`` (keep, fork, reorder, drop)."""


class PreallocatedLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys/values are views into a buffer with room for ``capacity`` positions.

    ``update`` writes the new positions in place and returns views ``[rows, heads, :length, dim]``; the
    buffer grows (doubling) only if a caller exceeds the capacity it announced.
    """

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity
        self._k = self._v = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.get_seq_length(), key_states.shape[-2]
        if self._k is None or n + t > self._k.shape[-2]:
            cap = max(self.capacity, n + t, 2 * n)
            shape = (*key_states.shape[:2], cap, key_states.shape[-1])  # [rows, kv_heads, capacity, head_dim]
            k, v = key_states.new_empty(shape), value_states.new_empty(shape[:-1] + value_states.shape[-1:])
            if n:
                k[:, :, :n], v[:, :, :n] = self.keys, self.values
            self._k, self._v = k, v
        self._k[:, :, n:n + t] = key_states
        self._v[:, :, n:n + t] = value_states
        self.keys, self.values = self._k[:, :, :n + t], self._v[:, :, :n + t]
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            n = self.get_seq_length()
            self._k, self._v = self._k.index_select(0, indices), self._v.index_select(0, indices)
            self.keys, self.values = self._k[:, :, :n], self._v[:, :, :n]

    def reset(self) -> None:
        self._k = self._v = None
        super().reset()


def new_cache(capacity: int) -> DynamicCache:
    """An empty cache whose layers preallocate ``capacity`` positions."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = functools.partial(PreallocatedLayer, capacity)
    return cache


class _CacheRows:
    """Attention mask and next positions of U left-padded states (shared by both runners)."""

    def start(self, attention_mask: torch.Tensor) -> torch.Tensor:
        self.mask = attention_mask.long()
        self.next_pos = self.mask.sum(-1)  # [U]: position id of the next token
        pos = (self.mask.cumsum(-1) - 1).clamp_(min=0)  # [U, T], padding gets 0 (ignored through the mask)
        return pos

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask and position ids [U, 1] for one more token per state."""
        ones = torch.ones((self.mask.shape[0], 1), dtype=self.mask.dtype, device=self.mask.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        pos = self.next_pos[:, None].clone()
        self.next_pos = self.next_pos + 1
        return self.mask, pos

    def select(self, index: torch.Tensor) -> None:
        self.mask = self.mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)


def _forward(model, input_ids, mask, pos, cache, **kwargs) -> torch.Tensor:
    kwargs[cache_kwarg(model)] = cache
    out = model(input_ids=input_ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1, **kwargs)
    return out.logits[:, -1]  # [rows, V]


class SeparateModels:
    """N separate causal LMs, each with its own cache; one forward per model per step over all states."""

    def __init__(self, models: list):
        self.models = models
        self.num_policies = len(models)

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 0) -> torch.Tensor:
        self.rows = _CacheRows()
        pos = self.rows.start(attention_mask)
        self.caches = [new_cache(input_ids.shape[1] + max_new_tokens) for _ in self.models]
        return torch.stack([_forward(m, input_ids, self.rows.mask, pos, c) for m, c in zip(self.models, self.caches)])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        mask, pos = self.rows.advance()
        ids = tokens[:, None]  # [U, 1]
        return torch.stack([_forward(m, ids, mask, pos, c) for m, c in zip(self.models, self.caches)])

    def select(self, index: torch.Tensor) -> None:
        self.rows.select(index)
        for c in self.caches:
            c.batch_select_indices(index)


class LoraAdapters:
    """One PEFT model with N LoRA adapters: one forward per step over N·U rows, policy-major."""

    def __init__(self, peft_model, adapter_names: list[str], impl: str = "bmm"):
        from sipo_fast.decoding.lora import MultiLoraContext

        self.model = peft_model
        self.num_policies = len(adapter_names)
        self.lora = MultiLoraContext(peft_model, adapter_names, impl)

    def _run(self, ids, mask, pos) -> torch.Tensor:
        n = self.num_policies
        u = ids.shape[0]
        ids_n = ids.repeat(n, 1)  # [N·U, T] policy-major
        with self.lora.rows(n, u):
            logits = _forward(self.lora.base_model, ids_n, mask.repeat(n, 1), pos.repeat(n, 1), self.cache,
                              **self.lora.forward_kwargs)
        return logits.view(n, u, -1)  # [N, U, V]

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int = 0) -> torch.Tensor:
        self.rows = _CacheRows()
        pos = self.rows.start(attention_mask)
        self.cache = new_cache(input_ids.shape[1] + max_new_tokens)
        return self._run(input_ids, self.rows.mask, pos)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        mask, pos = self.rows.advance()
        return self._run(tokens[:, None], mask, pos)

    def select(self, index: torch.Tensor) -> None:
        u_old = self.rows.mask.shape[0]
        self.rows.select(index)
        offsets = torch.arange(self.num_policies, device=index.device)[:, None] * u_old  # [N, 1]
        self.cache.batch_select_indices((offsets + index[None]).reshape(-1))  # [N·U'] policy-major
