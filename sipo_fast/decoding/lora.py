"""Several LoRA adapters of one base model in one forward pass.

For N adapters and rows laid out policy-major (rows [i·R, (i+1)·R) belong to adapter i), every LoRA
linear layer computes

    y = x W_0ᵀ + b  +  s_i · (x A_iᵀ) B_iᵀ        for the rows of adapter i,

so the base weight W_0 is read once for all N·R rows and the adapters add two batched matmuls:
``bmm(x [N, R·T, in], A [N, in, r]) -> [N, R·T, r]`` then ``baddbmm(y, ·, s·B [N, r, out])``. Ranks that
differ are zero-padded to the largest (exact: the padding contributes 0).

Why not PEFT's own mixed batches (``model(..., adapter_names=[...])``, which does work in peft 0.21):
each LoRA layer then rebuilds per-adapter Python index lists over all rows and gathers/scatters the rows
of every adapter (``x[idx]``, ``result[idx] += ...``), on every layer and every step. Rows here are
contiguous per adapter, so plain views and two batched matmuls do the same work without the copies; the
benchmark (``--lora-impl peft``) measures the difference. Both are exposed: ``impl="bmm"`` (default) or
``impl="peft"``.
"""
from __future__ import annotations

import contextlib

import torch


def lora_layers(peft_model) -> list:
    """The LoRA linear layers of a PEFT model (modules carrying ``lora_A`` / ``lora_B``)."""
    return [m for m in peft_model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def check_adapters(peft_model, adapter_names: list[str] | None) -> list[str]:
    """Adapter names in objective order (default: all, in insertion order); ValueError if unusable."""
    configs = getattr(peft_model, "peft_config", None)
    if not configs:
        raise ValueError("the PEFT model carries no adapters; load one LoRA adapter per objective first")
    names = list(configs) if adapter_names is None else list(adapter_names)
    if len(names) == 0:
        raise ValueError("adapter_names is empty: name at least one adapter")
    missing = [n for n in names if n not in configs]
    if missing:
        raise ValueError(f"adapters {missing} are not in the PEFT model (it has {list(configs)})")
    if len(set(names)) != len(names):
        raise ValueError(f"adapter_names has duplicates: {names}")
    for n in names:
        kind = getattr(configs[n], "peft_type", None)
        if str(getattr(kind, "value", kind)).upper() != "LORA":
            raise ValueError(f"adapter {n!r} is {kind}, but MOD decoding over one PEFT model supports LoRA adapters only")
    for layer in lora_layers(peft_model):
        if getattr(layer, "merged_adapters", None):
            raise ValueError(f"adapters {layer.merged_adapters} are merged into the base weights; unmerge them "
                             "(model.unmerge_adapter()) so each policy can apply its own")
        if any(n in getattr(layer, "lora_variant", {}) for n in names):
            raise ValueError("LoRA variants (DoRA, aLoRA) are not supported by the batched decoder; use plain LoRA")
    return names


class _StackedLora:
    """The N adapters of one layer, stacked for bmm: A [N, in, r], s·B [N, r, out]."""

    def __init__(self, layer, names: list[str]):
        present = [n for n in names if n in layer.lora_A]
        ref = layer.lora_A[present[0]].weight
        in_f = ref.shape[1]
        out_f = layer.lora_B[present[0]].weight.shape[0]
        r = max(layer.lora_A[n].weight.shape[0] for n in present)
        a = torch.zeros((len(names), in_f, r), dtype=ref.dtype, device=ref.device)
        b = torch.zeros((len(names), r, out_f), dtype=ref.dtype, device=ref.device)
        for i, n in enumerate(names):
            if n not in layer.lora_A:  # this adapter does not touch the layer: its delta stays 0
                continue
            wa, wb = layer.lora_A[n].weight, layer.lora_B[n].weight  # [r_i, in], [out, r_i]
            a[i, :, : wa.shape[0]] = wa.T
            b[i, : wb.shape[1]] = (wb * layer.scaling[n]).T
        self.a, self.b = a, b

    def __call__(self, module, args, output):
        x = args[0]
        n = self.a.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1]).to(self.a.dtype)  # [N, R·T, in], policy-major rows
        out3 = output.view(n, -1, output.shape[-1])  # [N, R·T, out]
        out3.baddbmm_(torch.bmm(x3, self.a), self.b)
        return output


def stacked_lora(layer, names: list[str]) -> _StackedLora:
    """The N adapters of one LoRA layer as ``.a [N, in, r]`` and pre-scaled ``.b [N, r, out]`` (for the
    captured decode step, which applies them itself)."""
    return _StackedLora(layer, names)


class MultiLoraContext:
    """Apply N LoRA adapters to policy-major row blocks of one forward pass.

    ``impl="bmm"``: LoRA layers compute the base output only (PEFT's ``disable_adapter``), and forward
    hooks add each block's low-rank update with batched matmuls. ``impl="peft"``: PEFT's mixed-adapter
    batch (``adapter_names=`` per row).
    """

    def __init__(self, peft_model, adapter_names: list[str], impl: str = "bmm"):
        if impl not in ("bmm", "peft"):
            raise ValueError(f"impl must be 'bmm' or 'peft', got {impl!r}")
        self.peft_model = peft_model
        self.names = list(adapter_names)
        self.impl = impl
        layers = lora_layers(peft_model)
        self._stacks = [(m, _StackedLora(m, self.names)) for m in layers if any(n in m.lora_A for n in self.names)]

    @property
    def base_model(self):
        """The module to call: the transformers model for bmm, the PeftModel (which routes adapter_names) for peft."""
        return self.peft_model.get_base_model() if self.impl == "bmm" else self.peft_model

    @contextlib.contextmanager
    def rows(self, n: int, rows_per_policy: int):
        if self.impl == "peft":
            names = [name for name in self.names for _ in range(rows_per_policy)]
            self._kwargs = {"adapter_names": names}
            yield
            return
        self._kwargs = {}
        handles = []
        with self.peft_model.disable_adapter():
            try:
                handles = [m.register_forward_hook(s) for m, s in self._stacks]
                yield
            finally:
                for h in handles:
                    h.remove()

    @property
    def forward_kwargs(self) -> dict:
        return getattr(self, "_kwargs", {})
