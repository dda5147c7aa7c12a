"""The evaluation report: a Markdown file with the per-weight table, the non-dominated front, hypervolume,
average gains and coverage, plus a PNG of the fronts (matplotlib, Agg backend, no display needed).

Everything is in maximisation orientation: a lower-is-better objective (a cost) is shown negated, and its
axis and column say so. Several :class:`SweepResult` of one method (different seeds) are pooled for the
table and the plot, and give one hypervolume per seed for the spread.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .pareto import coverage, hypervolume, pareto_front
from .stats import average_gain, mean_ci
from .sweep import SweepResult, pooled, weight_label


def axis_label(name: str, higher_is_better: bool) -> str:
    """"relevance (↑ better)" or "−beaver_cost (↑ better; raw cost is lower-is-better)"."""
    return f"{name} (↑ better)" if higher_is_better else f"−{name} (↑ better; raw {name} is lower-is-better)"


def group_by_method(results: Sequence[SweepResult]) -> "OrderedDict[str, list[SweepResult]]":
    if not results:
        raise ValueError("report: no sweep results to report")
    groups: OrderedDict[str, list[SweepResult]] = OrderedDict()
    for r in results:
        groups.setdefault(r.method, []).append(r)
    first = results[0]
    for r in results:
        if r.objectives != first.objectives or r.higher_is_better != first.higher_is_better:
            raise ValueError(f"report: {r.method!r} was scored on {r.objectives} but {first.method!r} on "
                             f"{first.objectives}; compare methods on the same scorers")
    return groups


def default_reference(points: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Reference point for hypervolume when none is given: the nadir of ``points`` [n, N] (componentwise
    minimum) moved down by ``margin`` × the range, so that the extreme points still add volume. It depends on
    the points compared, so hypervolumes are comparable only within one report; pass ``ref`` for more."""
    lo, hi = points.min(0), points.max(0)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(lo), 1e-3))
    return lo - margin * span


@dataclass
class Report:
    """Computed numbers behind the Markdown; ``to_markdown()`` renders them."""

    title: str
    objectives: list[str]
    higher_is_better: list[bool]
    ref: np.ndarray
    ref_source: str
    confidence: float
    methods: "OrderedDict[str, list[SweepResult]]"
    baseline: str | None
    notes: str = ""
    plot_path: str | None = None
    extra: dict = field(default_factory=dict)

    # -- numbers ------------------------------------------------------------------------------------------
    def pooled(self, method: str) -> SweepResult:
        return pooled(self.methods[method])

    def hypervolumes(self, method: str) -> list[float]:
        """One hypervolume per seed of ``method`` (its per-weight mean points), against ``ref``."""
        return [hypervolume(r.points, self.ref) for r in self.methods[method]]

    def union_front(self) -> set[tuple[str, int]]:
        """(method, weight index) of the pooled points that no other method's pooled point dominates."""
        labels, pts = [], []
        for m in self.methods:
            for i, p in enumerate(self.pooled(m).points):
                labels.append((m, i))
                pts.append(p)
        return {labels[i] for i in pareto_front(np.array(pts))}

    def gains(self, method: str) -> np.ndarray | None:
        """Average gain [N] of ``method`` over the baseline at matched weights (pooled seeds); None if the
        baseline is missing or the weight grids differ."""
        if self.baseline is None or self.baseline not in self.methods or method == self.baseline:
            return None
        a, b = self.pooled(method), self.pooled(self.baseline)
        if a.weights.shape != b.weights.shape or not np.allclose(a.weights, b.weights):
            return None
        return average_gain(a.points, b.points)

    def seed_comparison(self, method: str, other: str) -> list[dict]:
        """Per seed both methods share: hypervolumes, their difference, coverage both ways, and whether
        ``method``'s front dominates ``other``'s (C(method, other) = 1 and C(other, method) < 1)."""
        mine, theirs = {r.seed: r for r in self.methods[method]}, {r.seed: r for r in self.methods[other]}
        rows = []
        for seed in (s for s in mine if s in theirs):
            a, b = mine[seed].points, theirs[seed].points
            hv_a, hv_b, c_ab, c_ba = hypervolume(a, self.ref), hypervolume(b, self.ref), coverage(a, b), coverage(b, a)
            rows.append({"seed": seed, "hv": hv_a, "hv_other": hv_b, "delta": hv_a - hv_b, "c_ab": c_ab, "c_ba": c_ba,
                         "dominates": c_ab == 1.0 and c_ba < 1.0})
        return rows

    # -- rendering ----------------------------------------------------------------------------------------
    def to_markdown(self) -> str:
        obj_cols = [axis_label(o, h) for o, h in zip(self.objectives, self.higher_is_better)]
        ci = f"{round(self.confidence * 100)}%"
        out = [f"# {self.title}", "", f"- generated: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
               "- axes (all maximised; costs are negated): " + "; ".join(obj_cols),
               f"- hypervolume reference point: ({', '.join(f'{x:.4g}' for x in self.ref)}) — {self.ref_source}",
               f"- each point: mean over prompts at one weight, ± {ci} Student-t confidence half-width; "
               "w = weight of the first objective" + (" (vector for N > 2)" if len(self.objectives) > 2 else ""),
               ""]
        if self.plot_path:
            out += [f"![Pareto fronts]({self.plot_path})", ""]
        out += ["## Hypervolume", "", self._hv_table(), ""]
        gains = self._gain_table()
        if gains:
            out += [f"## Average gain over {self.baseline}", "",
                    "gain_k = mean over matched weights of (method − baseline), objective k; positive = better.",
                    "", gains, ""]
        focus = next(iter(self.methods))
        if len(self.methods) > 1:
            out += [f"## {focus} against each method, per seed", "",
                    f"ΔHV = HV({focus}) − HV(other). \"dominates\": every point of the other front is weakly dominated by a "
                    f"point of {focus}'s (C = 1) and not the other way round.", "", self._seed_table(focus), ""]
        if len(self.methods) > 1:
            out += ["## Coverage", "", "C(A, B) = share of B's points weakly dominated by a point of A "
                    "(pooled seeds). C(A, B) = 1 and C(B, A) < 1 means A's front dominates B's.", "",
                    self._coverage_table(), ""]
        out += ["## Per-weight scores", "", "`*` = on the non-dominated front of all methods together.", "",
                self._point_table(obj_cols, ci), ""]
        if self.notes:
            out += ["## Notes", "", self.notes.strip(), ""]
        return "\n".join(out)

    def _hv_table(self) -> str:
        rows = ["| method | seeds | hypervolume (per seed) | mean ± sd |", "|---|---|---|---|"]
        for m, rs in self.methods.items():
            hv = self.hypervolumes(m)
            sd = f" ± {np.std(hv, ddof=1):.4g}" if len(hv) > 1 else ""
            seeds = ", ".join(str(r.seed) for r in rs)
            rows.append(f"| {m} | {seeds} | {', '.join(f'{h:.4g}' for h in hv)} | {np.mean(hv):.4g}{sd} |")
        return "\n".join(rows)

    def _seed_table(self, focus: str) -> str:
        lines = [f"| other | seed | HV({focus}) | HV(other) | ΔHV | C({focus}, other) | C(other, {focus}) | dominates |",
                 "|---|---|---|---|---|---|---|---|"]
        summary = []
        for other in self.methods:
            if other == focus:
                continue
            rows = self.seed_comparison(focus, other)
            for r in rows:
                lines.append(f"| {other} | {r['seed']} | {r['hv']:.4g} | {r['hv_other']:.4g} | {r['delta']:+.4g} | "
                             f"{r['c_ab']:.2f} | {r['c_ba']:.2f} | {'yes' if r['dominates'] else 'no'} |")
            if rows:
                d = [r["delta"] for r in rows]
                sd = f" ± {np.std(d, ddof=1):.3g} (sd)" if len(d) > 1 else ""
                summary.append(f"- vs {other}: ΔHV {np.mean(d):+.4g}{sd} over {len(d)} seed(s); {focus}'s front "
                               f"dominates in {sum(r['dominates'] for r in rows)} of {len(rows)}")
        return "\n".join(lines + [""] + summary)

    def _gain_table(self) -> str:
        lines = []
        for m in self.methods:
            g = self.gains(m)
            if g is not None:
                lines.append(f"| {m} | " + " | ".join(f"{x:+.4f}" for x in g) + " |")
        if not lines:
            return ""
        head = "| method | " + " | ".join(o if h else f"−{o}" for o, h in zip(self.objectives, self.higher_is_better)) + " |"
        return "\n".join([head, "|---|" + "---|" * len(self.objectives)] + lines)

    def _coverage_table(self) -> str:
        names = list(self.methods)
        pts = {m: self.pooled(m).points for m in names}
        head = "| C(row, column) | " + " | ".join(names) + " |"
        lines = [head, "|---|" + "---|" * len(names)]
        for a in names:
            lines.append(f"| {a} | " + " | ".join("—" if a == b else f"{coverage(pts[a], pts[b]):.2f}" for b in names) + " |")
        return "\n".join(lines)

    def _point_table(self, obj_cols: list[str], ci: str) -> str:
        front = self.union_front()
        head = "| method | w | n | " + " | ".join(f"{c} ± {ci}" for c in obj_cols) + " | front |"
        lines = [head, "|---|---|---|" + "---|" * len(obj_cols) + "---|"]
        for m in self.methods:
            p = self.pooled(m)
            mean, half = p.summary(self.confidence)
            for i, w in enumerate(p.weights):
                cells = [f"{mu:.4f} ± {h:.4f}" if math.isfinite(h) else f"{mu:.4f}" for mu, h in zip(mean[i], half[i])]
                lines.append(f"| {m} | {weight_label(w)} | {len(p.prompts)} | " + " | ".join(cells) +
                             f" | {'*' if (m, i) in front else ''} |")
        return "\n".join(lines)


def build_report(results: Sequence[SweepResult], *, ref: Sequence[float] | None = None, baseline: str | None = "mod",
                 confidence: float = 0.95, title: str = "Pareto-front evaluation", notes: str = "") -> Report:
    """Compute the report's numbers. ``ref`` defaults to :func:`default_reference` of every per-seed point."""
    groups = group_by_method(results)
    first = results[0]
    if ref is None:
        allpts = np.concatenate([r.points for r in results], axis=0)
        ref_arr, source = default_reference(allpts), "default: nadir of all points − 10% of their range"
    else:
        ref_arr = np.asarray(ref, dtype=np.float64).reshape(-1)
        if ref_arr.shape[0] != len(first.objectives):
            raise ValueError(f"ref has {ref_arr.shape[0]} values; give one per objective ({first.objectives})")
        source = "given (maximisation orientation: costs negated)"
    if baseline is not None and baseline not in groups:
        baseline = None
    return Report(title=title, objectives=list(first.objectives), higher_is_better=list(first.higher_is_better),
                  ref=ref_arr, ref_source=source, confidence=confidence, methods=groups, baseline=baseline, notes=notes)


def plot_fronts(report: Report, path: str | os.PathLike, *, show_seeds: bool = True) -> Path:
    """PNG of every method's front: one colour per method, points joined in weight order, error bars (CI),
    each point annotated with its weight, the union's non-dominated points ringed, per-seed points faint.
    Two objectives give one panel; N > 2 give one panel per pair of objectives."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ModuleNotFoundError("plot_fronts needs matplotlib, part of the demo extra: `pip install "
                                  "'sipo-fast[demo]'`", name="matplotlib") from exc
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    n = len(report.objectives)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(7.5 * len(pairs), 6.2), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP"
    # Label offsets per method (points), so weights of methods whose points coincide do not print on top of
    # each other: right-above, right-below, left-above, left-below.
    offsets = [((6, 5), "left"), ((6, -12), "left"), ((-6, 5), "right"), ((-6, -12), "right")]
    front = report.union_front()
    for ax, (i, j) in zip(axes[0], pairs):
        for k, (m, rs) in enumerate(report.methods.items()):
            c, mk = colors[k % len(colors)], markers[k % len(markers)]
            p = pooled(rs)
            mean, half = p.summary(report.confidence)
            if show_seeds and len(rs) > 1:
                for r in rs:
                    ax.scatter(r.points[:, i], r.points[:, j], s=16, color=c, marker=mk, alpha=0.3, linewidths=0)
            ax.errorbar(mean[:, i], mean[:, j], xerr=np.nan_to_num(half[:, i]), yerr=np.nan_to_num(half[:, j]),
                        fmt="none", ecolor=c, elinewidth=0.8, capsize=2, alpha=0.35)
            ax.plot(mean[:, i], mean[:, j], "-", color=c, marker=mk, ms=7, lw=1.8, alpha=0.95,
                    label=f"{m} (HV {np.mean(report.hypervolumes(m)):.3g})")
            (dx, dy), ha = offsets[k % len(offsets)]
            for w_idx, w in enumerate(p.weights):
                ax.annotate(f"w={weight_label(w)}", (mean[w_idx, i], mean[w_idx, j]), textcoords="offset points",
                            xytext=(dx, dy), ha=ha, fontsize=8, color=c)
                if (m, w_idx) in front:
                    ax.scatter([mean[w_idx, i]], [mean[w_idx, j]], s=170, facecolors="none", edgecolors="black",
                               linewidths=1.0, zorder=5)
        ax.set_xlabel(axis_label(report.objectives[i], report.higher_is_better[i]))
        ax.set_ylabel(axis_label(report.objectives[j], report.higher_is_better[j]))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize=9, title="method (mean hypervolume)", title_fontsize=9)
    ci = f"{round(report.confidence * 100)}% CI"
    seeds = "; faint = single seeds" if show_seeds and any(len(rs) > 1 for rs in report.methods.values()) else ""
    fig.suptitle(f"{report.title}\nup and right is better; w = weight of {report.objectives[0]}; black ring = on the "
                 f"joint front\nbars = {ci} over prompts{seeds}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: Sequence[SweepResult], out_dir: str | os.PathLike, *, ref: Sequence[float] | None = None,
                 baseline: str | None = "mod", confidence: float = 0.95, title: str = "Pareto-front evaluation",
                 notes: str = "", name: str = "report") -> dict[str, Path]:
    """Write ``<out_dir>/<name>.md`` and ``<out_dir>/<name>.png``; returns their paths. Without matplotlib (the
    demo extra) the report has no plot (``png`` is None) and one warning says so: the numbers are all in the
    markdown, and a run's evaluation is not lost to a missing plotting library."""
    import importlib.util

    report = build_report(results, ref=ref, baseline=baseline, confidence=confidence, title=title, notes=notes)
    out_dir = Path(out_dir)
    png = None
    if importlib.util.find_spec("matplotlib") is None:
        warnings.warn("write_report: matplotlib is not installed, so the report has no plot; `pip install "
                      "'sipo-fast[demo]'` adds it", RuntimeWarning, stacklevel=2)
    else:
        png = plot_fronts(report, out_dir / f"{name}.png")
        report.plot_path = png.name
    md = out_dir / f"{name}.md"
    md.write_text(report.to_markdown())
    return {"markdown": md, "png": png}


def seed_spread(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and CI half-width of per-seed values (e.g. hypervolumes); half-width NaN for one seed."""
    mean, half = mean_ci(np.asarray(values, dtype=np.float64), confidence)
    return float(mean), float(half)


def diagnostics_markdown(diag_by_seed: dict, objectives: list[str]) -> str:
    """A table of :func:`pipeline_diagnostics` per seed, with what each column means."""
    if not diag_by_seed:
        return ""
    cols = [("conflict_ratio", "conflict ratio (train)"), ("conflicting_prompts", "conflicting prompts (stage 2)"),
            ("candidates", "candidates"), ("survivors", "survivors (strictly dominate under implicit rewards)"),
            ("prompts_covered", "prompts with a y_c"), ("pairs", "|D_c|"),
            ("gt_dominating", "y_c beating both originals on every ground-truth scorer"),
            ("dc_conflict_ratio", "D_c conflict ratio under ground truth")]
    lines = ["| seed | " + " | ".join(c[1] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for seed, d in diag_by_seed.items():
        cells = []
        for key, _ in cols:
            v = d.get(key)
            cells.append("—" if v is None else f"{v:.2f}" if isinstance(v, float) else str(v))
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    gains = [d["dc_gt_gain_mean"] for d in diag_by_seed.values() if "dc_gt_gain_mean" in d]
    text = "\n".join(lines)
    if gains:
        g = np.mean(gains, axis=0)
        text += ("\n\nMean ground-truth advantage of y_c over the average of its two originals (maximisation "
                 "orientation): " + ", ".join(f"{o} {x:+.3f}" for o, x in zip(objectives, g)) + ".")
    return text
