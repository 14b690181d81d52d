"""``reports/<study>/index.html``: links to every HTML report of a study, its answers, headline table and figure.

Built by the study runner after the runs (and by ``python -m saelib.reports <study> [runs_dir]``). Numbers come from
``saelib.evals.results.study_results``; nothing is recomputed.
"""

from __future__ import annotations

import html
import sys
from pathlib import Path

from saelib.evals.results import HEADLINE, study_results, wide
from saelib.run_files import REPORTS_DIR, write_text_atomic
from saelib.stats import summarise

INDEX_CSS = ("body {font-family: sans-serif; max-width: 1400px; margin: auto; padding: 0 1em} "
             "img {max-width: 100%} .wide {overflow-x: auto} "
             "table {border-collapse: collapse; font-size: 12px; margin: 0.5em 0} "
             "th, td {border-bottom: 1px solid #ddd; padding: 3px 6px; text-align: right; vertical-align: top} "
             "th:first-child, td:first-child {text-align: left; white-space: nowrap}")
"""The index page's own few rules: tables that read at a glance, and nothing wider than the window."""


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
        page = render(answers.read_text())
        for word, colour in plots.VERDICT_COLOURS.items():  # verdicts stand out by colour, as in the figures
            page = page.replace(f"<strong>{word}</strong>", f'<strong style="color: {colour}">{word}</strong>')
        parts.append("<h2>Answers</h2>" + page.replace("<table>", '<div class="wide"><table>').replace(
            "</table>", "</table></div>"))
    results = study_results(study_dir) if Path(study_dir).is_dir() else None
    if results is not None and not results.empty:
        names = {key: name for key, (name, _) in HEADLINE.items()}
        table = summarise(results, names).pivot(index="config", columns="metric", values="text")
        table = table[[n for n in names.values() if n in table.columns]]
        parts.append("<h2>Headline metrics (mean ± 95 % CI over seeds)</h2><div class='wide'>"
                     + table.to_html(escape=True) + "</div>")
        runs = wide(results, names)
        if {"L0", "explained variance"} <= set(runs.columns):
            fig = plots.pareto(runs, "L0", "explained variance", "L0 vs explained variance (one point per run)")
            parts.append(fig.to_html(full_html=False, include_plotlyjs="cdn"))
    else:
        parts.append("<p>No eval results yet.</p>")
    parts.append("<h2>Run reports</h2><ul>" + "".join(
        f'<li><a href="{p.name}">{html.escape(p.stem)}</a></li>' for p in run_pages) + "</ul>")
    page = ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + html.escape(study) + "</title>"
            f"<style data-inline>{INDEX_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>")
    index = folder / "index.html"
    write_text_atomic(index, plots.offline_report(page, index))
    return index


def repoint(reports_dir: Path = REPORTS_DIR) -> list[Path]:
    """Rewrite every committed ``<reports_dir>/<study>/*.html`` as :func:`saelib.plots.offline_report` would write it
    now (shared plotly.js and notebook CSS); the pages it changed. Running it twice changes nothing."""
    from saelib import plots

    if not Path(reports_dir).is_dir():
        raise FileNotFoundError(f"reports_dir: expected a folder of study reports such as reports, "
                                f"got {str(reports_dir)!r}")
    changed = []
    for page in sorted(Path(reports_dir).glob("*/*.html")):
        text = page.read_text(encoding="utf-8")
        new = plots.offline_report(text, page)
        if new != text:
            write_text_atomic(page, new)
            changed.append(page)
    return changed


def main(argv: list[str] | None = None) -> int:
    """``python -m saelib.reports <study> [runs_dir]``: build the study's index page;
    ``python -m saelib.reports --repoint [reports_dir]``: re-point committed pages at the shared files."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--repoint", action="store_true", help="re-point every reports/<study>/*.html; the "
                        "positional argument is then the reports folder (default reports)")
    parser.add_argument("target", nargs="?", help="study (or, with --repoint, the reports folder)")
    parser.add_argument("runs_dir", nargs="?", default="runs")
    args = parser.parse_args(argv)
    if args.repoint:
        changed = repoint(Path(args.target or REPORTS_DIR))
        print(f"{len(changed)} page(s) re-pointed")
    elif args.target is None:
        parser.error("study: name the study whose index to build, e.g. default")
    else:
        print(build_index(args.target, Path(args.runs_dir) / args.target))
    return 0


if __name__ == "__main__":
    sys.exit(main())
