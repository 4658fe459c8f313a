"""Reports of an evaluation: ``report.json``, ``report.md`` (a table) and matplotlib figures.

Figures (PNG, written with the non-interactive Agg backend):

- ``win_rates.png``: win rate per model against the baseline with its interval (and the improver's win rate over
  its own drafts, when evaluated), the 50% line marked;
- ``lengths.png``: answer length distributions per model (characters);
- ``ranking.png``: with three or more models, their Bradley-Terry Elo with intervals (see
  :mod:`~trl_sgpo.evaluation.ranking`);
- ``training_curves.png``: loss, reward margin, kept-pair fraction and finished (not truncated) fraction per step,
  read from ``trainer_state.json`` files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any


# (label, keys in trainer_state.json's log_history, first found is plotted)
CURVES = (
    ("loss", ("loss",)),
    ("reward margin", ("rewards/margins",)),
    ("kept pair fraction", ("sgpo/kept_frac",)),
    ("finished (not truncated) fraction", ("val/contain_eos_token", "completions/terminated_ratio")),
)


def _pct(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def _interval(s: Mapping[str, Any]) -> str:
    return f"{_pct(s['win_rate'])} [{_pct(s['ci_low'])}, {_pct(s['ci_high'])}]"


def _extras(report: Mapping[str, Any], section: str, name: str) -> list[str]:
    """The same pair's win rate by each extra judge (``report["extra_judges"]``), as table cells."""
    return [
        _interval(other[section][name]) if name in other.get(section, {}) else "n/a"
        for other in (report.get("extra_judges") or {}).values()
    ]


def _row(name: str, s: Mapping[str, Any], extras: list[str] = ()) -> str:
    return (
        f"| {name} | {_interval(s)} "
        f"| {_pct(s['lc_win_rate'])} [{_pct(s['lc_ci_low'])}, {_pct(s['lc_ci_high'])}] "
        f"| {s['wins']}/{s['ties']}/{s['losses']} | {s['abstained']} | {s['avg_length']:.0f} "
        f"| {s['baseline_avg_length']:.0f} |" + "".join(f" {cell} |" for cell in extras)
    )


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report as Markdown: win rates against the baseline, the improver's, per category."""
    level = round(100 * report.get("confidence", 0.95))
    extra = report.get("extra_judges") or {}
    header = (
        f"| model | win rate % [{level}% CI] | length-controlled % [{level}% CI] | W/T/L | abstained "
        f"| avg length | baseline avg length |"
        + "".join(f" {label} win rate % [{level}% CI] |" for label in extra)
        + "\n|---|---|---|---|---|---|---|"
        + "---|" * len(extra)
        + "\n"
    )
    also = "".join(f"; also judged by `{other['judge']}` (column {label})" for label, other in extra.items())
    lines = [
        f"Judge: `{report['judge']}`{also}; {report['n_prompts']} prompts; baseline: **{report['baseline']}** (win "
        f"rate = P(model's answer beats the baseline's), ties count half; lengths in characters).",
        "",
    ]
    stats = report.get("judge_stats") or {}
    if "verdicts" in stats:  # Arena-Hard style judge
        counts = ", ".join(f"{label} {n}" for label, n in stats["verdicts"].items())
        lines += [
            f"Arena-Hard games judged in this run: {stats['games']} ({counts}); {stats['reasked']} re-asked for an "
            f"unreadable verdict, {stats['dropped']} dropped without one.",
            "",
        ]
    if report.get("comparisons"):
        rows = [_row(n, s, _extras(report, "comparisons", n)) for n, s in report["comparisons"].items()]
        lines.append(header + "\n".join(rows))
    if report.get("improver"):
        rows = [_row(n, s, _extras(report, "improver", n)) for n, s in report["improver"].items()]
        lines += [
            "",
            "Improver: each model's improvement of its own answer against that answer (the pairs SGPO trains on).",
            "",
            header.replace("| model |", "| improver |").replace("baseline avg length", "draft avg length")
            + "\n".join(rows),
        ]
    if report.get("ranking"):
        from .ranking import ranking_markdown

        lines += ["", ranking_markdown(report["ranking"]).rstrip("\n")]
    for name, s in (report.get("comparisons") or {}).items():
        if s.get("per_category"):
            lines += ["", f"Per category, {name} vs {report['baseline']}:", "", "| category | win rate % | n |"]
            lines.append("|---|---|---|")
            for category, c in s["per_category"].items():
                lines.append(
                    f"| {category} | {_pct(c['win_rate'])} [{_pct(c['ci_low'])}, {_pct(c['ci_high'])}] | {c['n']} |"
                )
    return "\n".join(lines) + "\n"


def text_table(report: Mapping[str, Any]) -> str:
    """A compact plain-text table for terminals and run summaries."""
    extra = report.get("extra_judges") or {}
    rows = [("model", "win rate % [CI]", "LC win rate %", "W/T/L", "avg len", *(f"{label} [CI]" for label in extra))]
    for title, key in (("", "comparisons"), ("improver: ", "improver")):
        for name, s in (report.get(key) or {}).items():
            rows.append(
                (
                    f"{title}{name}",
                    _interval(s),
                    _pct(s["lc_win_rate"]),
                    f"{s['wins']}/{s['ties']}/{s['losses']}",
                    f"{s['avg_length']:.0f}",
                    *_extras(report, key, name),
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)) for r in rows]
    return f"vs {report['baseline']} ({report['judge']}, {report['n_prompts']} prompts)\n" + "\n".join(lines)


def _plot_win_rates(report, path: Path) -> None:
    import matplotlib.pyplot as plt

    entries = [(n, s) for n, s in (report.get("comparisons") or {}).items()]
    entries += [(f"{n} (improver)", s) for n, s in (report.get("improver") or {}).items()]
    fig, ax = plt.subplots(figsize=(6, 0.6 * len(entries) + 1.5))
    for y, (name, s) in enumerate(entries):
        wr = 100 * s["win_rate"]
        ax.errorbar(
            wr,
            y,
            xerr=[[wr - 100 * s["ci_low"]], [100 * s["ci_high"] - wr]],
            fmt="o",
            capsize=4,
            color="C1" if name.endswith("(improver)") else "C0",
        )
        if not math.isnan(s["lc_win_rate"]):
            ax.plot(100 * s["lc_win_rate"], y, "x", color="C2", label="length-controlled" if y == 0 else None)
    ax.axvline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(entries)), [n for n, _ in entries])
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"win rate vs {report['baseline']} (%), {round(100 * report.get('confidence', 0.95))}% interval")
    ax.set_title(f"judge: {report['judge']}", fontsize=9)
    if any(not math.isnan(s["lc_win_rate"]) for _, s in entries):
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_lengths(lengths: Mapping[str, list[int]], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    top = max((max(v) for v in lengths.values() if v), default=1)
    bins = [top * i / 20 for i in range(21)] if top > 0 else 10
    for name, values in lengths.items():
        ax.hist(
            values,
            bins=bins,
            histtype="step",
            linewidth=1.5,
            label=f"{name} (mean {sum(values) / max(1, len(values)):.0f})",
        )
    ax.set_xlabel("answer length (characters)")
    ax.set_ylabel("answers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def training_curves(state_path: str | os.PathLike) -> dict[str, tuple[list[int], list[float]]]:
    """``{label: (steps, values)}`` of :data:`CURVES` found in a ``trainer_state.json``."""
    with open(state_path, encoding="utf-8") as f:
        history = json.load(f).get("log_history", [])
    curves = {}
    for label, keys in CURVES:
        for key in keys:
            points = [(e["step"], e[key]) for e in history if key in e and "step" in e]
            if points:
                curves[label] = ([s for s, _ in points], [float(v) for _, v in points])
                break
    return curves


def _plot_training(states: Mapping[str, str | os.PathLike], path: Path) -> bool:
    import matplotlib.pyplot as plt

    curves = {name: training_curves(p) for name, p in states.items() if Path(p).is_file()}
    labels = [label for label, _ in CURVES if any(label in c for c in curves.values())]
    if not labels:
        return False
    fig, axes = plt.subplots(1, len(labels), figsize=(3.2 * len(labels), 3), squeeze=False)
    for ax, label in zip(axes[0], labels, strict=True):
        for name, c in curves.items():
            if label in c:
                ax.plot(*c[label], marker=".", label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def write_report(
    report: dict[str, Any],
    output_dir: str | os.PathLike,
    *,
    answer_lengths: Mapping[str, list[int]] | None = None,
    trainer_states: Mapping[str, str | os.PathLike] | None = None,
    plots: bool = True,
) -> dict[str, Any]:
    """Write ``report.json``, ``report.md`` and (with ``plots``) the figures into ``output_dir``; return the report
    with ``files`` (name -> path) added."""
    import matplotlib

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"report.json": out / "report.json", "report.md": out / "report.md"}
    if plots:
        matplotlib.use("Agg")  # files only: no display needed
        if report.get("comparisons") or report.get("improver"):
            _plot_win_rates(report, out / "win_rates.png")
            files["win_rates.png"] = out / "win_rates.png"
        if report.get("ranking"):
            from .ranking import plot_ranking

            plot_ranking(report["ranking"], out / "ranking.png", title=f"judge: {report['judge']}")
            files["ranking.png"] = out / "ranking.png"
        if answer_lengths:
            _plot_lengths(answer_lengths, out / "lengths.png")
            files["lengths.png"] = out / "lengths.png"
        if trainer_states and _plot_training(trainer_states, out / "training_curves.png"):
            files["training_curves.png"] = out / "training_curves.png"
    report = {**report, "files": {k: str(v) for k, v in files.items()}}
    markdown = markdown_table(report)
    images = "".join(f"\n![{k}]({k})\n" for k in files if k.endswith(".png"))
    (out / "report.md").write_text("# Evaluation\n\n" + markdown + images, encoding="utf-8")
    tmp = out / "report.json.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=float)
    os.replace(tmp, out / "report.json")
    return report
