"""A lean forward of Llama-family policies over a static KV cache: the body of the captured decode step.

Why not transformers' own forward: a captured (CUDA-graph) step must be free of host work (no Python-side
mask building, no ``.item()``, no shape that depends on data), and at decode batch sizes the eager layer's
~45 small launches, not the weights, set the step time. This module reads the weights of a stock
``LlamaForCausalLM`` / ``MistralForCausalLM`` / ``Qwen2ForCausalLM`` (or a PEFT model with N LoRA adapters of
one such base) and runs the same arithmetic with the fused ops of :mod:`sipo_fast.ops.decode`:

    res = embed(tok);  h = norm₁(res)
    per layer:  q, k, v = h·Wqᵀ, h·Wkᵀ, h·Wvᵀ (+ bias, + LoRA)  →  rope(q, k); k, v → cache column ``cur``
                a = attention(q, cache[start_r : cur + 1])     →  h, res = norm₂(res + a·Woᵀ)
                h, res = norm_next(res + down(silu(h·Wgᵀ) · h·Wuᵀ))
    logits = h · W_lmᵀ

The cache is static: per policy and layer ``[rows, Hkv, T, D]`` keys and values, prompts left-padded into
columns ``[0, Tp)`` (row r's prompt starts at ``starts[r]``), generated tokens at ``Tp, Tp + 1, ...``: the same
layout as transformers' left-padded batch, so float32 results match its eager forward to rounding. The
rotary tables come from the model's own ``rotary_emb`` module (rope scaling included).

Policies (:class:`LeanPolicies`): N separate models (one lean model and one cache each; logits stacked) or N
LoRA adapters of one base (one forward over N·R policy-major rows, adapters applied with two batched matmuls
per adapted projection, as :mod:`sipo_fast.decoding.lora` does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sipo_fast.ops.decode import apply_rope, decode_attention, rms_norm, rope_kv, silu_mul

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class _Linear:
    """One projection: base weight (+ bias) and, for N LoRA adapters over policy-major rows, stacked
    ``a [N, in, r]`` and pre-scaled ``b [N, r, out]``."""

    def __init__(self, module, lora=None):
        base = getattr(module, "base_layer", module)
        self.weight, self.bias = base.weight, base.bias
        self.a, self.b = (lora.a, lora.b) if lora is not None else (None, None)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is not None and self.bias is None and self.a is None:
            return torch.mm(x, self.weight.t(), out=out)  # into a preallocated buffer (the logits)
        y = F.linear(x, self.weight, self.bias)  # (rows, out)
        if out is not None:
            return out.copy_(y)
        if self.a is not None:
            n = self.a.shape[0]
            x3 = x.reshape(n, -1, x.shape[-1]).to(self.a.dtype)  # (N, rows/N, in), policy-major
            y.view(n, -1, y.shape[-1]).baddbmm_(torch.bmm(x3, self.a), self.b)
        return y


def unsupported_reason(model) -> str | None:
    """Why the lean forward cannot run this transformers model (None when it can)."""
    cfg = getattr(model, "config", None)
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        return f"model type {kind!r} is not one of {SUPPORTED_MODEL_TYPES}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"hidden_act {cfg.hidden_act!r} is not silu"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return "the model has no .model.layers / .model.rotary_emb (not the stock transformers layout)"
    attn = inner.layers[0].self_attn
    if any(hasattr(attn, name) for name in ("q_norm", "k_norm")):
        return "attention with q/k norms is not supported"
    return None


class LeanModel:
    """The weights of one Llama-family causal LM, arranged for :meth:`prefill` and :meth:`decode`.

    ``lora``: for a PEFT base with N adapters, ``{module: stacked}`` from :mod:`sipo_fast.decoding.lora`.
    ``backend`` goes to every op of :mod:`sipo_fast.ops.decode` (None: the process default, else Triton on CUDA,
    cpu otherwise).
    """

    def __init__(self, model, lora: dict | None = None, backend: str | None = None):
        reason = unsupported_reason(model)
        if reason:
            raise ValueError(f"the captured decode step cannot run this model: {reason}")
        lora = lora or {}
        lin = lambda m: _Linear(m, lora.get(m))  # noqa: E731
        cfg = model.config
        inner = model.model
        self.backend = backend
        self.embed = model.get_input_embeddings().weight
        self.lm_head = _Linear(model.get_output_embeddings())
        self.rotary = inner.rotary_emb
        self.norm = (inner.norm.weight, inner.norm.variance_epsilon)
        self.layers = []
        for layer in inner.layers:
            at, mlp = layer.self_attn, layer.mlp
            window = getattr(at, "sliding_window", None)
            if window is None and cfg.model_type == "mistral":
                window = getattr(cfg, "sliding_window", None)
            self.layers.append(dict(
                ln1=(layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon),
                ln2=(layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon),
                q=lin(at.q_proj), k=lin(at.k_proj), v=lin(at.v_proj), o=lin(at.o_proj),
                gate=lin(mlp.gate_proj), up=lin(mlp.up_proj), down=lin(mlp.down_proj), window=int(window or 0)))
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scaling = float(getattr(inner.layers[0].self_attn, "scaling", self.head_dim ** -0.5))
        self.dtype, self.device = self.embed.dtype, self.embed.device
        self._cos = self._sin = None

    # -- geometry
    def cache_shape(self, rows: int, width: int) -> tuple[int, ...]:
        """``[layers, 2, rows, Hkv, width, D]``: keys (index 0) and values (1) of every layer."""
        return (len(self.layers), 2, rows, self.num_kv_heads, width, self.head_dim)

    def rope_tables(self, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[P, D]`` in the model dtype for positions ``[0, P)``, from the model's rotary module
        (grown on demand, so a captured step keeps reading the same tensors while P does not grow)."""
        if self._cos is None or self._cos.shape[0] < positions:
            pos = torch.arange(positions, device=self.device)[None]
            probe = torch.empty(1, dtype=self.dtype, device=self.device)
            cos, sin = self.rotary(probe, pos)
            self._cos, self._sin = cos[0].contiguous(), sin[0].contiguous()
        return self._cos, self._sin

    def _norm(self, x, ln, residual=None):
        return rms_norm(x, ln[0], ln[1], residual, backend=self.backend)

    def _mlp(self, layer, h):
        return layer["down"](silu_mul(layer["gate"](h), layer["up"](h), backend=self.backend))

    def _finish(self, h, res, li):
        """Residual add of layer li's MLP output and the next norm (the final one after the last layer)."""
        ln = self.layers[li + 1]["ln1"] if li + 1 < len(self.layers) else self.norm
        return self._norm(h, ln, res)

    # -- prefill: several tokens per row (left-padded), not captured
    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, cache: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Run prompts ``ids [P, Tp]`` (left-padded, ``mask`` 1 on tokens) and write their keys/values into
        ``cache[:, :, rows[j], :, :Tp]`` for cache row j from prompt ``rows[j]``. Returns last-position logits
        ``[P, V]``."""
        p, t = ids.shape
        pos = (mask.long().cumsum(-1) - 1).clamp_(min=0)  # (P, Tp)
        cos, sin = self.rope_tables(t)
        cos, sin = cos[pos][:, None], sin[pos][:, None]  # (P, 1, Tp, D)
        col = torch.arange(t, device=ids.device)
        causal = col[None, :] <= col[:, None]  # (Tp, Tp): query i sees keys j <= i
        allowed = causal[None] & mask.bool()[:, None, :]  # (P, Tp, Tp)
        allowed |= torch.eye(t, dtype=torch.bool, device=ids.device)[None]  # padding queries see themselves
        res = F.embedding(ids, self.embed).reshape(p * t, -1)
        h = self._norm(res, self.layers[0]["ln1"])
        for li, layer in enumerate(self.layers):
            q = apply_rope(layer["q"](h).view(p, t, -1, self.head_dim).transpose(1, 2), cos, sin)  # (P, H, Tp, D)
            k = apply_rope(layer["k"](h).view(p, t, -1, self.head_dim).transpose(1, 2), cos, sin)  # (P, Hkv, Tp, D)
            v = layer["v"](h).view(p, t, -1, self.head_dim).transpose(1, 2)
            cache[li, 0, :, :, :t] = k.index_select(0, rows)
            cache[li, 1, :, :, :t] = v.index_select(0, rows)
            m = allowed
            if layer["window"]:
                m = m & (col[None, :] > col[:, None] - layer["window"])[None]
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=m[:, None], scale=self.scaling,
                                               enable_gqa=self.num_kv_heads != self.num_heads)
            a = a.transpose(1, 2).reshape(p * t, -1)
            h, res = self._norm(layer["o"](a), layer["ln2"], res)
            if li + 1 == len(self.layers):  # only the last position's logits are needed
                h, res = h.view(p, t, -1)[:, -1], res.view(p, t, -1)[:, -1]
            h, res = self._finish(self._mlp(layer, h), res, li)
        return self.lm_head(h)

    # -- decode: one token per row, graph-capturable (no host reads, fixed shapes)
    def decode(self, tok: torch.Tensor, pos: torch.Tensor, cache: torch.Tensor, cur: torch.Tensor,
               starts: torch.Tensor, length: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Feed ``tok [R]`` at positions ``pos [R]``; write its K/V at cache column ``cur [1]``; attend to
        columns ``[starts[r], length)``. Returns logits ``[R, V]`` (written into ``out`` when given)."""
        cos, sin = self._cos, self._sin
        res = F.embedding(tok, self.embed)
        h = self._norm(res, self.layers[0]["ln1"])
        rows = tok.shape[0]
        for li, layer in enumerate(self.layers):
            q = rope_kv(layer["q"](h), layer["k"](h), layer["v"](h), cos, sin, pos, cache[li, 0], cache[li, 1], cur,
                        backend=self.backend)
            a = decode_attention(q, cache[li, 0], cache[li, 1], starts, length, self.scaling, layer["window"],
                                 backend=self.backend)
            h, res = self._norm(layer["o"](a.reshape(rows, -1)), layer["ln2"], res)
            h, res = self._finish(self._mlp(layer, h), res, li)
        return self.lm_head(h, out)


class LeanPolicies:
    """N policies for the captured step: ``models`` (N separate causal LMs) or ``peft_model`` + ``adapter_names``
    (N LoRA adapters of one base, one forward over N·R policy-major rows). Owns the static caches."""

    def __init__(self, models=None, peft_model=None, adapter_names=None, backend: str | None = None):
        if peft_model is not None:
            from sipo_fast.decoding.lora import lora_layers, stacked_lora

            names = list(adapter_names)
            stacks = {m: stacked_lora(m, names) for m in lora_layers(peft_model) if any(n in m.lora_A for n in names)}
            self.lean = [LeanModel(peft_model.get_base_model(), stacks, backend)]
            self.num_policies, self.stacked = len(names), True
        else:
            self.lean = [LeanModel(m, None, backend) for m in models]
            self.num_policies, self.stacked = len(models), False
        self.caches: list[torch.Tensor] = []
        self.logits: torch.Tensor | None = None  # [N, R, V]: every step's logits land here (no copy, no alloc)
        self.rows = self.width = 0

    @property
    def dtype(self) -> torch.dtype:
        return self.lean[0].dtype

    def allocate(self, rows: int, width: int) -> bool:
        """Make room for ``rows`` decoding rows of ``width`` cache columns each; True if it reallocated
        (which invalidates captured graphs, whose addresses point into the old caches)."""
        if rows == self.rows and width <= self.width:
            return False
        self.caches, self.logits = [], None  # free before allocating
        mult = self.num_policies if self.stacked else 1
        # empty, not zeros: every column a step reads was written first (prefill fills [0, Tp) of every row)
        self.caches = [torch.empty(m.cache_shape(rows * mult, width), dtype=m.dtype, device=m.device) for m in self.lean]
        m = self.lean[0]
        self.logits = torch.empty(self.num_policies, rows, m.lm_head.weight.shape[0], dtype=m.dtype, device=m.device)
        for m in self.lean:
            m.rope_tables(width)
        self.rows, self.width = rows, width
        return True

    def _expand(self, x: torch.Tensor) -> torch.Tensor:
        """Row tensors for one forward: repeated per policy (policy-major) on a stacked LoRA cache."""
        return x.repeat(self.num_policies, *([1] * (x.dim() - 1))) if self.stacked else x

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, state_of_row: torch.Tensor) -> torch.Tensor:
        """Prefill the distinct prompts ``ids [U, Tp]`` once per policy; cache row r gets prompt
        ``state_of_row[r]``. Returns logits ``[N, U, V]``."""
        n, u = self.num_policies, ids.shape[0]
        if self.stacked:
            offsets = torch.arange(n, device=ids.device)[:, None] * u
            rows = (offsets + state_of_row[None]).reshape(-1)  # policy-major N·R rows into N·U prompts
            logits = self.lean[0].prefill(self._expand(ids), self._expand(mask), self.caches[0], rows)
            return logits.view(n, u, -1)
        return torch.stack([m.prefill(ids, mask, c, state_of_row) for m, c in zip(self.lean, self.caches)])

    def decode(self, tok, pos, cur, starts, length) -> torch.Tensor:
        """One step for all R rows: logits ``[N, R, V]``."""
        if self.stacked:
            self.lean[0].decode(self._expand(tok), self._expand(pos), self.caches[0], cur, self._expand(starts), length,
                                out=self.logits.view(-1, self.logits.shape[-1]))
        else:
            for i, (m, c) in enumerate(zip(self.lean, self.caches)):
                m.decode(tok, pos, c, cur, starts, length, out=self.logits[i])
        return self.logits
