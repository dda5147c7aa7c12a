"""The captured MOD decode step: fixed slots, device-side bookkeeping, one CUDA graph per batch bucket.

One decode step for all R rows (``MODDecoder(..., kv_cache="static")``, the CUDA default) is

    logits [N, R, V] = policies(tok at pos, K/V → cache column cur, attend [start_r, cur + 1))
    tok, lp = mod_sample(logits, w)                      (fused mix + sample + per-policy log-prob)
    tok = pad where the row already finished;  out[:, step] = tok;  lp_sum += lp (live rows)
    finished |= tok ∈ EOS;  pos, cur, step += 1

Every quantity lives in a preallocated device tensor, so the step has fixed shapes and no host reads: on CUDA
it is captured once as a ``torch.cuda.CUDAGraph`` and each later step is one replay (the GPU no longer waits
on Python and per-op launches). Finished rows keep their slot (their tokens are masked to padding) and the host
looks at ``finished`` only every ``check_every`` steps. Row counts are rounded up to a bucket (8, 16, 32, ...)
so a graph serves every call with up to that many rows; the padding rows start finished. Prompts are
prefilled once per distinct prompt and copied into the cache rows of every weight vector that continues
them. On CPU the same step runs eagerly (no graph), checking for finished rows every step.
"""
from __future__ import annotations

import torch

from sipo_fast.decoding.static import LeanPolicies
from sipo_fast.ops.backend import requested, triton_available
from sipo_fast.ops.mod import mod_sample_unchecked


def _triton(backend) -> bool:
    """Whether ops given ``backend`` run their Triton kernels on CUDA tensors (the process default included;
    "auto" runs the torch paths where triton is not importable, as :func:`sipo_fast.ops.backend.resolve` does)."""
    b = requested(backend)
    return b == "triton" or (b == "auto" and triton_available())


def bucket(rows: int) -> int:
    """Smallest power of two >= rows, at least 8: the captured batch sizes."""
    return max(8, 1 << (rows - 1).bit_length())


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


class StepState:
    """The device tensors one step reads and writes, for ``rows`` slots and up to ``width`` new tokens."""

    def __init__(self, rows: int, num_policies: int, width: int, num_eos: int, device):
        def z(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=device)

        self.tok, self.pos, self.starts = z(rows), z(rows), z(rows)
        self.cur, self.length, self.step, self.pad = z(1), z(1) + 1, z(1), z(1)
        self.w = torch.full((rows, num_policies), 1.0 / num_policies, device=device)
        self.eos = z(max(num_eos, 1)) - 1  # -1 matches no token
        self.out, self.seeds = z(rows, width), z(width)
        self.lp_sum = z(rows, num_policies, dtype=torch.float32)
        self.num_gen = z(rows)
        self.finished = z(rows, dtype=torch.bool)


class CapturedStep:
    """One bucket: its state, its step function and (on CUDA) its graph."""

    def __init__(self, policies: LeanPolicies, rows: int, width: int, sampling: dict, num_eos: int,
                 sample_backend: str | None):
        self.policies, self.sampling, self.backend = policies, dict(sampling), sample_backend
        self.device = policies.lean[0].device
        self.state = StepState(rows, policies.num_policies, width, num_eos, self.device)
        self.graph = None
        self.workspace: dict = {}  # the CPU sampler's reused scratch buffers

    @property
    def sampled(self) -> bool:
        return bool(self.sampling.get("do_sample")) and self.sampling.get("temperature", 1.0) != 0

    @property
    def device_seeds(self) -> bool:
        """Sampling draws its per-step seed from ``state.seeds`` on the device (the Triton sampler on CUDA);
        otherwise the eager sampler draws from the generator, exactly as the other decode paths do."""
        return self.sampled and self.device.type == "cuda" and _triton(self.backend)

    def sample_append(self, logits: torch.Tensor, generator=None) -> None:
        """Choose each row's token from ``logits [N, R, V]`` and record it (see the module docstring)."""
        s = self.state
        kw = dict(self.sampling)
        if self.device_seeds:
            kw["seed_tensor"] = s.seeds.index_select(0, s.step)  # this step's seed, read on the device
        else:
            kw["generator"] = generator
            kw["workspace"] = self.workspace
        tok, lp = mod_sample_unchecked(logits, s.w, backend=self.backend, **kw)
        live = ~s.finished
        tok = torch.where(live, tok, s.pad)
        s.lp_sum.add_(lp.masked_fill(s.finished[:, None], 0.0))
        s.num_gen.add_(live.long())
        s.out.index_copy_(1, s.step, tok[:, None])
        s.finished |= (tok[:, None] == s.eos[None, :]).any(1)
        s.tok.copy_(tok)
        for t in (s.pos, s.cur, s.length, s.step):
            t.add_(1)

    def step(self, generator=None) -> None:
        s = self.state
        self.sample_append(self.policies.decode(s.tok, s.pos, s.cur, s.starts, s.length), generator)

    def capture(self, pool) -> None:
        """Record :meth:`step` as a CUDA graph. The warm-up runs (kernel compilation, library handles) and the
        capture act on the state's dummy contents; every call then fills the state with real rows."""
        side = torch.cuda.Stream(device=self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.step()
        self.graph = graph

    def replay(self, generator=None) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:
            self.step(generator)


class CapturedDecoding:
    """Runs :meth:`MODDecoder.generate` on the captured step; keeps buckets (and graphs) between calls.

    ``capture``: record CUDA graphs (CUDA only; False runs the same step eagerly, e.g. to compare).
    ``check_every``: host checks for all-finished every this many steps (default: 16 when capturing, else 1).
    ``pad_rows``: round row counts up to a :func:`bucket` (default: on CUDA, where graphs are reused per bucket).
    """

    def __init__(self, policies: LeanPolicies, *, capture: bool = True, check_every: int | None = None,
                 sample_backend: str | None = None, pad_rows: bool | None = None):
        self.policies, self.sample_backend = policies, sample_backend
        dev = policies.lean[0].device
        # A graph needs host-sync-free ops: the Triton sampler and decode ops (the torch paths read values on the host)
        self.capture = (bool(capture) and dev.type == "cuda" and _triton(sample_backend)
                        and _triton(policies.lean[0].backend))
        self.check_every = int(check_every) if check_every is not None else (16 if self.capture else 1)
        if self.check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every!r}")
        self.pad_rows = dev.type == "cuda" if pad_rows is None else bool(pad_rows)
        self.steps: dict[tuple, CapturedStep] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.stats = {"captures": 0, "replays": 0}

    @property
    def num_policies(self) -> int:
        return self.policies.num_policies

    def _bucket(self, rows: int, width: int, sampling: dict, num_eos: int) -> CapturedStep:
        r = bucket(rows) if self.pad_rows else rows
        if self.policies.allocate(r, width):
            self.steps.clear()  # the caches moved: graphs recorded on the old ones are void
        key = (r, self.policies.width, num_eos) + tuple(sorted(sampling.items()))
        if key not in self.steps:
            st = CapturedStep(self.policies, r, self.policies.width, sampling, num_eos, self.sample_backend)
            if self.capture:
                try:
                    st.capture(self._pool)
                    self.stats["captures"] += 1
                except Exception as exc:  # the step itself ran (warm-up); only recording it failed
                    import warnings

                    warnings.warn(f"CUDA graph capture of the decode step failed ({type(exc).__name__}: {exc}); "
                                  "running the same step eagerly", RuntimeWarning, stacklevel=2)
                    st.graph, self.capture = None, False
                    torch.cuda.synchronize()
            self.steps[key] = st
        return self.steps[key]

    def release(self) -> None:
        """Free the graphs and caches (memory) until the next call."""
        self.steps.clear()
        self.policies.caches, self.policies.rows, self.policies.width = [], 0, 0

    def run(self, s_ids, s_mask, row_state, w, max_new_tokens: int, sampling: dict, generator, eos, pad):
        """Decode. ``s_ids/s_mask [U, Tp]`` distinct prompts, ``row_state [B]`` the prompt of each row, ``w
        [B, N]``. Returns ``(out [B, L], lp_sum [B, N], num_gen [B], finished [B])``."""
        b, (u, tp) = row_state.shape[0], s_ids.shape
        dev = s_ids.device
        width = round_up(tp + max_new_tokens, 64)
        sampling = {k: v for k, v in sampling.items() if k != "generator"}
        st = self._bucket(b, width, sampling, len(eos))
        r, s = st.state.tok.shape[0], st.state
        rows_state = torch.zeros(r, dtype=torch.long, device=dev)
        rows_state[:b] = row_state
        logits = self.policies.prefill(s_ids, s_mask, rows_state).index_select(1, rows_state)  # (N, R, V)
        plen = s_mask.long().sum(-1).index_select(0, rows_state)  # (R,) prompt tokens per row
        s.starts.copy_(tp - plen)
        s.pos.copy_(plen - 1)
        s.cur.fill_(tp - 1)
        s.length.fill_(tp)
        s.step.zero_()
        s.w[:b] = w
        s.w[b:] = 0.0
        s.w[b:, 0] = 1.0  # padding rows: a valid one-hot weight; they start finished
        s.finished.zero_()
        s.finished[b:] = True
        s.num_gen.zero_()
        s.lp_sum.zero_()
        s.pad.fill_(pad)
        s.eos.fill_(-1)
        if eos:
            s.eos[: len(eos)] = torch.tensor(eos, dtype=torch.long, device=dev)
        if st.device_seeds:
            s.seeds[:max_new_tokens] = torch.randint(0, 2**31 - 1, (max_new_tokens,), generator=generator).to(dev)
        st.sample_append(logits, generator)
        for i in range(1, max_new_tokens):
            if i % self.check_every == 0 and bool(s.finished.all()):
                break
            st.replay(generator)
            self.stats["replays"] += 1
        num = s.num_gen[:b].clone()
        length = int(num.max())
        return s.out[:b, :length].clone(), s.lp_sum[:b].clone(), num, s.finished[:b].clone()
