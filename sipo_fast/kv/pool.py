"""Paged KV storage: one pool per policy, all indexed by the block tables of one shared BlockManager.

A pool is one tensor ``[layers, 2, num_blocks, block_size, kv_heads, head_dim]``; ``kv[l, 0]`` (keys) and
``kv[l, 1]`` (values) are the ``[num_blocks, block_size, Hkv, D]`` pages the attention kernels read in place.
Token t of a sequence with block table T lives at page T[t // block_size], slot t % block_size, in *every*
policy's pool, so one allocation decision (and one copy-on-write) serves all N policies.

:class:`SharedPagedKV` owns the manager and the pools and turns "these rows get these new tokens" into the
per-forward bookkeeping (:class:`StepInputs`: positions, destination slots, block tables, context lengths).
Rows store only their real tokens: left padding in a batch is never written, so prompts of different
lengths share nothing they should not and forks of one prompt share all of it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


class PagedKVPool:
    """One policy's K/V pages: ``kv`` is ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]``."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        for name, v in (("num_layers", num_layers), ("num_blocks", num_blocks), ("block_size", block_size),
                        ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"PagedKVPool: {name} must be a positive int, got {v!r}")
        if not dtype.is_floating_point:
            raise ValueError(f"PagedKVPool: dtype must be floating (the model's dtype), got {dtype}")
        # Zeros, not empty: the plain-torch reference gathers whole pages and must never meet NaN bit patterns.
        self.kv = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype,
                              device=device)

    @classmethod
    def from_tensor(cls, kv: torch.Tensor) -> "PagedKVPool":
        """Wrap existing storage ``[num_layers, 2, num_blocks, block_size, Hkv, D]`` (e.g. one policy's slice of
        a stacked allocation) without copying; each ``kv[l, i]`` must be contiguous."""
        if kv.dim() != 6 or kv.shape[1] != 2 or not all(kv[0, i].is_contiguous() for i in range(2)):
            raise ValueError("PagedKVPool.from_tensor needs [num_layers, 2, num_blocks, block_size, Hkv, D] storage "
                             f"with contiguous pages, got shape {tuple(kv.shape)}")
        pool = cls.__new__(cls)
        pool.kv = kv
        return pool

    @classmethod
    def for_model(cls, config, num_blocks: int, block_size: int, *, dtype: torch.dtype | None = None,
                  device: str | torch.device = "cpu") -> "PagedKVPool":
        """A pool shaped for a transformers decoder config (Llama, Mistral, Qwen2, ...)."""
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, num_blocks, block_size, kv_heads, head_dim,
                   dtype=dtype or getattr(config, "dtype", None) or torch.float32, device=device)

    @property
    def geometry(self) -> tuple[int, ...]:
        """(num_layers, num_blocks, block_size, num_kv_heads, head_dim)."""
        n_layers, _, n_blocks, block, kv_heads, head_dim = self.kv.shape
        return n_layers, n_blocks, block, kv_heads, head_dim

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def keys(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 0]  # (num_blocks, block_size, Hkv, D)

    def values(self, layer: int) -> torch.Tensor:
        return self.kv[layer, 1]

    def write(self, layer: int, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store token rows ``keys/values [T, Hkv, D]`` at flat slots ``block * block_size + offset``."""
        _, _, n_blocks, block, kv_heads, head_dim = self.kv.shape
        self.kv[layer, 0].view(n_blocks * block, kv_heads, head_dim).index_copy_(0, slots, keys.to(self.kv.dtype))
        self.kv[layer, 1].view(n_blocks * block, kv_heads, head_dim).index_copy_(0, slots, values.to(self.kv.dtype))

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at flat slots ``[B, L]`` -> two ``[B, L, Hkv, D]`` tensors (a copy; for prefill only)."""
        _, _, n_blocks, block, kv_heads, head_dim = self.kv.shape
        flat = self.kv[layer].view(2, n_blocks * block, kv_heads, head_dim)
        return flat[0][slots], flat[1][slots]

    def copy_blocks(self, pairs: torch.Tensor) -> None:
        """Copy-on-write: for each (src, dst) row of ``pairs [n, 2]``, page dst := page src, in every layer,
        keys and values. Destinations are fresh blocks and never a source in the same batch, so one indexed
        copy is safe."""
        if pairs.numel():
            pairs = pairs.to(self.kv.device)
            self.kv[:, :, pairs[:, 1]] = self.kv[:, :, pairs[:, 0]]


@dataclass
class StepInputs:
    """Bookkeeping of one forward over ``B`` rows with ``q`` input positions each (left-padded).

    new_mask [B, q] bool: which inputs are real tokens (stored and attended); position_ids [B, q]: absolute
    positions (past + index among the row's real new tokens; 0 at padding); slots [T]: flat destination slot
    of each real token in row-major order; block_tables int32 [B, W]; context_lens int32 [B]: tokens each row
    holds after this forward; past_lens [B]: before it.
    """

    seq_ids: list[int]
    new_mask: torch.Tensor
    position_ids: torch.Tensor
    slots: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    past_lens: torch.Tensor

    @property
    def is_decode(self) -> bool:
        return self.new_mask.shape[1] == 1


class SharedPagedKV:
    """One :class:`~sipo_fast.kv.BlockManager` and one :class:`PagedKVPool` per policy (same geometry).

    Typical use, N policies sharing prompts::

        kv = SharedPagedKV.for_models(models, num_blocks=..., block_size=16)
        seq_ids, input_ids, mask = kv.add_prompts(prompt_token_lists)    # prefix-cache hits skip tokens
        step = kv.begin_forward(seq_ids, mask)                            # allocation + CoW, once for all
        logits = [forward_paged(m, kv, i, input_ids) for i, m in enumerate(models)]
        rows = [kv.fork(s) for s in seq_ids for _ in range(k)]            # share the prompt, copy nothing
    """

    def __init__(self, pools: Sequence[PagedKVPool], block_size: int, *, enable_prefix_caching: bool = False):
        from sipo_fast import _ext

        BlockManager = _ext.require("sipo_fast.kv.BlockManager").BlockManager
        if not pools:
            raise ValueError("SharedPagedKV needs at least one pool (one per policy)")
        geometry = pools[0].geometry
        if any(p.geometry != geometry or p.kv.dtype != pools[0].kv.dtype or p.kv.device != pools[0].kv.device
               for p in pools):
            raise ValueError("all pools must share geometry, dtype and device: one block table indexes them all")
        if geometry[2] != block_size:
            raise ValueError(f"block_size={block_size} differs from the pools' block size {geometry[2]}")
        self.pools = list(pools)
        self.block_size = block_size
        self.manager = BlockManager(geometry[1], block_size, enable_prefix_caching)
        self.step: StepInputs | None = None
        self.flat_pool: PagedKVPool | None = None  # set by stacked(): all pools as one [.., N*NB, ..] view
        # Prompts added by add_prompts whose prefill has not run yet: seq_id -> tokens still to compute.
        self._pending: dict[int, int] = {}

    @classmethod
    def for_models(cls, models_or_configs: Sequence, num_blocks: int, block_size: int = 16, *,
                   dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                   enable_prefix_caching: bool = False) -> "SharedPagedKV":
        """One pool per model (or config), shaped from the first; raises if the models' KV geometries differ."""
        configs = [getattr(m, "config", m) for m in models_or_configs]
        first = models_or_configs[0]
        if dtype is None:
            dtype = getattr(first, "dtype", None) or torch.float32
        if device is None:
            device = getattr(first, "device", None) or "cpu"
        pools = [PagedKVPool.for_model(c, num_blocks, block_size, dtype=dtype, device=device) for c in configs]
        return cls(pools, block_size, enable_prefix_caching=enable_prefix_caching)

    @classmethod
    def stacked(cls, model_or_config, num_policies: int, num_blocks: int, block_size: int = 16, *,
                dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                enable_prefix_caching: bool = False) -> "SharedPagedKV":
        """N pools that are slices of one allocation ``[layers, 2, N, num_blocks, block, Hkv, D]``, for N LoRA
        adapters of one base model decoded in one forward over N·U policy-major rows. Policy i's pages are
        blocks ``[i·num_blocks, (i+1)·num_blocks)`` of :attr:`flat_pool`; :meth:`begin_forward_stacked`
        offsets the block tables accordingly, so one kernel call serves all N policies."""
        first = PagedKVPool.for_model(getattr(model_or_config, "config", model_or_config), 1, block_size,
                                      dtype=dtype or getattr(model_or_config, "dtype", None),
                                      device=device or getattr(model_or_config, "device", None) or "cpu")
        n_layers, _, _, kv_heads, head_dim = first.geometry
        if not isinstance(num_policies, int) or num_policies < 1 or not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_policies and num_blocks must be positive ints, got {num_policies!r}, {num_blocks!r}")
        storage = torch.zeros(n_layers, 2, num_policies, num_blocks, block_size, kv_heads, head_dim,
                              dtype=first.kv.dtype, device=first.kv.device)
        kv = cls([PagedKVPool.from_tensor(storage[:, :, i]) for i in range(num_policies)], block_size,
                 enable_prefix_caching=enable_prefix_caching)
        # (layers, 2, N, NB, bs, Hkv, D) -> (layers, 2, N*NB, bs, Hkv, D): a view, no copy
        kv.flat_pool = PagedKVPool.from_tensor(storage.view(n_layers, 2, num_policies * num_blocks, block_size,
                                                            kv_heads, head_dim))
        return kv

    @property
    def device(self) -> torch.device:
        return self.pools[0].kv.device

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    # Sequences -----------------------------------------------------------------------------------------
    def add_prompts(self, prompts: Sequence[Sequence[int]], *, pad_token_id: int = 0):
        """Register prompts (token id lists) and build their prefill inputs.

        Returns ``(seq_ids, input_ids [P, L], new_mask [P, L])``: the tokens each prompt still needs computed
        (all of them, or the suffix after a prefix-cache hit), left-padded with ``pad_token_id``. Blocks for
        the whole prompt are reserved now. Run the prefill of one call's prompts in one forward, before
        forking them: a prefix-cache hit may point at a block another prompt of the same call writes.
        """
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("add_prompts needs a non-empty list of non-empty token id lists")
        seq_ids, todo = [], []
        try:
            for tokens in prompts:
                tokens = [int(t) for t in tokens]
                sid = self.manager.add_prompt(tokens)
                seq_ids.append(sid)
                todo.append(tokens[self.manager.num_cached_tokens(sid):])
        except Exception:
            for sid in seq_ids:  # all or nothing
                self.manager.free(sid)
            raise
        # add_prompt reserved blocks (and counts tokens) for the whole prompt at once; remember how many are
        # still to be computed so begin_forward treats the prefill as past = cached prefix, new = the rest.
        self._pending.update({sid: len(t) for sid, t in zip(seq_ids, todo)})
        width = max(len(t) for t in todo)
        input_ids = torch.full((len(todo), width), pad_token_id, dtype=torch.long)
        new_mask = torch.zeros(len(todo), width, dtype=torch.bool)
        for i, t in enumerate(todo):
            input_ids[i, width - len(t):] = torch.tensor(t, dtype=torch.long)
            new_mask[i, width - len(t):] = True
        return seq_ids, input_ids.to(self.device), new_mask.to(self.device)

    def fork(self, seq_id: int) -> int:
        return self.manager.fork(seq_id)

    def free(self, seq_ids: int | Sequence[int]) -> None:
        for sid in [seq_ids] if isinstance(seq_ids, int) else seq_ids:
            self.manager.free(sid)
            self._pending.pop(sid, None)

    # One forward ---------------------------------------------------------------------------------------
    def begin_forward(self, seq_ids: Sequence[int], new_mask: torch.Tensor) -> StepInputs:
        """Allocate slots for the real tokens of the next forward (all rows at once, all or nothing), apply
        copy-on-write to every pool, and compute positions, slots, block tables and context lengths.
        Call once per forward *step*, then run every policy's forward on it."""
        seq_ids = [int(s) for s in seq_ids]
        if new_mask.dim() != 2 or new_mask.shape[0] != len(seq_ids) or new_mask.dtype != torch.bool:
            raise ValueError(f"new_mask must be a bool [B={len(seq_ids)}, q] tensor (True = real token), got "
                             f"{new_mask.dtype} {tuple(new_mask.shape)}")
        mask_cpu = new_mask.cpu()
        counts = mask_cpu.sum(1)
        pending = self._pending
        # Prompts registered by add_prompts already own blocks for their whole prompt; only their token
        # count advances (from the cached prefix). Every other row appends.
        past = []
        append_ids, append_counts = [], []
        for sid, n in zip(seq_ids, counts.tolist()):
            if sid in pending:
                if n != pending[sid]:
                    raise ValueError(f"sequence {sid} was registered by add_prompts with {pending[sid]} tokens "
                                     f"to compute, but this forward gives it {n}")
                past.append(self.manager.num_cached_tokens(sid))
            else:
                past.append(self.manager.num_tokens(sid))
                append_ids.append(sid)
                append_counts.append(n)
        pairs = self.manager.append_tokens_batch(append_ids, append_counts)
        for sid in seq_ids:
            pending.pop(sid, None)
        if pairs:
            pairs_t = torch.tensor(pairs, dtype=torch.long)  # (n, 2): (src, dst)
            for pool in self.pools:
                pool.copy_blocks(pairs_t)
        past_t = torch.tensor(past, dtype=torch.long)
        offsets = torch.cumsum(mask_cpu.long(), dim=1) - 1  # (B, q): index among the row's new tokens
        position_ids = (past_t[:, None] + offsets).clamp_min(0)
        tables = self.manager.block_tables(seq_ids)  # (B, W) int32
        pos = position_ids[mask_cpu]  # (T,) absolute positions of the real tokens, row-major
        rows = torch.arange(len(seq_ids))[:, None].expand_as(mask_cpu)[mask_cpu]
        blocks = tables.long()[rows, pos // self.block_size] if pos.numel() else pos
        slots = blocks * self.block_size + pos % self.block_size
        dev = self.device
        self.step = StepInputs(seq_ids, new_mask.to(dev), position_ids.to(dev), slots.to(dev), tables.to(dev),
                               (past_t + counts).to(torch.int32).to(dev), past_t.to(dev))
        return self.step

    def begin_forward_stacked(self, seq_ids: Sequence[int], new_mask: torch.Tensor) -> StepInputs:
        """:meth:`begin_forward` for a :meth:`stacked` cache, laid out for one forward over N·U policy-major rows
        (rows [i·U, (i+1)·U) are policy i): the same allocation, with policy i's block ids and slots offset by
        i·num_blocks. Sets and returns the N·U-row step."""
        flat = getattr(self, "flat_pool", None)
        if flat is None:
            raise ValueError("begin_forward_stacked needs a cache built with SharedPagedKV.stacked(...)")
        step = self.begin_forward(seq_ids, new_mask)
        n, nb = len(self.pools), self.num_blocks
        offsets = torch.arange(n, device=self.device) * nb  # block offset of each policy in the flat pool
        self.step = StepInputs(
            seq_ids=list(step.seq_ids) * n, new_mask=step.new_mask.repeat(n, 1),
            position_ids=step.position_ids.repeat(n, 1),
            slots=(step.slots[None, :] + offsets[:, None] * self.block_size).reshape(-1),  # (N*T,) policy-major
            block_tables=(step.block_tables[None] + offsets[:, None, None].to(torch.int32)).flatten(0, 1),  # (N*B, W)
            context_lens=step.context_lens.repeat(n), past_lens=step.past_lens.repeat(n))
        return self.step

    def kv_bytes(self) -> int:
        """Bytes of KV actually held (used blocks × bytes per block, summed over pools)."""
        used = self.manager.num_blocks - self.manager.num_free_blocks()
        return sum(p.nbytes // p.geometry[1] * used for p in self.pools)
