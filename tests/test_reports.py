"""The study index page: links every report and shows the headline table from the study's results."""

from pathlib import Path

import pytest

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


def test_index_shows_the_answers_as_tables_that_fit_the_page(tmp_path):
    from saelib.answers import QUESTIONS, write_answers

    reports = tmp_path / "reports"
    write_answers("fx", FIXTURE, reports, readme=None)
    page = build_index("fx", FIXTURE, reports)
    answers = page.read_text().split("<h2>Answers</h2>")[1].split("<h2>")[0]
    for question in QUESTIONS.values():
        assert f"<h3>{question}</h3>" in answers
    # one verdict table per question, every one rendered; the fixture has no Matryoshka/OrtSAE run to control with,
    # and its runs predate the firing-based absorption numbers
    assert "No Matryoshka or OrtSAE runs in this study." in answers
    assert "No firing-based absorption results in this study." in answers
    assert answers.count("<table>") == len(QUESTIONS) - 2
    assert '>sgo_t0.02_l0.02</td>' in answers and '<img src="headline.png"' in answers
    assert fits_width(page)


def rendered_dom(page: Path) -> str:
    """``page``'s DOM after headless Chromium ran its scripts with no network (FACTS: `--dump-dom`)."""
    import shutil
    import subprocess
    import tempfile

    import pytest

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run(
            [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
             "--virtual-time-budget=10000", "--window-size=1280,2000", "--dump-dom", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120).stdout


def drawn_plots(page: Path) -> int:
    """Plotly figures drawn in ``page`` (plotly draws a few ``main-svg`` layers per figure)."""
    return rendered_dom(page).count('class="main-svg"')


def probe(page: Path, expression: str) -> str:
    """The value of a JavaScript ``expression`` evaluated in ``page`` after it loaded in Chromium (1280 px wide), read
    from a copy beside it (same relative links) that writes it into the DOM."""
    import re

    copy = page.with_name(page.stem + ".probe.html")
    copy.write_text(page.read_text().replace("</body>", "<script>window.addEventListener('load', () => "
                    f"document.body.setAttribute('data-probe', String({expression})))</script></body>"))
    try:
        found = re.search(r'data-probe="([^"]*)"', rendered_dom(copy))
        return found.group(1) if found else ""
    finally:
        copy.unlink()


def styled(page: Path) -> bool:
    """Whether JupyterLab's theme CSS reached ``page`` (its variable ``--jp-layout-color0`` is set)."""
    return probe(page, "getComputedStyle(document.body).getPropertyValue('--jp-layout-color0').trim()") == "white"


def fits_width(page: Path) -> bool:
    """Whether ``page`` lays out within a 1280 px window: neither the page nor any output (a figure, a table)
    scrolls sideways."""
    return probe(page, "document.documentElement.scrollWidth <= window.innerWidth && [...document.querySelectorAll("
                 "'.jp-OutputArea-output, .wide')].every(e => e.scrollWidth <= e.clientWidth + 1)") == "true"


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
    from saelib.notebook import render_report

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


def _notebook_with_a_figure(path: Path) -> Path:
    import nbformat
    import plotly.graph_objects as go
    import plotly.io as pio

    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[3, 1, 2]))
    bundle = pio.renderers["notebook_connected"].to_mimebundle(fig.to_dict())
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("fig", outputs=[
        nbformat.v4.new_output("display_data", data=bundle)])])
    nbformat.write(nb, str(path))
    return path


def test_reports_share_one_stylesheet_instead_of_inlining_it(tmp_path):
    from saelib.notebook import render_report

    executed = _notebook_with_a_figure(tmp_path / "run.ipynb")
    reports = tmp_path / "reports"
    first = render_report(executed, reports / "a" / "run.html")
    render_report(executed, reports / "b" / "run.html")
    head = first.read_text().split("</head>")[0]
    assert "<style" not in head
    sheets = sorted(p.name for p in reports.glob("*.css"))
    assert len(sheets) == 1 and f'<link href="../{sheets[0]}" rel="stylesheet" type="text/css"/>' in head
    assert "jp-Notebook" in (reports / sheets[0]).read_text()  # JupyterLab's CSS, once for both studies
    assert first.stat().st_size < 50_000  # was ≈ 270 KB of inlined CSS per page
    assert styled(first) and drawn_plots(first) >= 1


def test_repoint_moves_committed_pages_onto_the_shared_files(tmp_path):
    import nbformat
    from nbconvert import HTMLExporter

    from saelib.reports import repoint
    from saelib.notebook import render_report

    executed = _notebook_with_a_figure(tmp_path / "run.ipynb")
    reports = tmp_path / "reports"
    old = reports / "st" / "old.html"  # as nbconvert writes it: CSS inlined, plotly.js from the CDN
    old.parent.mkdir(parents=True)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    old.write_text(exporter.from_notebook_node(nbformat.read(str(executed), 4))[0])
    assert "<style" in old.read_text().split("</head>")[0] and "cdn.plot.ly" in old.read_text()
    assert repoint(reports) == [old]
    assert old.read_text() == render_report(executed, reports / "st" / "new.html").read_text()
    assert repoint(reports) == []  # nothing left to move
    assert styled(old) and drawn_plots(old) >= 1


@pytest.mark.parametrize("notebook", ["compare", "competition"])
def test_study_reports_fit_the_page_show_whole_tables_and_draw(tmp_path, notebook):
    from saelib.notebook import execute, render_report

    executed = tmp_path / f"{notebook}.ipynb"
    execute(Path("notebooks") / f"{notebook}.ipynb", executed, {"study_dir": str(FIXTURE)})
    page = render_report(executed, tmp_path / "reports" / "fx" / f"{notebook}.html")
    assert "<td>...</td>" not in page.read_text() and "<th>...</th>" not in page.read_text()  # no pandas "…"
    assert fits_width(page) and drawn_plots(page) >= 3


STUDIES = sorted(p.parent for p in (Path(__file__).parents[1] / "reports").glob("*/answers.md"))
COMMITTED = sorted(p for study in STUDIES for p in study.glob("*.html") if p.stem in ("compare", "competition", "index"))


@pytest.mark.parametrize("study", STUDIES, ids=lambda p: p.name)
def test_committed_answers_read_at_a_glance_and_their_tables_are_whole(study):
    """The committed answers are the current generator's: verdict tables, at most a few short sentences per question
    (no paragraph of numbers), and the study's compare page shows every row of its tables (no pandas "…")."""
    prose = [ln for ln in (study / "answers.md").read_text().splitlines() if ln and not ln.startswith(("|", "!["))]
    assert max(map(len, prose)) <= 600, f"{study}/answers.md: a paragraph of numbers, not the verdict tables"
    assert "| config" in (study / "answers.md").read_text(), f"{study}/answers.md has no verdict table"
    for page in (study / "compare.html", study / "competition.html"):
        if page.exists():
            assert "<td>...</td>" not in page.read_text() and "<th>...</th>" not in page.read_text(), page


@pytest.mark.parametrize("page", COMMITTED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_committed_study_reports_draw_offline(page):
    import re

    text = page.read_text()
    assert not re.search(r'<(script|link)[^>]+(src|href)="https?://', text), "a report loads something from the network"
    assert "cdn.plot.ly" not in text, "a report imports plotly.js from its CDN"
    assert drawn_plots(page) > 0



def test_reports_written_side_by_side_share_one_file_without_a_race(tmp_path, monkeypatch):
    # the runner renders several reports at once: a second writer that starts while the first is writing its
    # temporary file must not take that file from under it
    from saelib import plots

    real_atomic_write, nested = plots.atomic_write, []

    def with_a_second_writer(path, write, **kwargs):
        def write_then_let_another_write(tmp):
            write(tmp)  # the first writer's temporary is on disk now
            if not nested:
                nested.append(None)
                nested[0] = plots._shared_file("shared.bin", b"x" * 1000, tmp_path / "other" / "page.html")
        return real_atomic_write(path, write_then_let_another_write, **kwargs)

    monkeypatch.setattr(plots, "atomic_write", with_a_second_writer)
    assert plots._shared_file("shared.bin", b"x" * 1000, tmp_path / "study" / "page.html") == "../shared.bin"
    assert nested == ["../shared.bin"] and (tmp_path / "shared.bin").read_bytes() == b"x" * 1000
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["shared.bin"]  # no temporary left


def test_the_competition_report_shows_the_studys_own_orthogonal_configurations(tmp_path):
    """With no `contrast` given, the competition notebook puts TopK beside each orthogonal architecture's strongest-λ
    configuration of the study read (whatever they are named), not a fixed list of names."""
    import json
    import shutil

    from saelib.notebook import execute

    study = tmp_path / "st"
    for run in ("topk_s0", "topk_s1"):
        shutil.copytree(FIXTURE / run, study / run)
    for seed in (0, 1):  # renamed, and stronger than the fixture's other SGO configuration
        shutil.copytree(FIXTURE / f"sgo_t0.02_l0.02_s{seed}", study / f"strong_s{seed}")
        cfg = json.loads((study / f"strong_s{seed}" / "cfg.json").read_text())
        (study / f"strong_s{seed}" / "cfg.json").write_text(json.dumps({**cfg, "orth_pen": 100.0}))
        shutil.copytree(FIXTURE / f"sgo_t0.05_l0.02_s{seed}", study / f"sgo_t0.05_l0.02_s{seed}")
    executed = tmp_path / "competition.ipynb"
    execute(Path("notebooks") / "competition.ipynb", executed, {"study_dir": str(study)})
    first_output = next(o["text"] for c in json.loads(executed.read_text())["cells"] if c["cell_type"] == "code"
                        for o in c.get("outputs", []) if "details for" in "".join(o.get("text", "")))
    assert "'strong': 'strong_s0'" in "".join(first_output) and "sgo_t0.05_l0.02" not in "".join(first_output)
