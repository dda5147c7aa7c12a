"""How a (prompt, response) pair becomes tokens: the one convention every stage shares.

A prompt is rendered by a template (the tokenizer's chat template by default, or a format string such as
the Alpaca/beaver ``"BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"``), tokenised without special
tokens added twice, and the response's ids are appended followed by EOS. Prompt and response are tokenised
separately and concatenated, exactly as generation produces them, so log-probs computed here match the
tokens a decoder emitted.
"""
from __future__ import annotations

import torch

CHAT = "chat"
NONE = "none"


def format_prompt(tokenizer, prompt: str, template: str = CHAT) -> str:
    """Render one user prompt. ``template``: "chat", "none", or a format string containing ``{prompt}``."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("empty prompt: every prompt needs some text")
    if template == CHAT:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("template='chat' but the tokenizer has no chat template; pass template='none' "
                             "or a format string with {prompt}")
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if template == NONE:
        return prompt
    if "{prompt}" not in template:
        raise ValueError(f"prompt template {template!r} must be 'chat', 'none' or contain '{{prompt}}'")
    return template.format(prompt=prompt)


def encode_prompts(tokenizer, prompts: list[str], template: str = CHAT, *, max_length: int | None = None) -> list[list[int]]:
    """Token ids of each rendered prompt (no padding). Raises ValueError for a prompt longer than max_length."""
    ids = [tokenizer(format_prompt(tokenizer, p, template), add_special_tokens=False)["input_ids"] for p in prompts]
    if max_length is not None:
        for i, row in enumerate(ids):
            if len(row) >= max_length:
                raise ValueError(f"prompt {i} has {len(row)} tokens, which leaves no room for a response within "
                                 f"max_length={max_length}; shorten it or raise max_length")
    return ids


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad id lists for generation: ``(input_ids [B,T], attention_mask [B,T])``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
    return ids, mask


def encode_pairs(tokenizer, prompts: list[str], responses: list[str], template: str = CHAT, *,
                 max_length: int = 512, add_eos: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``response_mask`` [B,T] for prompt+response(+EOS).

    ``response_mask`` is 1 on response tokens (EOS included), 0 on prompt and padding: the tokens whose
    log-probabilities make log π(y|x) (SIPO.md §2). Responses are truncated to fit ``max_length``; a prompt
    that alone fills ``max_length`` raises ValueError.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_ids = encode_prompts(tokenizer, prompts, template, max_length=max_length)
    eos = [tokenizer.eos_token_id] if add_eos else []
    rows, spans = [], []
    for p, r in zip(prompt_ids, responses):
        resp = tokenizer(r, add_special_tokens=False)["input_ids"] + eos
        resp = resp[: max_length - len(p)]
        rows.append(p + resp)
        spans.append((len(p), len(p) + len(resp)))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = {k: torch.zeros((len(rows), width), dtype=torch.long) for k in ("input_ids", "attention_mask", "response_mask")}
    out["input_ids"].fill_(pad)
    for i, (row, (a, b)) in enumerate(zip(rows, spans)):
        out["input_ids"][i, : len(row)] = torch.tensor(row)
        out["attention_mask"][i, : len(row)] = 1
        out["response_mask"][i, a:b] = 1
    return out
