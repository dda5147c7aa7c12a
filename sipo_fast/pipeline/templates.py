"""One-shot prompts of the refinement step (SIPO.md §3, stage 2.2), written for this project.

Review: "Question / Response / suggestions to make the response more <objective words>", answered by one
policy (w_e one-hot). Rewrite: "Question / Response / Review", answered by MOD at the candidate's own w.

Each template is a plain body with ``{question}``, ``{response}`` (and ``{review}``) that becomes the *user*
turn, so it goes through the model's prompt template like any other prompt (chat template or a format
string). The review's assistant turn is opened with a short prefix that the model continues, which keeps
small models on task; the prefix is not part of the stored review.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

# Words used in "make the response more ..." for the objectives the presets use; others use their name.
OBJECTIVE_WORDS = {"helpful": "helpful", "harmless": "harmless", "correctness": "correct",
                   "verbosity": "detailed", "helpfulness": "helpful", "coherence": "coherent",
                   "complexity": "sophisticated"}

# One-shot examples: short on purpose, since every review and rewrite prompt carries one (prefill cost), yet
# specific enough that a small model copies the form (numbered suggestions; a revised answer only).
_HH_EXAMPLE = dict(
    question="How can I get back at my neighbour for always taking my parking spot?",
    response="Let the air out of his tyres so he learns his lesson.",
    review="1. Do not suggest damaging property: it is illegal and escalates the conflict.\n"
           "2. Give steps that solve the problem: a polite note, a calm talk, or asking the landlord.",
    rewrite="That is frustrating. Leave a friendly note or talk to him calmly; he may not know the spot is "
            "yours. If it continues, ask your landlord to mark and enforce the spots.",
)

_CV_EXAMPLE = dict(
    question="Why is the sky blue?",
    response="Because it reflects the ocean.",
    review="1. Correct the cause: air molecules scatter sunlight (Rayleigh scattering), not the ocean.\n"
           "2. Explain that blue light scatters far more than red, and why sunsets look red.",
    rewrite="Sunlight holds every colour, and air molecules scatter short blue wavelengths much more than long "
            "red ones (Rayleigh scattering), so blue light reaches us from the whole sky. At sunset the light "
            "crosses more air, the blue is scattered away, and reds and oranges remain.",
)

_REVIEW_BODY = (
    "Give two short suggestions that would make the response more {words}.\n\n"
    "Question: {ex_question}\nResponse: {ex_response}\nSuggestions:\n{ex_review}\n\n"
    "Question: {{question}}\nResponse: {{response}}\nSuggestions:"
)
_REWRITE_BODY = (
    "Revise the response following the review, so that it becomes more {words}. Reply with the revised "
    "response only.\n\nQuestion: {ex_question}\nResponse: {ex_response}\nReview:\n{ex_review}\n"
    "Revised response: {ex_rewrite}\n\nQuestion: {{question}}\nResponse: {{response}}\nReview:\n{{review}}\n"
    "Revised response:"
)
REVIEW_PREFIX = "1."


def objective_words(objectives: list[str]) -> str:
    """"helpful and harmless", "correct, detailed and coherent", ..."""
    words = [OBJECTIVE_WORDS.get(o, o.replace("_", " ")) for o in objectives]
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def _example_for(objectives: list[str]) -> dict:
    # Safety-flavoured objectives get the harmful-request example, the rest the factual one.
    return _HH_EXAMPLE if {"harmless", "safe", "safety"} & set(objectives) else _CV_EXAMPLE


def default_templates(objectives: list[str]) -> tuple[str, str]:
    """(review template, rewrite template) for the objectives: helpful/harmless and correctness/verbosity
    get their own one-shot examples; any other set gets the closest one with its own words."""
    ex = _example_for(objectives)
    fill = dict(words=objective_words(objectives), ex_question=ex["question"], ex_response=ex["response"],
                ex_review=ex["review"], ex_rewrite=ex["rewrite"])
    return _REVIEW_BODY.format(**fill), _REWRITE_BODY.format(**fill)


@dataclass
class RefinePrompts:
    """The review and rewrite bodies in use (``{question}``, ``{response}``, ``{review}`` placeholders)."""

    review: str
    rewrite: str

    @classmethod
    def for_config(cls, objectives: list[str], review: str | None, rewrite: str | None) -> "RefinePrompts":
        d_review, d_rewrite = default_templates(objectives)
        return cls(review or d_review, rewrite or d_rewrite)

    def review_prompt(self, question: str, response: str) -> str:
        return _fill(self.review, question=question, response=response)

    def rewrite_prompt(self, question: str, response: str, review: str) -> str:
        return _fill(self.rewrite, question=question, response=response, review=review)


_PLACEHOLDER = re.compile(r"\{(question|response|review)\}")


def _fill(template: str, **values: str) -> str:
    # One pass, not str.format or chained replace: user text may itself contain braces or "{response}",
    # which must stay literal, and other braces in a user-supplied template are left alone.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def clean_generation(text: str) -> str:
    """Cut a generation where a small model starts a new example ("Question:", "Review:", ...) and strip it."""
    for marker in ("\nQuestion:", "\nRevised response:", "\nReview:", "\nSuggestions:"):
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text.strip()
