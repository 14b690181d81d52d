"""``reports/<study>/index.html``: links to every HTML report of a study, its answers, headline table and figure.

Built by the study runner after the runs (and by ``python -m saelib.reports <study> [runs_dir]``). Numbers come from
``saelib.evals.results.study_results``; nothing is recomputed.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

from saelib.evals.results import HEADLINE, study_results, wide
from saelib.stats import summarise

REPORTS_DIR = Path("reports")


def build_index(study: str, study_dir: Path, reports_dir: Path = REPORTS_DIR) -> Path:
    from saelib import plots

    folder = Path(reports_dir) / study
    folder.mkdir(parents=True, exist_ok=True)
    pages = sorted(p for p in folder.glob("*.html") if p.name != "index.html")
    study_pages = [p for p in pages if p.stem in ("compare", "competition")]
    run_pages = [p for p in pages if p not in study_pages]
    parts = [f"<h1>Study {html.escape(study)}</h1>"]
    if study_pages:
        parts.append("<h2>Study reports</h2><ul>" + "".join(
            f'<li><a href="{p.name}">{p.stem}</a></li>' for p in study_pages) + "</ul>")
    answers = folder / "answers.md"
    if answers.exists():  # written by saelib.answers from the same results, just before the index
        import mistune

        render = mistune.create_markdown(plugins=["table"])
        parts.append("<h2>Answers</h2>" + render(answers.read_text()))
    results = study_results(study_dir) if Path(study_dir).is_dir() else None
    if results is not None and not results.empty:
        names = {key: name for key, (name, _) in HEADLINE.items()}
        table = summarise(results, names).pivot(index="config", columns="metric", values="text")
        table = table[[n for n in names.values() if n in table.columns]]
        parts.append("<h2>Headline metrics (mean ± 95 % CI over seeds)</h2>" + table.to_html(escape=True))
        runs = wide(results, names)
        if {"L0", "explained variance"} <= set(runs.columns):
            fig = plots.pareto(runs, "L0", "explained variance", "L0 vs explained variance (one point per run)")
            parts.append(fig.to_html(full_html=False, include_plotlyjs="cdn"))
    else:
        parts.append("<p>No eval results yet.</p>")
    parts.append("<h2>Run reports</h2><ul>" + "".join(
        f'<li><a href="{p.name}">{html.escape(p.stem)}</a></li>' for p in run_pages) + "</ul>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(study) +
            "</title></head><body style='font-family: sans-serif'>" + "\n".join(parts) + "</body></html>")
    index = folder / "index.html"
    tmp = index.with_name("index.html.tmp")
    tmp.write_text(plots.offline_plotlyjs(page, index))
    tmp.replace(index)
    return index


if __name__ == "__main__":
    study = sys.argv[1]
    runs_dir = Path(sys.argv[2]) if len(sys.argv) > 2 else Path("runs")
    print(build_index(study, runs_dir / study))
