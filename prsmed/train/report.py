"""What a run says about itself: its validation score, and at the end its scores before training, at the best
checkpoint and at the last evaluation, which of them the adapter holds, and a verdict in plain words.

The report is plain JSON (``summary.json``'s ``report``, ``RunResult.report``, the adapter manifest's
``metrics.report``); the SDK's ``TrainingReport`` is its typed form on the wire.
"""

from __future__ import annotations

from typing import Any

# The score that picks the best checkpoint and drives early stopping. The three parts weigh the same: a run whose
# masks improve while its answers collapse must not look better than the one it started from. The mean is then
# scaled by the share of well-formed answers (no word repeated back to back, not cut at the length limit): the zone
# words can be right in an answer that runs on ("the left lower left lower left ..."), and a checkpoint writing such
# answers beat one writing whole sentences when only the zones counted (bench/RESULTS.md).
SCORE_PARTS = ("dice_at_05", "zone_acc_text", "agreement")
SCORE_DEFINITION = ("mean of dice@0.5, zone_acc_text and agreement, times the share of well-formed answers "
                    "(dice@0.5 alone when no answer was scored)")

# One evaluation in the report, and the metrics.jsonl eval line's name for each value.
SCORE_KEYS = {
    "score": "val_score",
    "dice_at_05": "val_dice_at_05",
    "soft_dice": "val_dice",
    "zone_acc_text": "val_zone_acc_text",
    "agreement": "val_agreement",
    "hit_length_limit": "val_hit_length_limit",
    "repeated_words": "val_repeated_words",
    "well_formed": "val_well_formed",
    "loss_lm": "val_loss_lm",
    "rows": "val_rows",
    "answer_rows": "val_answer_rows",
    "examples": "val_answer_examples",
}
# Table rows of the summary: label, key, shown as a percentage.
TABLE = (
    ("score", "score", False),
    ("dice@0.5", "dice_at_05", False),
    ("soft Dice", "soft_dice", False),
    ("zone_acc_text", "zone_acc_text", False),
    ("agreement", "agreement", False),
    ("answers at length limit", "hit_length_limit", True),
    ("answers repeating a word", "repeated_words", True),
    ("well-formed answers", "well_formed", True),
    ("LM loss", "loss_lm", False),
)


def combined_score(scores: dict[str, Any]) -> float | None:
    parts = [scores[k] for k in SCORE_PARTS if scores.get(k) is not None]
    if not parts:
        return None
    well_formed = scores.get("well_formed")
    return float(sum(parts) / len(parts) * (1.0 if well_formed is None else well_formed))


def eval_line(scores: dict[str, Any]) -> dict[str, Any]:
    """An evaluation's scores under the metrics.jsonl eval line's names."""
    return {SCORE_KEYS[k]: v for k, v in scores.items() if k in SCORE_KEYS}


def _rounded(scores: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scores:
        return None
    out: dict[str, Any] = {"step": scores.get("step")}
    for k in SCORE_KEYS:
        v = scores.get(k)
        out[k] = round(v, 6) if isinstance(v, float) else v
    out["examples"] = list(scores.get("examples") or [])
    return out


def _pct(v: float) -> str:
    return f"{100 * v:.0f}%"


def judge(before: dict | None, kept: dict | None, *, kept_name: str,
          max_new_tokens: int) -> tuple[str, list[str], bool, bool]:
    """(verdict, warnings, answers_worse, masks_worse) for the weights the adapter holds against before training."""
    warnings: list[str] = []
    if kept is None:
        return "not judged: no evaluation of the trained weights was recorded", warnings, False, False
    where = f"the {kept_name} checkpoint (step {kept['step']})"
    if not kept.get("answer_rows"):
        warnings.append("the answers were not scored (no answer was generated); the score is dice@0.5 alone")
    if before is None:
        return (f"{where}: score {kept['score']:.3f}; not compared with before training (this run recorded no "
                f"evaluation before its first step)"), warnings, False, False

    def dropped(key: str) -> bool:
        return before.get(key) is not None and kept.get(key) is not None and kept[key] < before[key]

    def change(key: str, label: str) -> str:
        return f"{label} {before[key]:.3f} -> {kept[key]:.3f}"

    worse_answers = [k for k in ("zone_acc_text", "agreement") if dropped(k)]
    masks_worse = dropped("dice_at_05")
    if worse_answers:
        warnings.append(f"the answers got worse than before training in {where}: "
                        + ", ".join(change(k, k) for k in worse_answers)
                        + "; the adapter was still written from these weights, so check its answers before using it")
    if masks_worse:
        warnings.append(f"the masks got worse than before training in {where}: {change('dice_at_05', 'dice@0.5')}")
    for key, what in (("hit_length_limit", f"ran to the length limit of {max_new_tokens} tokens"),
                      ("repeated_words", "repeat a word back to back")):
        now, then = kept.get(key), before.get(key)
        if now and (then is None or now > then):
            was = f" (before training: {_pct(then)})" if then is not None else ""
            warnings.append(f"{_pct(now)} of the answers in {where} {what}{was}: they may be degenerate")

    if worse_answers:
        verdict = ("worse than before training: the answers got worse ("
                   + ", ".join(change(k, k) for k in worse_answers) + f") in {where}")
    elif masks_worse:
        verdict = (f"worse than before training: the masks got worse ({change('dice_at_05', 'dice@0.5')}) in "
                   f"{where}; the answers did not")
    elif kept["score"] > before["score"]:
        verdict = f"better than before training: score {before['score']:.3f} -> {kept['score']:.3f} in {where}"
    else:
        verdict = f"no better than before training: score {before['score']:.3f} -> {kept['score']:.3f} in {where}"
    return verdict, warnings, bool(worse_answers), masks_worse


def build_report(*, validation: str, rows: int, before: dict | None, best: dict | None, last: dict | None,
                 kept: str, final_step: int, max_new_tokens: int,
                 answers_unavailable: str | None = None) -> dict[str, Any]:
    """The run's report. ``before``, ``best`` and ``last`` are evaluations (the trainer's score dicts, each with its
    ``step``); ``kept`` is "best" or "last", the weights the adapter holds; ``final_step`` the run's last step."""
    report: dict[str, Any] = {
        "validation": validation,
        "rows": rows,
        "score_definition": SCORE_DEFINITION,
        "kept": kept,
        "before": _rounded(before),
        "best": _rounded(best),
        "last": _rounded(last),
        "answers_worse": False,
        "masks_worse": False,
        "verdict": "",
        "warnings": [],
    }
    if not rows:
        report["verdict"] = (f"not judged: this run had no validation rows ({validation}); nothing says whether "
                             f"training helped")
        report["warnings"] = ["no validation rows: the adapter holds the last weights, unchecked"]
        return report
    kept_scores = report["best"] if kept == "best" else report["last"]
    verdict, warnings, answers_worse, masks_worse = judge(report["before"], kept_scores, kept_name=kept,
                                                          max_new_tokens=max_new_tokens)
    if answers_unavailable:
        warnings = [f"answers were not scored: {answers_unavailable}"] + [
            w for w in warnings if not w.startswith("the answers were not scored")]
    last_step = report["last"]["step"] if report["last"] else None
    if kept == "last" and last_step is not None and last_step != final_step:
        warnings.append(f"the adapter holds the weights of step {final_step}, which were not evaluated (the last "
                        f"evaluation was at step {last_step})")
    report.update(verdict=verdict, warnings=warnings, answers_worse=answers_worse, masks_worse=masks_worse)
    return report


def format_report(report: dict[str, Any]) -> str:
    """A small table for the end of ``prsmed train``: before / best / last, then the verdict and warnings."""
    lines = [f"validation: {report['validation']}"]
    if not report.get("rows"):
        lines.append(f"verdict: {report['verdict']}")
        lines += [f"warning: {w}" for w in report.get("warnings", [])]
        return "\n".join(lines)
    columns = []
    for name in ("before", "best", "last"):
        scores = report.get(name)
        step = f" (step {scores['step']})" if scores and scores.get("step") is not None else ""
        mark = " *" if name == report.get("kept") else ""
        columns.append((f"{name}{step}{mark}", scores))
    label_width = max(len(label) for label, _, _ in TABLE)
    widths = [max(len(title), 8) for title, _ in columns]
    header = " " * label_width + "".join(f"  {title:>{w}}" for (title, _), w in zip(columns, widths))
    lines.append(header)
    for label, key, pct in TABLE:
        cells = []
        for (_, scores), w in zip(columns, widths):
            v = scores.get(key) if scores else None
            text = "-" if v is None else (_pct(v) if pct else f"{v:.3f}")
            cells.append(f"  {text:>{w}}")
        lines.append(f"{label:<{label_width}}" + "".join(cells))
    kept = report.get(report.get("kept") or "")
    answered = kept.get("answer_rows") if kept else None
    lines.append(f"* the weights in the adapter; answers scored on {answered if answered is not None else 0} of "
                 f"{report['rows']} validation rows")
    lines.append(f"score: {SCORE_DEFINITION}")
    examples = (kept or {}).get("examples") or []
    for answer in examples[:2]:
        lines.append(f"example answer: {answer!r}")
    lines.append(f"verdict: {report['verdict']}")
    lines += [f"warning: {w}" for w in report.get("warnings", [])]
    return "\n".join(lines)


def format_markdown(report: dict[str, Any]) -> str:
    """The report as a model card section (Markdown)."""
    lines = [f"Validation: {report['validation']}."]
    if not report.get("rows"):
        return "\n".join(lines + ["", f"**Verdict:** {report['verdict']}"])
    titles, columns = [], []
    for name, title in (("before", "before training"), ("best", "best"), ("last", "last")):
        scores = report.get(name)
        step = f" (step {scores['step']})" if scores and scores.get("step") is not None else ""
        kept = " — in this adapter" if name == report.get("kept") else ""
        titles.append(f"{title}{step}{kept}")
        columns.append(scores)
    lines += ["", "| | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
    for label, key, pct in TABLE:
        cells = []
        for scores in columns:
            v = scores.get(key) if scores else None
            cells.append("–" if v is None else (_pct(v) if pct else f"{v:.3f}"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Score: {SCORE_DEFINITION}.", "", f"**Verdict:** {report['verdict']}"]
    if report.get("warnings"):
        lines += ["", *(f"- {w}" for w in report["warnings"])]
    return "\n".join(lines)
