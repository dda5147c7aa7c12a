"""The demo's gates on a run directory, with the library's functions (:mod:`sipo_fast.eval.gates`):

    python scripts/demo_gates.py RUN_DIR [--sweep SWEEP.json] [--json OUT.json]

- G1: the within-pair correlation of Δrelevance and Δtone on the shipped demo data (all rows, and the rows of
  the run's stage-1 training split).
- G3 (first half): each stage-1 policy's implicit-reward accuracy, r_k = β·(log π_k − log π_ref), on its own
  objective's preferences, over (a) the run's held-out pairs (``align/eval.jsonl``: the checkpoint was chosen on
  them, so this is optimistic) and (b) the demo test split's pairs (never trained or selected on).
- G2: with ``--sweep`` (a saved sweep holding the endpoints w = 0 and w = 1, e.g. from ``sipo-fast eval
  --policies ... --weights 0 1``), the paired endpoint separation on every objective.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def accuracies(run_dir: Path, pair_sets: dict[str, list[dict]], *, beta: float, max_length: int,
               batch_size: int = 16) -> dict:
    """{set: {objective: implicit_reward_accuracy}} for the run's stage-1 policies (LoRA adapters)."""
    import yaml

    from sipo_fast.data.formatting import encode_pairs
    from sipo_fast.eval.gates import implicit_reward_accuracy
    from sipo_fast.models import load_adapters, load_default
    from sipo_fast.training import implicit_rewards

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    objectives = cfg["data"]["objectives"]
    base, tok = load_default()
    model = load_adapters(base, [run_dir / "align" / "policies" / o for o in objectives], objectives)
    out = {}
    for name, rows in pair_sets.items():
        prompts = [r["prompt"] for r in rows for _ in (0, 1)]
        responses = [r[f"response_{i}"] for r in rows for i in (0, 1)]
        batch = encode_pairs(tok, prompts, responses, cfg["model"]["template"], max_length=max_length)
        rew = implicit_rewards((model, objectives), None, batch, beta=beta, batch_size=batch_size, progress=False)
        rew = rew.view(len(rows), 2, len(objectives)).numpy()  # (pair, response, objective)
        out[name] = {}
        for k, o in enumerate(objectives):
            pref = np.array([r[f"pref_{o}"] for r in rows])
            chosen = rew[np.arange(len(rows)), pref, k]
            rejected = rew[np.arange(len(rows)), 1 - pref, k]
            out[name][o] = implicit_reward_accuracy(chosen, rejected)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--sweep", type=Path, help="a saved SweepResult with the endpoints w = 0 and w = 1")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import yaml

    from sipo_fast.data import load_demo, pku_to_preferences
    from sipo_fast.eval.gates import data_correlation, endpoint_separation

    cfg = yaml.safe_load((args.run_dir / "config.yaml").read_text())
    result = {"G1": {"all rows": data_correlation(list(load_demo("all")))}}
    train_prompts = {r["prompt"] for r in read_jsonl(args.run_dir / "align" / "train.jsonl")}
    result["G1"]["stage-1 train rows"] = data_correlation([r for r in load_demo("all") if r["prompt"] in train_prompts])
    test = list(pku_to_preferences(load_demo("test")))
    pair_sets = {"align/eval.jsonl (selection set)": read_jsonl(args.run_dir / "align" / "eval.jsonl"),
                 "demo test split": test}
    result["G3 accuracy"] = accuracies(args.run_dir, pair_sets, beta=cfg["align"]["beta"],
                                       max_length=cfg["align"]["max_length"])
    if args.sweep:
        from sipo_fast.eval.sweep import SweepResult

        sw = SweepResult.load(args.sweep)
        w = sw.weights[:, 0]
        x = sw.maximised()
        g2 = endpoint_separation(x[int(np.argmin(w))], x[int(np.argmax(w))])
        result["G2"] = {"objectives": sw.objectives, **g2,
                        "w0": x[int(np.argmin(w))].mean(0).tolist(), "w1": x[int(np.argmax(w))].mean(0).tolist()}
    text = json.dumps(result, indent=1, default=float)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
