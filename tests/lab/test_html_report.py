"""The HTML report: self-contained, every plot embedded; opened in headless Chromium without network."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from deadrelu.cli.main import main  # noqa: E402
from deadrelu.lab.datasets import load_dataset  # noqa: E402
from deadrelu.lab.demo import DemoSetting, seeds_story, write_results  # noqa: E402
from deadrelu.errors import DeadReluError  # noqa: E402
from deadrelu.lab.experiments import lr_sweep  # noqa: E402
from deadrelu.lab.html_report import CSP, load_results, render_html  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync",
    # Any attempt to reach the network fails: no DNS, and a proxy nobody listens on.
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9",
]

# Runs after load and writes what the page really rendered into the DOM, for --dump-dom to read.
_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var out = {
    images: imgs.length,
    decoded: imgs.filter(function (i) { return i.complete && i.naturalWidth > 0 && i.naturalHeight > 0; }).length,
    h1: Array.prototype.map.call(document.querySelectorAll('h1'), function (h) { return h.textContent; }),
    h2: Array.prototype.map.call(document.querySelectorAll('h2'), function (h) { return h.textContent; }),
    network: performance.getEntriesByType('resource').map(function (e) { return e.name; })
      .filter(function (n) { return !n.startsWith('data:'); })
  };
  var pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    story = seeds_story(load_dataset("digits"), seeds=(0, 1), progress=False,
                        setting=DemoSetting(checkpoint_epoch=1, epochs=1, hidden=(16, 16)))
    story["experiment"] = "demo"
    write_results(story, root / "results.json")
    write_results(lr_sweep(lrs=(0.01, 1e4), seeds=(0,), epochs=1, progress=False), root / "lr-sweep.json")
    (root / "unrelated.json").write_text('{"not": "ours"}')
    return root


@pytest.fixture(scope="module")
def report_path(results_dir):
    assert main(["report", str(results_dir)]) == 0
    return results_dir / "report.html"


def test_report_cli_prints_where_it_went(results_dir, capsys):
    out = results_dir / "elsewhere" / "r.html"
    assert main(["report", str(results_dir), "--out", str(out)]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    assert out.is_file()


@pytest.mark.parametrize("name", ["results.json", "lr-sweep.json", "unrelated.json"])
def test_report_refuses_to_overwrite_a_file_it_reads(results_dir, capsys, name):
    before = (results_dir / name).read_bytes()
    assert main(["report", str(results_dir), "--out", str(results_dir / name)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "it would overwrite" in err and "Traceback" not in err, err
    assert (results_dir / name).read_bytes() == before


def test_report_is_self_contained(report_path):
    page = report_path.read_text(encoding="utf-8")
    # No external resource of any kind: every src is a data: URI, no stylesheet links, no url(...).
    srcs = re.findall(r'\bsrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "url(" not in page and "@import" not in page
    assert len(srcs) == 3 + 1  # demo: layers, heatmap, rescue; lr-sweep: bars
    assert page.index('id="summary"') < page.index('id="demo-0"') < page.index('id="lr-sweep-1"')
    # The summary quotes the measured numbers, e.g. the lr-sweep divergence and the demo's verdicts.
    assert "diverged (NaN) in all 1 seeds" in page
    story = json.loads((report_path.parent / "results.json").read_text())
    for verdict in story["summary"]["verdicts"].values():
        assert html.escape(verdict["text"], quote=False) in page


def test_page_title_is_the_runs_finding(report_path):
    story = json.loads((report_path.parent / "results.json").read_text())
    page = report_path.read_text(encoding="utf-8")
    finding = story["summary"]["title"]
    median = story["summary"]["last_layer_dead_fraction"]
    assert finding.startswith(f"{100 * median:.0f}% of the last hidden layer dead by epoch 1")
    assert f"<title>deadrelu evidence: {html.escape(finding)}</title>" in page


def test_results_loading_errors(tmp_path):
    with pytest.raises(DeadReluError, match="does not exist"):
        load_results(tmp_path / "missing")
    (tmp_path / "x.json").write_text("{broken")
    with pytest.raises(DeadReluError, match="no deadrelu results"):
        load_results(tmp_path)
    with pytest.raises(DeadReluError, match="no results"):
        render_html([])
    assert main(["report", str(tmp_path)]) == 2


def _chromium(args, tmp_path, timeout=90):
    return subprocess.run(
        [CHROMIUM, *_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
        capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
    )


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_chromium_renders_every_heading_and_decodes_every_image(report_path, tmp_path):
    # The report allows no script (its CSP); the probe is one, so this copy of the page lets inline scripts run.
    page = report_path.read_text(encoding="utf-8").replace(CSP, CSP + "; script-src 'unsafe-inline'")
    page = page.replace("</body>", _PROBE + "</body>")
    probe_page = tmp_path / "probe.html"
    probe_page.write_text(page, encoding="utf-8")
    run = _chromium(["--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()], tmp_path)
    match = re.search(r'<pre id="probe">(.*?)</pre>', run.stdout, re.S)
    assert match, f"probe did not run; stderr: {run.stderr[-2000:]}"
    probe = json.loads(html.unescape(match.group(1)))
    assert probe["images"] == 4 and probe["decoded"] == 4
    story = json.loads((report_path.parent / "results.json").read_text())
    assert probe["h1"] == [f"deadrelu evidence: {story['summary']['title']}"]
    assert "Summary" in probe["h2"]
    assert any("demo" in h for h in probe["h2"]) and any("Dead units vs learning rate" in h for h in probe["h2"])
    assert probe["network"] == []


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")
def test_chromium_screenshot_is_not_blank(report_path, tmp_path):
    shot = tmp_path / "shot.png"
    run = _chromium([f"--screenshot={shot}", "--window-size=1200,5000", report_path.as_uri()], tmp_path)
    assert shot.is_file(), f"no screenshot; stderr: {run.stderr[-2000:]}"
    import matplotlib.image as mpimg

    pixels = mpimg.imread(str(shot))[..., :3]
    assert pixels.shape[:2] == (5000, 1200)  # tall enough to reach the plots below the summary
    not_white = (pixels < 0.9).any(axis=2).mean()
    colourful = (pixels.max(axis=2) - pixels.min(axis=2) > 0.2).mean()
    assert not_white > 0.02  # text, tables and plots are drawn
    assert colourful > 0.005  # and the plots are in colour, i.e. the images rendered


def test_an_older_single_seed_demo_result_is_one_clear_error(tmp_path, capsys):
    old = {"kind": "deadrelu.evidence", "schema_version": 1, "experiment": "demo", "config": {},
           "summary": {"lines": []}, "checkpoint": {"layers": []}, "strategies": {}}
    (tmp_path / "results.json").write_text(json.dumps(old))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "schema 1" in err and "rerun" in err


@pytest.mark.parametrize("name", ["results.json", "lr-sweep.json"])
@pytest.mark.parametrize("version", [99, "2", 0])
def test_a_result_of_a_newer_or_malformed_schema_is_refused(results_dir, tmp_path, capsys, name, version):
    # the same files render (the fixture's report); only the version differs
    for f in results_dir.glob("*.json"):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data = json.loads((tmp_path / name).read_text())
    data["schema_version"] = version
    (tmp_path / name).write_text(json.dumps(data))
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and name in err and "schema_version" in err, err
    assert not (tmp_path / "report.html").exists()
