"""Stage 2.3, filtering (SIPO.md §3): a candidate survives only if, under every implicit reward model (the N
stage-1 policies plus DPO soups at the soup weights), it beats both original responses; among a pair's survivors
the largest reward sum is kept (:func:`.rules.select_pareto`), and D_c = {(x, y_c, y_a), (x, y_c, y_b)}.

Artifact ``filter/``: ``rewards.jsonl`` (every candidate's rewards under the K reward models and whether it
survives), ``survivors.jsonl`` (the chosen y_c per covered prompt) and ``pairs.jsonl`` (D_c: prompt, chosen,
rejected). Its summary (``stage.json``) holds the counts and :func:`.rules.margin_counts`.
"""
from __future__ import annotations

import logging

import torch

from ..policies import Policies, load_policies
from ..rundir.files import read_jsonl
from .rewards import rewards
from .rules import margin_counts, select_pareto
from .stage import Stage

log = logging.getLogger("sipo_fast.pipeline")


class FilterStage(Stage):
    """Stage 2.3: strict dominance over both originals under every implicit reward model (N policies plus
    DPO soups at the soup weights), the max-sum pick, at most one survivor per conflicting pair (``pid``; a
    PKU-style prompt has one pair); builds D_c = {(x, y_c, y_a), (x, y_c, y_b)}."""

    name = "filter"
    upstream = ("align", "refine")
    # "seed" although the filter draws nothing: every stage has hashed it, and dropping it would change every
    # filter fingerprint, so that each existing run directory would redo its filter and everything after it.
    config_keys = ("seed", "model", "data.objectives", "filter", "soup_weights")

    def run(self, ctx, parts, inputs):
        cfg = ctx.config
        cands = read_jsonl(inputs["refine"] / "candidates.jsonl")
        prompts = {p["pid"]: p for p in read_jsonl(inputs["refine"] / "prompts.jsonl")}
        policies = load_policies(ctx, inputs["align"] / "policies")
        models, names = self._reward_models(ctx, policies)
        pids = sorted({c["pid"] for c in cands})
        per_prompt = {pid: [c for c in cands if c["pid"] == pid] for pid in pids}
        M = max(len(v) for v in per_prompt.values())
        # One flat scoring batch: y_a, y_b, then every candidate, per prompt.
        flat_p, flat_r = [], []
        for pid in pids:
            p = prompts[pid]
            flat_p += [p["prompt"]] * (2 + len(per_prompt[pid]))
            flat_r += [p["response_0"], p["response_1"]] + [c["candidate"] for c in per_prompt[pid]]
        r = rewards(ctx, models, policies.reference, flat_p, flat_r, beta=cfg.filter.beta,
                    max_length=cfg.filter.max_length, batch_size=cfg.filter.batch_size)  # (rows, K)
        K = r.shape[1]
        cand = torch.zeros(len(pids), M, K)
        valid = torch.zeros(len(pids), M, dtype=torch.bool)
        r_a, r_b = torch.zeros(len(pids), K), torch.zeros(len(pids), K)
        row = 0
        for i, pid in enumerate(pids):
            m = len(per_prompt[pid])
            r_a[i], r_b[i] = r[row], r[row + 1]
            cand[i, :m] = r[row + 2: row + 2 + m]
            # An empty candidate is not a response to train towards, whatever its rewards say.
            valid[i, :m] = torch.tensor([bool(c["candidate"].strip()) for c in per_prompt[pid]])
            row += 2 + m
        sel = select_pareto(cand, r_a, r_b, valid)
        reward_rows, survivors, pairs = [], [], []
        for i, pid in enumerate(pids):
            for j, c in enumerate(per_prompt[pid]):
                reward_rows.append({"pid": pid, "weight_index": c["weight_index"], "rewards": cand[i, j].tolist(),
                                    "rewards_a": r_a[i].tolist(), "rewards_b": r_b[i].tolist(),
                                    "survives": bool(sel.survives[i, j])})
            j = int(sel.chosen[i])
            if j < 0:
                continue
            c, p = per_prompt[pid][j], prompts[pid]
            survivors.append({"pid": pid, "prompt": p["prompt"], "chosen": c["candidate"], "weight": c["weight"],
                              "weight_index": c["weight_index"], "rewritten": c.get("rewritten", False),
                              "reward_sum": float(cand[i, j].sum()), "response_0": p["response_0"],
                              "response_1": p["response_1"]})
            pairs += [{"prompt": p["prompt"], "chosen": c["candidate"], "rejected": p["response_0"], "pid": pid},
                      {"prompt": p["prompt"], "chosen": c["candidate"], "rejected": p["response_1"], "pid": pid}]
        parts.write_jsonl("rewards.jsonl", reward_rows)
        parts.write_jsonl("survivors.jsonl", survivors)
        parts.write_jsonl("pairs.jsonl", pairs)
        counts = {"conflicting_prompts": len(pids), "candidates": len(cands),
                  "rewrites_kept": sum(bool(c.get("rewritten")) for c in cands),
                  "survivors": sel.num_survivors, "prompts_covered": sel.prompts_covered, "pairs": len(pairs),
                  "reward_models": names, "margins": margin_counts(cand, r_a, r_b, valid, names)}
        log.info("filter: %d candidates (%d rewrites kept) -> %d strictly dominating -> %d prompts covered "
                 "(of %d), %d pairs in D_c", counts["candidates"], counts["rewrites_kept"], counts["survivors"],
                 counts["prompts_covered"], counts["conflicting_prompts"], counts["pairs"])
        return counts

    @staticmethod
    def _reward_models(ctx, policies: Policies):
        """The K implicit reward models: the N policies plus one DPO soup per soup weight."""
        cfg = ctx.config
        objectives = list(cfg.data.objectives)
        if not cfg.filter.soups:
            return policies.reward_models(), objectives
        soup_names = [f"soup{i}" for i in range(len(cfg.soup_weights))]
        if policies.names is not None:
            from sipo_fast.merging import lora_soup

            for name, w in zip(soup_names, cfg.soup_weights):
                lora_soup(policies.model, objectives, w, name)  # exact ΔW interpolation (rank-concatenated)
            return (policies.model, objectives + soup_names), objectives + soup_names
        from sipo_fast.merging import full_soup

        soups = [full_soup(policies.models, w) for w in cfg.soup_weights]
        return list(policies.models) + soups, objectives + soup_names
