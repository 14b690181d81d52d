"""The study index page: links every report and shows the headline table from the study's results."""

from pathlib import Path

from saelib.reports import build_index

FIXTURE = Path(__file__).parent / "fixtures" / "study"


def test_index_links_reports_and_shows_headline_table(tmp_path):
    reports = tmp_path / "reports"
    (reports / "fx").mkdir(parents=True)
    for name in ("topk_s0.html", "topk_s0.evaluate.html", "compare.html"):
        (reports / "fx" / name).write_text("<html></html>")
    index = build_index("fx", FIXTURE, reports)
    page = index.read_text()
    assert 'href="compare.html"' in page and 'href="topk_s0.evaluate.html"' in page
    assert "explained variance" in page and "sgo_t0.02_l0.02" in page and "±" in page
    empty = build_index("none", tmp_path / "missing", reports)
    assert "No eval results yet" in empty.read_text()
