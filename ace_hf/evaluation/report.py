"""The suite's results as one Markdown table (results.md, model cards).

Imports nothing beyond the standard library: `ace_hf.hub` builds model cards from results.json with it, and
publishing an encoder must not load the renderer or the suite.
"""

from __future__ import annotations

from typing import Any

HEADLINE_METRICS = (
    ("anatomical matching (bal. acc.)", ("properties", "anatomical_matching", "balanced_accuracy")),
    ("landmark error (median px)", ("properties", "landmark_matching", "median_error_px")),
    ("landmark PCK@stride", ("properties", "landmark_matching", "pck")),
    ("view correspondence (acc.)", ("properties", "view_correspondence", "accuracy")),
)


def headline_rows(results: dict[str, Any]) -> list[tuple[str, float]]:
    """(metric name, value) pairs of one encoder's results, in the order of the Markdown table."""
    rows = []
    for name, path in HEADLINE_METRICS:
        value: Any = results
        for key in path:
            value = value[key]
        rows.append((name, value))
    for task, unit in (("segmentation", "mIoU"), ("classification", "AUC")):
        for key, value in results[task].items():
            mode, shots, _ = key.split("_")
            rows.append((f"{task} {mode} {shots} ({unit})", value))
    return rows


def results_markdown(results: dict[str, dict[str, Any]]) -> str:
    """One Markdown table: a row per metric, a column per evaluated encoder (and the pixel baseline's), then
    the chance levels and what each non-encoder column is."""
    names = list(results)
    table = {name: dict(headline_rows(result)) for name, result in results.items()}
    metrics = list(table[names[0]])
    lines = ["| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for metric in metrics:
        # A score a column does not have (the pixel baseline is not fine-tuned) shows as "-".
        cells = [_format_value(table[name][metric]) if metric in table[name] else "-" for name in names]
        lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    first = results[names[0]]["properties"]
    matching = first["anatomical_matching"]
    # results.json files written before the position-only reference existed still render (model cards).
    same_place = (
        f" (the same place in the other image: {matching['position_only']:.3f})"
        if "position_only" in matching
        else ""
    )
    lines.append("")
    lines.append(
        f"Chance: anatomical matching {matching['chance']:.3f} over "
        f"{matching['num_structures']} structures{same_place}; view correspondence "
        f"{first['view_correspondence']['chance']:.3f}; landmark error of a position-only guess "
        f"{first['landmark_matching']['position_only_median_error_px']:.1f} px; AUC 0.5."
    )
    # Columns that are not encoders say what they are (results.json files from before them have none).
    lines.extend(
        f"\n{name}: {result['features']}." for name, result in results.items() if "features" in result
    )
    return "\n".join(lines) + "\n"


def _format_value(value: float) -> str:
    """Three decimals for scores, one for pixel errors and other values of 10 and above."""
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3f}"
