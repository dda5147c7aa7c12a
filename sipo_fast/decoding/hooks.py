"""transformers' per-step hooks on the eager MOD decode loop: logits processors, stopping criteria, a streamer,
and the per-step scores of ``return_dict_in_generate``.

Logits processors see the **mixed** logits: at each step, for the B rows of the batch,

    z_b = Σ_i w_bi · logits_i[b]               (float32, raw: :func:`sipo_fast.ops.mod.mod_logits`)
    scores = processors(input_ids [B, T + t], z)                    (transformers' call, whole batch)
    tok_b = argmax scores_b, or a draw from softmax(scores_b / τ) after top-k then top-p

so for a one-hot weight a processor sees exactly the logits it would see in that policy's own ``generate``
(transformers also hands processors float32 logits), and greedy decoding matches it token for token. The
per-policy log-probs stay those of the unprocessed policies (implicit rewards score π_i, not the processors).
``input_ids`` holds each row's left-padded prompt and its tokens so far, padded after its end, and rows that
have finished get zeros as scores: transformers' whole-batch convention, so stateful processors and
criteria see the batch they expect. ``repetition_penalty`` and ``min_new_tokens`` are transformers' own
processors, in transformers' order (before the caller's; a caller's processor of the same type replaces one).
"""
from __future__ import annotations

import inspect
import warnings

import torch

from sipo_fast.ops.mod import mod_logits_unchecked, mod_sample_unchecked, policy_token_logprobs

_warned: set[str] = set()


def warn_eager(options: list[str], path: str) -> None:
    """Say once per option that it runs the eager loop: the fused mix-and-sample step (and the captured step,
    which replays whole steps on the device) cannot call Python between the mix and the choice."""
    new = [o for o in options if o not in _warned]
    if not new:
        return
    _warned.update(new)
    where = "the captured step falls back to the next decode path and " if path == "static" else ""
    warnings.warn(f"MODDecoder.generate({', '.join(new)}): {where}each step mixes, runs the hook in Python and then "
                  "chooses, instead of the fused mix-and-sample op (slower; results are exact)", RuntimeWarning,
                  stacklevel=3)


def _merged(defaults: list, custom) -> list:
    """transformers' merge of built-in and caller processors/criteria: a caller's object replaces a built-in one
    of the same type in place; the rest of the caller's follow."""
    custom = list(custom or [])
    out = [next((c for c in custom if type(c) is type(d)), d) for d in defaults]
    return out + [c for c in custom if not any(c is o for o in out)]


def _repetition_penalty(penalty: float, mask: torch.Tensor):
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    if "prompt_ignore_length" in inspect.signature(RepetitionPenaltyLogitsProcessor).parameters:
        # transformers >= 5.x skips each row's left padding, as its generate() asks
        return RepetitionPenaltyLogitsProcessor(float(penalty), prompt_ignore_length=(mask != 0).int().argmax(dim=1))
    return RepetitionPenaltyLogitsProcessor(float(penalty))


class StepHooks:
    """The hooks of one ``generate`` call; :meth:`build` returns None when the call needs none."""

    def __init__(self, prompt_ids: torch.Tensor, processors: list, criteria: list, streamer, keep_scores: bool,
                 keep_logits: bool, sample_backend):
        from transformers import LogitsProcessorList, StoppingCriteriaList

        self.ids = prompt_ids
        self.processors = LogitsProcessorList(processors) if processors else None
        self.criteria = StoppingCriteriaList(criteria) if criteria else None
        self.streamer, self.keep_scores, self.keep_logits = streamer, keep_scores, keep_logits
        self.backend = sample_backend
        self.scores: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []
        self._last = None

    @classmethod
    def build(cls, opts, ids, mask, eos: list[int], *, logits_processor=None, stopping_criteria=None, streamer=None,
              tokenizer=None, sample_backend=None):
        """``(hooks or None, names of the options that need them)``."""
        defaults, needs = [], []
        if opts.repetition_penalty != 1.0:
            defaults.append(_repetition_penalty(opts.repetition_penalty, mask))
            needs.append("repetition_penalty")
        if opts.min_new_tokens > 0 and eos:
            from transformers.generation.logits_process import MinNewTokensLengthLogitsProcessor

            defaults.append(MinNewTokensLengthLogitsProcessor(ids.shape[1], opts.min_new_tokens,
                                                              torch.tensor(eos, device=ids.device)))
            needs.append("min_new_tokens")
        if logits_processor:
            needs.append("logits_processor")
        criteria = []
        if opts.stop_strings is not None:
            if tokenizer is None:
                raise ValueError("stop_strings needs a tokenizer: MODDecoder(policies, tokenizer) or tokenizer=...")
            from transformers.generation.stopping_criteria import StopStringCriteria

            criteria.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=opts.stop_strings))
            needs.append("stop_strings")
        if stopping_criteria:
            needs.append("stopping_criteria")
        needs += [n for n, v in (("streamer", streamer is not None), ("output_scores", opts.output_scores),
                                 ("output_logits", opts.output_logits)) if v]
        if not needs:
            return None, []
        hooks = cls(ids, _merged(defaults, logits_processor), _merged(criteria, stopping_criteria), streamer,
                    opts.output_scores, opts.output_logits, sample_backend)
        return hooks, needs

    def start(self) -> None:
        if self.streamer is not None:
            self.streamer.put(self.ids.cpu())

    def choose(self, logits: torch.Tensor, w: torch.Tensor, active: torch.Tensor, out: torch.Tensor, step: int,
               sampling: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """One step for the active rows: ``logits [N, A, V]``, ``w [A, N]``, ``active [A]`` row ids, ``out [B, L]``
        the tokens so far. Returns ``tokens [A]`` and the per-policy log-probs ``[A, N]``."""
        z = mod_logits_unchecked(logits, w, backend=self.backend)  # [A, V]
        full = z.new_zeros((out.shape[0], z.shape[1]))  # [B, V]; finished rows: zeros
        full[active] = z
        if self.keep_logits:
            self.logits.append(full.clone())
        scores = full
        if self.processors is not None:
            scores = self.processors(torch.cat([self.ids, out[:, :step]], dim=1), full)
        self._last = scores
        if self.keep_scores:
            self.scores.append(scores)
        mixed = scores.index_select(0, active)[None]  # [1, A, V]: one "policy" at weight 1 is z itself
        ones = torch.ones((active.numel(), 1), dtype=torch.float32, device=z.device)
        tok, _ = mod_sample_unchecked(mixed, ones, backend=self.backend, **sampling)
        return tok, policy_token_logprobs(logits, tok)

    def stopped(self, out: torch.Tensor, step: int, active: torch.Tensor) -> torch.Tensor | None:
        """[A] bool: which active rows a stopping criterion ends after this step's token (None: no criteria)."""
        if self.criteria is None:
            return None
        done = self.criteria(torch.cat([self.ids, out[:, :step + 1]], dim=1), self._last)  # [B]
        return done.to(active.device).index_select(0, active)

    def put(self, out: torch.Tensor, step: int) -> None:
        if self.streamer is not None:
            self.streamer.put(out[:, step].cpu())

    def end(self) -> None:
        if self.streamer is not None:
            self.streamer.end()
