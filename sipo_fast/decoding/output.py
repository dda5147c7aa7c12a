"""What the MOD decoder returns."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class MODOutput:
    """Result of :meth:`MODDecoder.generate` for a batch of B rows and N policies.

    Attributes:
        sequences: [B, T + L] int64, the (left-padded) prompt followed by the generated tokens, padded with
            ``pad_token_id`` after each row's EOS, like ``transformers`` ``generate``; L is the longest
            generation in the batch.
        logprobs: [B, N] float32. For each policy i, Σ over the generated tokens (EOS included) of
            log π_i(token | prefix) at temperature 1 without top-k/top-p: the log π_i(y|x) of SIPO's
            implicit rewards r_i = β·(log π_i(y|x) − log π_ref(y|x)).
        num_generated: [B] int64, generated tokens per row, EOS included.
        finished: [B] bool, True where the row ended by itself: at EOS, or where a stopping criterion or stop
            string ended it (False: it hit ``max_new_tokens``).
        prompt_length: T, the width of the prompt part of ``sequences``.
        scores: with ``output_scores=True``, one [B, V] float32 tensor per generated position: the mixed logits
            after the logits processors, before temperature/top-k/top-p (transformers' ``scores`` for greedy
            decoding); rows that had already finished hold zeros. Otherwise None.
        logits: with ``output_logits=True``, the same for the raw mixed logits Σ_i w_i · logits_i, before any
            processor. Otherwise None.
        stopped_at_eos: [B] bool, True where the last generated token is an EOS (default: ``finished``).
    """

    sequences: torch.Tensor
    logprobs: torch.Tensor
    num_generated: torch.Tensor
    finished: torch.Tensor
    prompt_length: int
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    stopped_at_eos: torch.Tensor | None = None

    def __post_init__(self):
        if self.stopped_at_eos is None:
            self.stopped_at_eos = self.finished

    @property
    def generated(self) -> torch.Tensor:
        """[B, L] generated tokens (EOS included, then padding)."""
        return self.sequences[:, self.prompt_length:]

    def generated_ids(self, row: int, *, include_eos: bool = False) -> list[int]:
        """Token ids generated for one row, without padding (and without the EOS unless asked)."""
        n = int(self.num_generated[row])
        if self.stopped_at_eos[row] and not include_eos:
            n -= 1
        return self.generated[row, :n].tolist()


@dataclass
class MODTextOutput:
    """One prompt's result from :meth:`MODDecoder.generate_text`.

    ``text`` is the decoded response (no EOS, no padding); ``token_ids`` its ids (EOS excluded);
    ``logprobs`` the N policies' log π_i(y|x), summed through the EOS when ``finished``; ``weights`` the
    MOD weights used.
    """

    prompt: str
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    weights: list[float]
