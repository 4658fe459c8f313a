"""Reports of an evaluation: ``report.json``, ``report.md`` (a table) and matplotlib figures.

``report.json`` is strict JSON: a missing figure (no judged row, a length-controlled win rate that is not
identified) is ``null``, never a bare ``NaN``. ``report.md`` has, per model: the win rate with its standard error and
interval, the length-controlled win rate (``n/i`` when not identified, the reason in a numbered note under the
table), the length slope with its interval, W/T/L, abstentions, the answers cut at the token budget, the average
lengths; and the judge's cost when it has one (unknown when no price is known).

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

import hashlib
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


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and not math.isfinite(value))


def _pct(value: float | None) -> str:
    return "n/a" if _missing(value) else f"{100 * value:.1f}"


def _count(value: float | None) -> str:
    return "n/a" if _missing(value) else f"{value:.0f}"


def _interval(
    s: Mapping[str, Any], key: str = "win_rate", low: str = "ci_low", high: str = "ci_high", se: str = "se"
) -> str:
    """``rate (SE) [low, high]`` in percent; the SE is left out where the scores have none."""
    spread = f" ({_pct(s.get(se))})" if se in s else ""
    return f"{_pct(s.get(key))}{spread} [{_pct(s.get(low))}, {_pct(s.get(high))}]"


def _lc(s: Mapping[str, Any]) -> str:
    if s.get("lc_identified") is False:
        return "n/i"
    return _interval(s, "lc_win_rate", "lc_ci_low", "lc_ci_high", "lc_se")


def _slope(s: Mapping[str, Any]) -> str:
    value, low, high = (s.get(k) for k in ("lc_length_slope", "lc_slope_ci_low", "lc_slope_ci_high"))
    if _missing(value):
        return "n/a"
    bounds = "n/a" if _missing(low) or _missing(high) else f"{low:.2f}, {high:.2f}"
    return f"{value:+.2f} [{bounds}]"


def _cut(report: Mapping[str, Any], name: str, key: str = "cut_at_budget") -> str:
    count = (report.get("models") or {}).get(name, {}).get(key)
    return "n/a" if count is None else f"{count}/{report['n_prompts']}"


def _extras(report: Mapping[str, Any], section: str, name: str) -> list[str]:
    """The same pair's win rate by each extra judge (``report["extra_judges"]``), as table cells."""
    return [
        _interval(other[section][name]) if name in other.get(section, {}) else "n/a"
        for other in (report.get("extra_judges") or {}).values()
    ]


def judge_settings_text(settings: Mapping[str, Any], prefix: str = "") -> str:
    """A judge's identity as ``key=value`` pairs, nested keys dotted; a long text (a prompt template) shown by its
    length and hash (its full text is in report.json), a content hash by its first 12 digits."""
    parts = []
    for key, value in settings.items():
        if key == "name" and not prefix:  # already on the judge line
            continue
        if isinstance(value, Mapping) and value:
            parts.append(judge_settings_text(value, f"{prefix}{key}."))
            continue
        if isinstance(value, str) and key.endswith("sha256"):
            value = value[:12]
        elif isinstance(value, str) and not key.endswith(("path", "url")) and (len(value) > 80 or "\n" in value):
            digest = hashlib.sha256(value.encode("utf-8")).hexdigest()[:12]
            value = f"<{len(value)} chars, sha256 {digest}>"
        parts.append(f"{prefix}{key}={value}")
    return ", ".join(parts)


def _judge_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per judge with every setting (its identity), when the report has them."""
    judges = [("Judge", report.get("judge_settings"))]
    judges += [
        (f"Judge of column {label}", o.get("judge_settings"))
        for label, o in (report.get("extra_judges") or {}).items()
    ]
    return [f"{title} settings: {judge_settings_text(s)}." for title, s in judges if s]


def _row(
    name: str, s: Mapping[str, Any], cut: str, notes: list[str], extras: list[str] = (), label: str | None = None
) -> str:
    """A table row; an LC that is not identified gets ``n/i (k)`` and its reason as note ``k`` (as ``label``)."""
    lc = _lc(s)
    if lc == "n/i":
        notes.append(f"{label or name}: {s.get('lc_reason') or 'not identified'}.")
        lc = f"n/i ({len(notes)})"
    return (
        f"| {name} | {_interval(s)} | {lc} | {_slope(s)} "
        f"| {s['wins']}/{s['ties']}/{s['losses']} | {s['abstained']} | {cut} | {_count(s['avg_length'])} "
        f"| {_count(s['baseline_avg_length'])} |" + "".join(f" {cell} |" for cell in extras)
    )


def cost_text(report: Mapping[str, Any]) -> str | None:
    """One sentence on the judge's cost in this run (``report["judge_cost"]``), or ``None`` for a judge without one."""
    cost = report.get("judge_cost")
    if not cost:
        return None
    tokens = f"{cost['prompt_tokens']} prompt + {cost['completion_tokens']} completion tokens sent in this run"
    if _missing(cost.get("usd")):
        return (
            f"Judge cost: unknown ({tokens}; {cost['price_source']}: --judge-price-in/--judge-price-out, or the "
            "recipe's --judge_price_in/--judge_price_out)."
        )
    return (
        f"Judge cost: ${cost['usd']:.4f} ({tokens}, at ${cost['price_input_per_1m']:g} / "
        f"${cost['price_output_per_1m']:g} per 1M prompt / completion tokens, {cost['price_source']}; answers from "
        "the request cache cost nothing)."
    )


def markdown_table(report: Mapping[str, Any]) -> str:
    """The report as Markdown: win rates against the baseline, the improver's, per category."""
    level = round(100 * report.get("confidence", 0.95))
    extra = report.get("extra_judges") or {}
    header = (
        f"| model | win rate % (SE) [{level}% CI] | length-controlled % (SE) [{level}% CI] | length slope "
        f"[{level}% CI] | W/T/L | abstained | cut at budget | avg length | baseline avg length |"
        + "".join(f" {label} win rate % (SE) [{level}% CI] |" for label in extra)
        + "\n|---|---|---|---|---|---|---|---|---|"
        + "---|" * len(extra)
        + "\n"
    )
    also = "".join(f"; also judged by `{other['judge']}` (column {label})" for label, other in extra.items())
    baseline = report["baseline"]
    lines = [
        f"Judge: `{report['judge']}`{also}; {report['n_prompts']} prompts; baseline: **{baseline}**, "
        f"{_cut(report, baseline)} of its answers cut at the token budget. Win rate = P(model's answer beats the "
        "baseline's), ties count half; SE: standard error of the mean preference (bootstrap SE for the "
        "length-controlled rate); length slope: log-odds of a win per unit of tanh(length difference / its std), "
        "above 0 when the judge prefers longer answers; n/i: not identified (see the notes); lengths in characters.",
        "",
    ]
    if _judge_lines(report):
        lines += [*_judge_lines(report), ""]
    if cost_text(report):
        lines += [cost_text(report), ""]
    notes: list[str] = []
    stats = report.get("judge_stats") or {}
    if "verdicts" in stats:  # Arena-Hard style judge
        counts = ", ".join(f"{label} {n}" for label, n in stats["verdicts"].items())
        lines += [
            f"Arena-Hard games judged in this run: {stats['games']} ({counts}); {stats['reasked']} re-asked for an "
            f"unreadable verdict, {stats['dropped']} dropped without one.",
            "",
        ]
    if report.get("comparisons"):
        rows = [
            _row(n, s, _cut(report, n), notes, _extras(report, "comparisons", n))
            for n, s in report["comparisons"].items()
        ]
        lines.append(header + "\n".join(rows))
    if report.get("improver"):
        rows = [
            _row(
                n,
                s,
                _cut(report, n, "improvements_cut_at_budget"),
                notes,
                _extras(report, "improver", n),
                f"{n} as improver",
            )
            for n, s in report["improver"].items()
        ]
        lines += [
            "",
            "Improver: each model's improvement of its own answer against that answer (the pairs SGPO trains on).",
            "",
            header.replace("| model |", "| improver |").replace("baseline avg length", "draft avg length")
            + "\n".join(rows),
        ]
    if notes:
        lines += ["", "Length-controlled win rate not identified:", ""]
        lines += [f"{i}. {note}" for i, note in enumerate(notes, 1)]
    if report.get("ranking"):
        from .ranking import ranking_markdown

        lines += ["", ranking_markdown(report["ranking"]).rstrip("\n")]
    for name, s in (report.get("comparisons") or {}).items():
        if s.get("per_category"):
            lines += [
                "",
                f"Per category, {name} vs {baseline}:",
                "",
                f"| category | win rate % (SE) [{level}% CI] | n |",
            ]
            lines.append("|---|---|---|")
            for category, c in s["per_category"].items():
                lines.append(f"| {category} | {_interval(c)} | {c['n']} |")
    return "\n".join(lines) + "\n"


def text_table(report: Mapping[str, Any]) -> str:
    """A compact plain-text table for terminals and run summaries."""
    extra = report.get("extra_judges") or {}
    rows = [
        ("model", "win rate % (SE) [CI]", "LC win rate %", "W/T/L", "avg len", *(f"{label} [CI]" for label in extra))
    ]
    for title, key in (("", "comparisons"), ("improver: ", "improver")):
        for name, s in (report.get(key) or {}).items():
            rows.append(
                (
                    f"{title}{name}",
                    _interval(s),
                    "n/i" if s.get("lc_identified") is False else _pct(s["lc_win_rate"]),
                    f"{s['wins']}/{s['ties']}/{s['losses']}",
                    _count(s["avg_length"]),
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
    labelled = False
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
        if not _missing(s.get("lc_win_rate")):
            ax.plot(100 * s["lc_win_rate"], y, "x", color="C2", label=None if labelled else "length-controlled")
            labelled = True
    ax.axvline(50, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(entries)), [n for n, _ in entries])
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"win rate vs {report['baseline']} (%), {round(100 * report.get('confidence', 0.95))}% interval")
    ax.set_title(f"judge: {report['judge']}", fontsize=9)
    if labelled:
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


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as ``None`` (JSON has no NaN: ``null`` is "missing") and numpy scalars as
    Python numbers, so that ``report.json`` is valid JSON."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy scalar or array
        value = value.tolist()
        if isinstance(value, list):
            return json_safe(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


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
        json.dump(json_safe(report), f, indent=2, allow_nan=False, default=float)
    os.replace(tmp, out / "report.json")
    return report
