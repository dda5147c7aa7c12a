"""Evaluation, the last stage: :func:`..baselines.compare.evaluate_run` on this run directory.

Artifact ``eval/``: ``report.md``, ``report.png`` (not hashed: they carry a timestamp) and
``sweeps/<method>.json``.
"""
from __future__ import annotations

from .stage import Stage


class EvalStage(Stage):
    """Evaluation: MOD sweeps of the fine-tuned policies ("sipo") and of the baselines (eval.baselines) over the
    weights, scored by the ground-truth scorers on held-out prompts, with the pipeline diagnostics."""

    name = "eval"
    upstream = ("align", "finetune")
    config_keys = ("seed", "model", "data.source", "data.objectives", "sample.weights", "eval")

    def run(self, ctx, parts, inputs):
        from ..baselines.compare import evaluate_run  # numpy, the scorers and the report: only when evaluating

        cfg = ctx.config
        # Sweeps already in the work directory (an interrupted evaluation) are reused by evaluate_run, which
        # fingerprints each method's inputs and settings.
        result = evaluate_run(ctx.run_dir.root, methods=["sipo", *cfg.eval.baselines], weights=cfg.eval.weights,
                              num_prompts=cfg.eval.num_prompts, max_new_tokens=cfg.eval.max_new_tokens,
                              batch_size=cfg.eval.batch_size, scorers=cfg.eval.scorers,
                              baseline="mod" if "mod" in cfg.eval.baselines else None, out_dir=parts.work,
                              progress=ctx.progress)
        means = {r.method: [round(x, 6) for x in r.summary()[0].mean(axis=0).tolist()] for r in result.results}
        return {"prompts": len(result.results[0].prompts), "weights": len(result.results[0].weights),
                "methods": list(means), "mean_scores_over_weights": means, "report": "report.md"}
