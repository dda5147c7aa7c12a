"""One-shot prompts of the refinement step (SIPO.md §3, stage 2.2), as named template sets (``refine.template``).

Review: "Question / Response / suggestions to make the response more <objective words>", answered by one
policy (w_e one-hot). Rewrite: "Question / Response / Review", answered by MOD at the candidate's own w.

- ``"default"``: written for this project (two short numbered suggestions, prefix "1."), with a helpful/harmless
  or a factual one-shot example picked by the objectives; small models follow it.
- ``"sipo-helpsteer"``: the authors' HelpSteer prompts (github.com/zyttt-coder/SIPO, scripts/SIPO/review.py and
  rewrite.py), reproduced exactly: three suggestions to make the response "more correct and verbose", the answer
  opened with "The response can be more correct and verbose by", one-shot examples on Mediterranean trade (review)
  and dill (rewrite). Rendered with the beaver format ``BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:``
  (the helpsteer preset's ``model.template``) they give the authors' strings character for character.

Each template is a plain body with ``{question}``, ``{response}`` (and ``{review}``) that becomes the *user*
turn, so it goes through the model's prompt template like any other prompt (chat template or a format
string). The review's assistant turn is opened with the set's prefix, which the model continues; the stored
review is prefix + continuation, cut at the set's stop markers (as the authors' ``split("Question:")[0]``).
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
_DEFAULT_STOPS = ("\nQuestion:", "\nRevised response:", "\nReview:", "\nSuggestions:")

# The authors' HelpSteer set (scripts/SIPO/review.py TEMPLATE, scripts/SIPO/rewrite.py PROMPT): their text, split
# into its parts; the bodies below are their strings between "USER: " and the final " ASSISTANT:".
_MED_QUESTION = (
    "What is the history of shipping and trade in the Mediterranean region, and how has it changed"
    " over time?"
)
_MED_RESPONSE = (
    "The Mediterranean region has a long and rich history of shipping and trade, dating back to"
    " ancient times. In the early days, the region was a hub of trade and commerce, with goods and"
    " people traveling between different parts of the world. Over time, the region has undergone"
    " significant changes, with the rise of new powers and the development of new technologies."
    " Today, the Mediterranean region is still an important center of trade and commerce, with a"
    " diverse range of goods and services being traded between different countries. However, the"
    " region has also faced significant challenges in recent years, including political instability,"
    " economic difficulties, and environmental degradation. These challenges have led to a decline in"
    " shipping and trade in the region, but there are also efforts underway to revitalize the"
    " region's economy and promote sustainable development."
)
_MED_REVIEW = (
    "Add Specific Examples - Include simple examples of civilizations like the Greeks, Romans, or"
    " Phoenicians to show their role in Mediterranean trade.\nExplain Key Changes Clearly - Break down"
    " major changes in shipping technology and trade methods into clear, easy-to-understand"
    " points.\nClarify Modern Challenges - Use straightforward language to describe current issues"
    " such as political instability and environmental concerns affecting trade."
)
_DILL_QUESTION = (
    "What is the most common use for dill in home cooking?"
)
_DILL_RESPONSE = (
    "Dill is a versatile herb that can be used in a variety of dishes to add flavor and aroma. It is"
    " commonly used in Indian, Middle Eastern, and Scandinavian cuisines, and is often used to flavor"
    " soups, stews, and curries. Dill is also used to make pickles, sauces, and marinades, and is a"
    " popular ingredient in many vegetarian and vegan dishes. In addition to its culinary uses, dill"
    " is also known for its medicinal properties, and is often used to treat digestive issues,"
    " respiratory problems, and skin conditions."
)
_DILL_REVIEW = (
    "The response can be more correct and verbose by\nIncluding specific recipes that use dill as a"
    " main ingredient or flavor enhancer.\nExplaining the history and cultural significance of dill in"
    " different cuisines.\nDescribing the medicinal properties of dill and its use in traditional"
    " medicine."
)
_DILL_REWRITE = (
    "Dill is a versatile herb widely used in home cooking for its fresh, slightly tangy flavor and"
    " aromatic qualities. One of its most common uses is in making pickles, where its distinct taste"
    " enhances the brine. It is also frequently used in soups, stews, and sauces, such as the classic"
    " Greek tzatziki, Scandinavian gravlax sauce, and Russian dill-infused borscht. In Middle Eastern"
    " and Indian cuisines, dill is often added to rice dishes, curries, and yogurt-based dips.\nBeyond"
    " its culinary applications, dill has a long history of use in traditional medicine. Ancient"
    " Egyptians and Greeks valued it for its digestive benefits, and it has been used to alleviate"
    " bloating, indigestion, and colic. Dill also contains compounds with antimicrobial and"
    " anti-inflammatory properties, making it a natural remedy for respiratory and skin"
    " conditions.\nOverall, dill's unique flavor and health benefits make it a staple in kitchens"
    " worldwide, enhancing both traditional and contemporary dishes. "
)
_SIPO_REVIEW_ASK = "Generate three suggestions on how to make the response more correct and verbose."
_SIPO_REVIEW_PREFIX = "The response can be more correct and verbose by\n"
_SIPO_REWRITE_ASK = "Revise the 'Response' based on the 'Review' to improve its correctness and verbosity."
_SIPO_REVIEW_BODY = (f"Question: {_MED_QUESTION}\nResponse: {_MED_RESPONSE}\n{_SIPO_REVIEW_ASK}\nASSISTANT:"
                     f"{_SIPO_REVIEW_PREFIX}{_MED_REVIEW}\n\n\nQuestion: {{question}}\nResponse: {{response}}\n"
                     f"{_SIPO_REVIEW_ASK}")
_SIPO_REWRITE_BODY = (f"Question: {_DILL_QUESTION}\nResponse: {_DILL_RESPONSE}\nReview: {_DILL_REVIEW}\n"
                      f"{_SIPO_REWRITE_ASK}\nASSISTANT:{_DILL_REWRITE}\n\n\nQuestion: {{question}}\n"
                      f"Response: {{response}}\nReview: {{review}}\n{_SIPO_REWRITE_ASK}")


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
    """The review and rewrite bodies in use (``{question}``, ``{response}``, ``{review}`` placeholders), the
    prefix that opens the review's answer and the markers where a generation is cut."""

    review: str
    rewrite: str
    review_prefix: str = REVIEW_PREFIX
    stops: tuple[str, ...] = _DEFAULT_STOPS

    @classmethod
    def for_config(cls, objectives: list[str], review: str | None, rewrite: str | None,
                   name: str = "default") -> "RefinePrompts":
        """The named set (``refine.template``), with ``review``/``rewrite`` bodies replacing its own if given."""
        if name not in TEMPLATE_SETS:
            raise ValueError(f"refine.template={name!r}: choose one of {', '.join(TEMPLATE_SETS)}")
        base = TEMPLATE_SETS[name](objectives)
        return cls(review or base.review, rewrite or base.rewrite, base.review_prefix, base.stops)

    def review_prompt(self, question: str, response: str) -> str:
        return _fill(self.review, question=question, response=response)

    def rewrite_prompt(self, question: str, response: str, review: str) -> str:
        return _fill(self.rewrite, question=question, response=response, review=review)

    def review_text(self, generated: str) -> str:
        """The stored review: the prefix the answer was opened with, its continuation, cut at a stop marker."""
        sep = "" if self.review_prefix[-1:].isspace() else " "
        return self.clean(self.review_prefix + sep + (generated.lstrip() if sep else generated))

    def clean(self, text: str) -> str:
        return clean_generation(text, self.stops)


def _default_set(objectives: list[str]) -> RefinePrompts:
    return RefinePrompts(*default_templates(objectives))


def _sipo_helpsteer_set(objectives: list[str]) -> RefinePrompts:
    # The authors' words are fixed ("correct and verbose"), whatever the objectives are called.
    return RefinePrompts(_SIPO_REVIEW_BODY, _SIPO_REWRITE_BODY, _SIPO_REVIEW_PREFIX, ("Question:",))


# refine.template names (config/sections.py lists them for its check) -> the set for the objectives.
TEMPLATE_SETS = {"default": _default_set, "sipo-helpsteer": _sipo_helpsteer_set}


_PLACEHOLDER = re.compile(r"\{(question|response|review)\}")


def _fill(template: str, **values: str) -> str:
    # One pass, not str.format or chained replace: user text may itself contain braces or "{response}",
    # which must stay literal, and other braces in a user-supplied template are left alone.
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def clean_generation(text: str, stops: tuple[str, ...] = _DEFAULT_STOPS) -> str:
    """Cut a generation where a small model starts a new example ("Question:", "Review:", ...) and strip it."""
    for marker in stops:
        cut = text.find(marker)
        if cut >= 0:
            text = text[:cut]
    return text.strip()
