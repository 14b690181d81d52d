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


def drawn_plots(page: Path) -> int:
    """Plotly figures drawn in ``page`` by headless Chromium with no network (FACTS: `--dump-dom`)."""
    import shutil
    import subprocess
    import tempfile

    import pytest

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000", "--dump-dom", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120).stdout
    return dom.count('class="main-svg"')


def test_index_page_loads_plotly_from_the_one_local_copy_and_draws_offline(tmp_path):
    import plotly

    reports = tmp_path / "reports"
    index = build_index("fx", FIXTURE, reports)
    page = index.read_text()
    assert "cdn.plot.ly" not in page and '<script charset="utf-8" src="../plotly.min.js">' in page
    shared = reports / "plotly.min.js"
    assert shared.read_bytes() == (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()
    build_index("fx2", FIXTURE, reports)  # a second study shares the same copy
    assert sorted(p.name for p in reports.iterdir()) == ["fx", "fx2", "plotly.min.js"]
    assert drawn_plots(index) >= 1


def test_notebook_reports_draw_their_figures_offline(tmp_path):
    import nbformat
    import plotly.graph_objects as go
    import plotly.io as pio

    from saelib import plots
    from saelib.study import render_report

    plots.use_report_renderer()
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2]))
    bundle = pio.renderers["notebook_connected"].to_mimebundle(fig.to_dict())
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("fig", outputs=[
        nbformat.v4.new_output("display_data", data=bundle)])])
    executed = tmp_path / "run.ipynb"
    nbformat.write(nb, str(executed))
    html = render_report(executed, tmp_path / "reports" / "study" / "run.html")
    assert "cdn.plot.ly" not in html.read_text()
    assert drawn_plots(html) >= 1  # plotly draws a few main-svg layers per figure
