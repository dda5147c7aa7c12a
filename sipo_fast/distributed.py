"""Several processes (``accelerate launch`` / ``torchrun``): who does what, and how shards merge.

A pipeline started under ``accelerate launch --num_processes P`` (or ``torchrun --nproc_per_node P``) runs
every stage in all P processes:

- **generation and scoring** (sample, refine, filter, evaluation) split their work into the same batches a
  single process would run, and give batch ``k`` to rank ``k mod P``. Every batch therefore holds the same
  rows, padded the same way (and, when sampling, seeded the same way) as in one process, so after the
  shards are gathered every rank holds exactly what one process computes: same rows, same order, same
  greedy tokens, same rewards;
- **training** (align, finetune) runs TRL's trainer, which does data parallelism (DDP, DeepSpeed ZeRO or
  FSDP, whatever the accelerate config says) across the ranks;
- **writing** is rank 0's alone (manifest, config.yaml, every artifact file); the other ranks wait for it at
  a barrier and then read what it wrote, so the run directory must be on a filesystem every node sees.

With one process (no ``WORLD_SIZE`` > 1 in the environment) nothing here initialises anything and every
helper is the identity: single-process runs behave exactly as before.
"""
from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

_CURRENT: "Dist | None" = None


@dataclass
class Dist:
    """The process's place in the job: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # this rank's accelerator (cuda:<local_rank>), None on CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    # -- collectives (no-ops with one process) -----------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only and return its result on every rank. An exception on rank 0 is raised on
        every rank (as the same type when it can be rebuilt from its message, else RuntimeError), so the other
        ranks never wait at a barrier for a rank that has failed."""
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # noqa: BLE001 - re-raised below, on every rank
                error = (type(exc), str(exc))
        result, error = self.broadcast((result, error))
        if error is not None:
            kind, message = error
            try:
                exc = kind(message)
            except Exception:  # noqa: BLE001 - an exception type that wants other arguments
                exc = RuntimeError(f"{kind.__name__}: {message}")
            raise exc
        return result

    # -- sharding ---------------------------------------------------------------------------------------
    def mine(self, num_units: int) -> list[int]:
        """The units (batches) this rank runs out of ``num_units``: ``k`` with ``k mod world == rank``.
        Strided rather than contiguous, so length-sorted batches spread their cost over the ranks."""
        return list(range(self.rank, num_units, self.world))

    def merge(self, shard: dict[int, Any], num_units: int) -> list:
        """Gather every rank's ``{unit: result}`` and return the results of all units in unit order."""
        if not self.enabled:
            return [shard[k] for k in range(num_units)]
        merged: dict[int, Any] = {}
        for part in self.all_gather(shard):
            merged.update(part)
        missing = [k for k in range(num_units) if k not in merged]
        if missing:
            raise RuntimeError(f"distributed merge: units {missing[:8]} came back from no rank; every rank must split the "
                               "same number of units (same inputs and batch size on every rank)")
        return [merged[k] for k in range(num_units)]


def current() -> Dist:
    """This process's :class:`Dist`, set up on first use from the launcher's environment.

    ``WORLD_SIZE`` > 1 (set by ``accelerate launch`` and ``torchrun``) initialises the process group through
    accelerate's ``PartialState`` (NCCL on GPUs, gloo on CPU; ``ACCELERATE_USE_CPU`` is set on CPU so that
    the trainers' own accelerate state also takes the multi-CPU path); otherwise one process, no setup.
    """
    global _CURRENT
    if _CURRENT is None:
        _CURRENT = _from_env()
    return _CURRENT


def _from_env() -> Dist:
    raw = os.environ.get("WORLD_SIZE", "1") or "1"
    if not raw.strip().isdigit():
        raise ValueError(f"WORLD_SIZE={raw!r} is not a process count; unset it, or start with accelerate launch / "
                         "torchrun, which set it")
    world = int(raw)
    if world <= 1:
        return Dist()
    from accelerate import PartialState

    cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    state = PartialState(cpu=cpu)
    atexit.register(_destroy_process_group)
    # Keep plain numbers: the trainers may reset accelerate's shared state (TrainingArguments does), the
    # process group stays.
    device = state.device if state.device is not None and state.device.type == "cuda" else None
    return Dist(rank=int(state.process_index), world=int(state.num_processes),
                local_rank=int(state.local_process_index), device=device)


def _destroy_process_group() -> None:
    """Tear the process group down at exit, while the interpreter is still whole.

    Left alone, its C++ side (gloo's connections and their threads) is destroyed during interpreter
    finalisation, and there a rank that has finished all its work can die with ``terminate called without an
    active exception`` (SIGABRT), failing the whole launch: seen under load on 2 CPU cores, about 1 run in 50
    (issue 17; rank 0's stderr showed the abort with no Python frame left on its main thread)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def end_process(code: int) -> None:
    """End a launched rank (``WORLD_SIZE`` > 1) with ``code`` once its work is done, without interpreter
    finalisation; a single process returns and exits as usual.

    Every ``atexit`` handler runs first (ours tears the process group down; a logger's or a tracker's flushes),
    then the streams and logging are flushed and the process exits with ``os._exit``. What this skips is the
    destruction of the C++ statics and threads at finalisation, where a rank that had finished all its work
    still aborted now and then with ``terminate called without an active exception`` (SIGABRT) even with the
    process group destroyed at exit: once in the suite on 2 loaded cores, failing the whole launch."""
    if _CURRENT is None or _CURRENT.world <= 1:
        return
    import logging

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def set_current(dist: Dist | None) -> None:
    """Replace the process's :class:`Dist` (tests; None: detect again from the environment)."""
    global _CURRENT
    _CURRENT = dist


# ---------------------------------------------------------------------------------------------------------------
# sharded work


def generate_text(decoder, prompts: Sequence[str], *, dist: Dist | None = None, **kwargs) -> list:
    """``decoder.generate_text(prompts, **kwargs)`` split over the ranks: each rank decodes the batches
    ``generate_text`` would give it (``shard=(rank, world)``: same length-sorted batches, same per-batch
    seeds), then the outputs are gathered, so every rank returns the single-process result."""
    dist = dist or current()
    if not dist.enabled:
        return decoder.generate_text(list(prompts), **kwargs)
    if not dist.is_main:
        kwargs["progress"] = False
    outs = decoder.generate_text(list(prompts), shard=(dist.rank, dist.world), **kwargs)
    mine = {i: o for i, o in enumerate(outs) if o is not None}
    return dist.merge(mine, len(outs))


def batched(num_rows: int, batch_size: int, fn: Callable[[int, int], Any], *, dist: Dist | None = None) -> list:
    """Results of ``fn(start, stop)`` for the batches [start, stop) of ``batch_size`` rows over ``num_rows``
    rows, in batch order; with several ranks each runs its batches (:meth:`Dist.mine`) and the results are
    gathered. The batches are the single-process ones, so per-row results are the same bit for bit."""
    dist = dist or current()
    starts = list(range(0, num_rows, batch_size))
    done = {k: fn(starts[k], min(num_rows, starts[k] + batch_size)) for k in dist.mine(len(starts))}
    return dist.merge(done, len(starts))
