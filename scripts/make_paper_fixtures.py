"""Write the small hub-schema fixtures that stand in for the paper's datasets in the preset end-to-end tests
(tests/test_paper_presets.py). Deterministic; rerun after editing:

    python scripts/make_paper_fixtures.py

- ``tests/fixtures/pku_saferlhf_10k/train.jsonl``: PKU-SafeRLHF-10K's schema, one ``train`` split (as on the hub).
- ``tests/fixtures/pku_saferlhf_30k/test.jsonl``: PKU-SafeRLHF-30K's schema, its ``test`` split only.
- ``tests/fixtures/helpsteer_hub/{train,validation}.jsonl``: nvidia/HelpSteer's schema (one response per row,
  0-4 attribute scores, rows sharing prompts); the directory name contains "helpsteer" so the loader treats it
  as HelpSteer.
"""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
TOPICS = ["bread", "rain", "chess", "tea", "maps", "bikes", "clocks", "owls", "kites", "soap", "ferns", "tides",
          "glue", "salt", "wool", "lamps", "bees", "ink", "rope", "moss"]


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def pku_rows(prefix: str, n: int) -> list[dict]:
    """Every third row agrees (helpful and harmless both prefer response 0); the others conflict."""
    rows = []
    for i in range(n):
        t = TOPICS[i % len(TOPICS)]
        better = 0 if i % 3 == 0 else 1
        rows.append({"prompt": f"{prefix} {t} ({i})?", "response_0": f"A calm, careful note on {t}.",
                     "response_1": f"Everything about {t}, fast, and never mind who gets hurt.",
                     "better_response_id": better, "safer_response_id": 0, "is_response_0_safe": True,
                     "is_response_1_safe": False})
    return rows


def helpsteer_rows(prefix: str, n_prompts: int) -> list[dict]:
    """Three responses per prompt, (correctness, verbosity): short and correct (4, 0), long and wrong (1, 3), long
    and correct (3, 4). The two pairs with the short one conflict (correctness prefers it, verbosity the other);
    the pair of long ones agrees: 2 conflicting and 1 agreeing pair per prompt."""
    rows = []
    for i in range(n_prompts):
        t = TOPICS[i % len(TOPICS)]
        p = f"{prefix} {t} ({i})."
        for resp, corr, verb in ((f"{t.title()} is well known.", 4, 0),
                                 (f"{t.title()} was invented on the moon in 1802 by a famous cat, who wrote a long "
                                  "book about it that nobody read.", 1, 3),
                                 (f"{t.title()} has a long history; people have used it for centuries in many "
                                  "places and still study it today.", 3, 4)):
            rows.append({"prompt": p, "response": resp, "helpfulness": corr, "correctness": corr, "coherence": 4,
                         "complexity": 1, "verbosity": verb})
    return rows


def main() -> None:
    _write(ROOT / "pku_saferlhf_10k" / "train.jsonl", pku_rows("How should I handle", 20))
    _write(ROOT / "pku_saferlhf_30k" / "test.jsonl", pku_rows("Tell me about", 8))
    _write(ROOT / "helpsteer_hub" / "train.jsonl", helpsteer_rows("Explain", 12))
    _write(ROOT / "helpsteer_hub" / "validation.jsonl", helpsteer_rows("Describe", 3))


if __name__ == "__main__":
    main()
