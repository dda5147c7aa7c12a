"""MOD decoder runners on the shared paged KV cache (``MODDecoder(..., kv_cache="paged")``).

A runner is the decoder's only owner of KV state, with three verbs (:class:`sipo_fast.decoding.runners.Runner`):
``prefill(input_ids [U, T], attention_mask [U, T], max_new_tokens) -> logits [N, U, V]``,
``step(tokens [U]) -> [N, U, V]`` and ``select(index [U'])`` (keep / fork / reorder / drop decoding states),
plus ``reserve(max_rows, max_new_tokens)``, which the decoder calls before the prefill. On the paged cache:

  * prefill writes each distinct prompt's KV once per policy (the decoder already merged repeated prompt
    rows into one state; with ``prefix_caching`` even different prompts share their common leading blocks);
  * select is bookkeeping only: a state that several rows continue is *forked* (its blocks shared, reference
    counts up) instead of copying its KV rows, and a dropped state frees its blocks. The first token a fork
    appends into a shared, partially filled block copies that one block (copy-on-write), in every policy;
  * every step runs one forward per policy (or one over N·U rows for LoRA adapters) whose attention reads
    the pages in place.

:meth:`reserve` sizes the pools before the prefill: prompt blocks + every row's own blocks for
``max_new_tokens`` (+1 for copy-on-write). Pools are kept between calls and grown when too small.
"""
from __future__ import annotations

import torch

from sipo_fast.kv.hf import forward_paged, paged_attention_enabled
from sipo_fast.kv.pool import SharedPagedKV


class _PagedRunner:
    """Shared bookkeeping: pool sizing, prompt registration, fork/free on select, statistics."""

    def __init__(self, block_size: int, prefix_caching: bool):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int, got {block_size!r}")
        self.block_size, self.prefix_caching = block_size, bool(prefix_caching)
        self.kv: SharedPagedKV | None = None
        self.seqs: list[int] = []
        self._reserve = None
        self.stats: dict[str, int] = {}

    def reserve(self, max_rows: int, max_new_tokens: int) -> None:
        """Say how many rows and new tokens the next prefill/decode needs, so the pools fit them."""
        if max_rows < 1 or max_new_tokens < 0:
            raise ValueError(f"reserve(max_rows={max_rows}, max_new_tokens={max_new_tokens}): need >= 1 and >= 0")
        self._reserve = (int(max_rows), int(max_new_tokens))

    def _allocate(self, num_blocks: int) -> SharedPagedKV:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _register_prompts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int | None):
        if self._reserve is None:
            raise ValueError("call runner.reserve(max_rows, max_new_tokens) before prefill: the paged cache sizes "
                             "its pools from them")
        max_rows, max_new = self._reserve
        max_new = max(max_new, max_new_tokens or 0)
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids.cpu(), attention_mask.cpu())]
        blocks_per_row = -(-max_new // self.block_size) + 1  # its own pages + one copy-on-write page
        need = sum(-(-len(p) // self.block_size) for p in prompts) + max(max_rows, len(prompts)) * blocks_per_row
        if self.kv is None or self.kv.num_blocks < need:
            self.kv = None  # drop the old pools before allocating the new ones
            self.kv = self._allocate(need)
        else:
            self.kv.free(self.kv.manager.seq_ids())  # reuse the pools: everything from the last call goes
        self.seqs, ids, mask = self.kv.add_prompts(prompts, pad_token_id=0)
        self.stats = {"prefill_tokens": int(mask.sum()), "num_blocks": self.kv.num_blocks, "peak_blocks_used": 0}
        return ids.to(input_ids.device), mask.to(input_ids.device)

    def _track(self) -> None:
        used = self.kv.num_blocks - self.kv.manager.num_free_blocks()
        self.stats["peak_blocks_used"] = max(self.stats["peak_blocks_used"], used)

    def select(self, index: torch.Tensor) -> None:
        """New state j continues old state index[j]: the first continuation takes the old sequence, later
        ones fork it (blocks shared, no copy); old states nobody continues are freed."""
        taken: set[int] = set()
        new = []
        for old in index.tolist():
            if old in taken:
                new.append(self.kv.fork(self.seqs[old]))
            else:
                taken.add(old)
                new.append(self.seqs[old])
        self.kv.free([s for u, s in enumerate(self.seqs) if u not in taken])
        self.seqs = new

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                max_new_tokens: int | None = None) -> torch.Tensor:
        ids, mask = self._register_prompts(input_ids, attention_mask, max_new_tokens)
        self._begin(mask)
        return self._run(ids)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        self._begin(torch.ones(len(self.seqs), 1, dtype=torch.bool, device=tokens.device))
        return self._run(tokens[:, None])

    def _begin(self, new_mask: torch.Tensor) -> None:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def _run(self, ids: torch.Tensor) -> torch.Tensor:  # pragma: no cover - defined by subclasses
        raise NotImplementedError

    def release(self) -> None:
        """Drop the pools (memory) until the next prefill."""
        self.kv, self.seqs = None, []


class PagedSeparateModels(_PagedRunner):
    """N separate causal LMs on one SharedPagedKV (one pool each); one forward per model per step."""

    def __init__(self, models: list, *, block_size: int = 16, prefix_caching: bool = False):
        super().__init__(block_size, prefix_caching)
        self.models = models
        self.num_policies = len(models)

    def _allocate(self, num_blocks: int) -> SharedPagedKV:
        return SharedPagedKV.for_models(self.models, num_blocks, self.block_size,
                                        enable_prefix_caching=self.prefix_caching)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        with paged_attention_enabled(*self.models):
            logits = [forward_paged(m, self.kv, i, ids, logits_to_keep=1)[:, -1] for i, m in enumerate(self.models)]
        self._track()
        return torch.stack(logits)  # (N, U, V)

    def _begin(self, new_mask: torch.Tensor) -> None:
        self.kv.begin_forward(self.seqs, new_mask)


class PagedLoraAdapters(_PagedRunner):
    """One PEFT model with N LoRA adapters: one forward per step over N·U policy-major rows, on a stacked
    SharedPagedKV (N pools in one allocation, block tables offset per policy)."""

    def __init__(self, peft_model, adapter_names: list[str], impl: str = "bmm", *, block_size: int = 16,
                 prefix_caching: bool = False):
        from sipo_fast.decoding.lora import MultiLoraContext

        super().__init__(block_size, prefix_caching)
        self.model = peft_model
        self.num_policies = len(adapter_names)
        self.lora = MultiLoraContext(peft_model, adapter_names, impl)

    def _allocate(self, num_blocks: int) -> SharedPagedKV:
        return SharedPagedKV.stacked(self.model.get_base_model(), self.num_policies, num_blocks, self.block_size,
                                     enable_prefix_caching=self.prefix_caching)

    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        n, u = self.num_policies, ids.shape[0]
        target = self.lora.base_model
        with paged_attention_enabled(self.model.get_base_model()), self.lora.rows(n, u):
            logits = forward_paged(target, self.kv, None, ids.repeat(n, 1), logits_to_keep=1,
                                   **self.lora.forward_kwargs)[:, -1]  # (N*U, V) policy-major
        self._track()
        return logits.view(n, u, -1)  # (N, U, V)

    def _begin(self, new_mask: torch.Tensor) -> None:
        self.kv.begin_forward_stacked(self.seqs, new_mask)


# Model families whose attention modules hand the model's extra kwargs (the PagedCache) to the attention function
# and carry a layer_idx; these are the ones tested against stock HF in test_paged_cache.
PAGED_MODEL_TYPES = ("llama", "mistral", "qwen2")
