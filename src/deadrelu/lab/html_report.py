"""One self-contained HTML report of saved evidence results (images embedded, no network).

The report reads only JSON written by the demo and the experiments: the summary at the
top says what died, where, and what fixed it best, with the numbers; then one section per
experiment with its table and its plots (PNG, embedded as base64 ``data:`` URIs). The page
loads no script, style sheet, font or image from anywhere else.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ..core.files import atomic_write_text, refuse_directory_name
from ..errors import DeadReluError, ReportFormatError
from .schema import newest_schema
from .tables import result_table
from .termination import sigterm_raises

__all__ = ["load_results", "saved_results", "result_plots", "render_html", "report_page", "write_report",
           "is_deadrelu_result", "is_deadrelu_page", "RESULT_NAMES", "CSP"]

#: The page's Content-Security-Policy: its images are data: URIs and its style is inline; it has no script,
#: so none is allowed, and nothing may load from anywhere else.
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

_ORDER = {"demo": 0, "rescue": 1, "preprocessing": 2, "lr-sweep": 3, "activations": 4, "init": 5}

_TITLES = {
    "demo": "The demo: dead ReLU units at a large learning rate, and five ways on from the same checkpoint",
    "rescue": "Rescue comparison",
    "preprocessing": "Preprocessing: inputs in [0, 1] vs standardised",
    "lr-sweep": "Learning-rate sweep: dead units vs learning rate",
    "activations": "Activation functions compared",
    "init": "Initialisation and depth: units born dead",
}

_CAPTIONS = {
    "layers": "Dead units per hidden layer after every epoch (training and validation set): median line and "
              "min–max band over seeds; after the checkpoint (dashed) the network trains on with no rescue.",
    "heatmap": "Every unit of every hidden layer at the checkpoint (first seed); black cells never fired on the "
               "training set; red cells, if any, produced NaN or infinite values: neither dead nor alive.",
    "rescue": "One panel per strategy, same axes: from the same checkpoint and on the same batches, the last "
              "hidden layer's dead units and the validation accuracy, median and min–max over seeds.",
    "bars": "Bars: mean over seeds; whiskers: min to max.",
    "bands": "The same seeds, weights and batches with either input scaling: median line, min–max band.",
    "depth": "Dead units at initialisation and after training, by depth and initialisation.",
}

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; max-width: 1100px; margin: 2em auto;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 3px solid #333; padding-bottom: .2em; }
h2 { margin-top: 2em; border-bottom: 1px solid #bbb; }
.summary { background: #f4f6fa; border-left: 5px solid #3b6fb6; padding: .6em 1.2em; }
table { border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
.meta { font-size: 0.85em; color: #555; }
"""


def load_results(results_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every evidence result (``kind == "deadrelu.evidence"``) saved as JSON in ``results_dir``, in report order.

    Raises:
        DeadReluError: the directory does not exist (or is a file), holds no evidence JSON, or holds
            one whose fields are missing or of the wrong type (the message names the file).

    Example:
        >>> results = load_results("deadrelu-demo")  # doctest: +SKIP
    """
    root = Path(results_dir)
    if not root.exists():
        raise DeadReluError(f"results directory {root} does not exist")
    found = saved_results(root)
    if not found:
        raise DeadReluError(
            f"no deadrelu results in {root}: run `deadrelu demo --out {root}` or "
            f"`deadrelu experiment NAME --out {root}` first"
        )
    return found


def saved_results(results_dir: str | os.PathLike[str], *, skip: str | None = None) -> list[dict[str, Any]]:
    """Like :func:`load_results`, but an empty list where the directory is missing or holds no result.

    ``skip`` is a file name left out (the one a run is about to replace). Each result is checked
    as the report renders it, text only; its plots are checked where they are drawn.

    Raises:
        DeadReluError: ``results_dir`` is a file, or a result in it is malformed (naming the file).
    """
    root = Path(results_dir)
    if root.exists() and not root.is_dir():
        raise DeadReluError(f"{root} is a file, not a directory: give the directory that holds the result JSON files")
    if not root.is_dir():
        return []  # nothing saved there yet (a run creates the directory)
    found = []
    for path in sorted(root.glob("*.json")):
        if path.name == skip:
            continue
        data = _read_result_json(path)
        if isinstance(data, dict) and data.get("kind") == "deadrelu.evidence":
            data["_file"] = path.name
            found.append(data)
    for result in found:
        _check_version(result)
        _check_renders(result)
    return _in_report_order(found)


def _check_version(result: dict[str, Any]) -> None:
    """A result of a newer schema than this deadrelu writes is refused: its fields may mean something else."""
    version = result.get("schema_version")
    if version is None:  # hand-written or from before versions: checked field by field
        return
    newest = newest_schema(result.get("experiment"))  # rescue.json has the demo's schema
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise DeadReluError(f"{result.get('_file', 'result')}: schema_version should be an int >= 1, got {version!r}")
    if version > newest:
        raise DeadReluError(
            f"{result.get('_file', 'result')} has schema_version {version}, newer than this deadrelu reads "
            f"(up to {newest}): upgrade deadrelu, or rerun the experiment with this one"
        )


#: The file names the demo (``results.json``) and the experiments (``NAME.json``) save their results as.
RESULT_NAMES = frozenset({"results.json"} | {f"{name}.json" for name in _ORDER if name != "demo"})

_MARKER = '"deadrelu.evidence"'


def _read_result_json(path: Path) -> Any:
    """A JSON file's contents; None for another program's unreadable JSON. A file that looks like a deadrelu
    result (a result's file name, or the evidence marker in its text) but does not parse is a ReportFormatError."""
    try:
        raw = path.read_bytes()
    except OSError:
        return None  # unreadable (a dangling link, no permission): not one this run can have written
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, a 5000-digit int, deep nesting
        if path.name in RESULT_NAMES or _MARKER.encode() in raw:
            problem = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ReportFormatError(
                f"{path} is not a readable deadrelu result (truncated or damaged: {problem}); "
                "run its experiment again or move the file away"
            ) from None
        return None  # other JSON files may live here; only evidence results are ours


def _same_file(a: Path, b: Path) -> bool:
    """``os.path.samefile``, False for a path that cannot be read (a dangling link: no results file)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def is_deadrelu_result(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a deadrelu evidence result (JSON whose ``kind`` is ``deadrelu.evidence``).

    Example:
        >>> is_deadrelu_result("no-such-file.json")
        False
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("kind") == "deadrelu.evidence"


def is_deadrelu_page(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` holds a report page :func:`render_html` wrote (fine to replace).

    Example:
        >>> is_deadrelu_page("no-such-page.html")
        False
    """
    try:
        with open(path, "rb") as f:
            head = f.read(65536)
    except OSError:
        return False
    return head.startswith(b"<!DOCTYPE html>") and b'<p class="meta">deadrelu ' in head


def _in_report_order(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(results, key=lambda r: (_ORDER.get(r.get("experiment", ""), 9), r.get("_file", "")))


def _invalid(result: dict[str, Any], err: Exception) -> DeadReluError:
    """The one-line error for a result a table, a sentence or a plot could not be drawn from."""
    if isinstance(err, DeadReluError):
        return DeadReluError(f"{result.get('_file', 'result')}: {err}")
    detail = f"missing field {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
    return DeadReluError(f"{result.get('_file', 'result')} is not a valid deadrelu result ({detail})")


_MALFORMED = (DeadReluError, KeyError, TypeError, ValueError, AttributeError, IndexError)


def _check_renders(result: dict[str, Any]) -> None:
    """A malformed result (hand-edited, truncated, another version's) is one DeadReluError naming its file."""
    try:
        render_html([result], images=False)  # the tables and text read every field the page's text needs
    except _MALFORMED as err:
        raise _invalid(result, err) from err


def result_plots(result: dict[str, Any]) -> dict[str, bytes]:
    """Every plot of one saved result as PNG bytes; a field only a plot reads, missing, is a DeadReluError."""
    from .plots import plot_pngs

    try:
        return plot_pngs(result)
    except _MALFORMED as err:
        raise _invalid(result, err) from err


def _table_html(rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _table_rows(result: dict[str, Any]) -> list[list[str]]:
    return result_table(result)


def _config_line(result: dict[str, Any]) -> str:
    cfg = result.get("config", {})
    parts = [f"{k}={v}" for k, v in cfg.items() if not isinstance(v, (dict, list)) or k in ("hidden", "lrs", "seeds")]
    ds = result.get("dataset", {})
    if ds:
        parts.insert(0, f"data: {ds.get('name')} ({ds.get('train')} train / {ds.get('validation')} validation; "
                        f"{ds.get('source')})")
    if "wall_seconds" in result:
        parts.append(f"wall time {result['wall_seconds']:.1f} s")
    return "; ".join(parts)


def _heading(result: dict[str, Any]) -> str:
    """A result's heading: its finding when it has one (the demo's), else its experiment's title."""
    kind = result.get("experiment", "?")
    finding = result.get("summary", {}).get("title")
    if finding:
        return f"{result.get('title') or _TITLES.get(kind, kind)} — {finding}"
    return result.get("title") or _TITLES.get(kind, kind)


def _section(result: dict[str, Any], index: int, images: bool, rendered: dict[str, dict[str, bytes]]) -> str:
    kind = result.get("experiment", "?")
    title = _heading(result)
    out = [f'<section id="{html.escape(kind)}-{index}"><h2>{html.escape(title)}</h2>']
    out.append(f'<p class="meta">{html.escape(_config_line(result))} — from {html.escape(result.get("_file", ""))}</p>')
    lines = result.get("summary", {}).get("lines", [])
    if lines:
        out.append("<ul>" + "".join(f"<li>{html.escape(l)}</li>" for l in lines) + "</ul>")
    out.append(_table_html(_table_rows(result)))
    if images:
        pngs = rendered.get(result.get("_file", "")) or result_plots(result)
        for name, png in pngs.items():
            data = base64.b64encode(png).decode("ascii")
            caption = _CAPTIONS.get(name, "")
            out.append(
                f'<figure><img alt="{html.escape(kind)} {html.escape(name)} plot" '
                f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
            )
    out.append("</section>")
    return "\n".join(out)


def _summary(results: Sequence[dict[str, Any]]) -> str:
    """The top box: each result's headline sentences (the demo's first)."""
    items = []
    for r in results:
        lines = r.get("summary", {}).get("lines", [])
        if lines:
            label = _heading(r)
            items.append(f"<h3>{html.escape(label)}</h3><ul>" + "".join(
                f"<li>{html.escape(l)}</li>" for l in lines) + "</ul>")
    return '<div class="summary"><h2 id="summary">Summary</h2>' + "".join(items) + "</div>"


def render_html(
    results: Sequence[dict[str, Any]],
    *,
    images: bool = True,
    title: str | None = None,
    rendered: dict[str, dict[str, bytes]] | None = None,
) -> str:
    """The full report page as a string.

    Args:
        results: result dicts (as :func:`load_results` returns them).
        images: embed the plots (needs matplotlib).
        title: the page title; by default the first result's finding (the demo's headline,
            computed from its numbers), so the title never claims what the run did not show.
        rendered: per result file name, plots already drawn from that very result (name → PNG
            bytes), so a caller that just wrote them does not draw them twice.

    Raises:
        DeadReluError: when ``results`` is empty.

    Example:
        >>> page = render_html(load_results("deadrelu-demo"))  # doctest: +SKIP
    """
    if not results:
        raise DeadReluError("no results to report")
    from .. import __version__

    if title is None:
        finding = next((r["summary"]["title"] for r in results if r.get("summary", {}).get("title")), None)
        title = f"deadrelu evidence: {finding}" if finding else "deadrelu evidence report"
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    sections = "\n".join(_section(r, i, images, rendered or {}) for i, r in enumerate(results))
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        # No external resources at all: the CSP tells the browser to refuse any that slip in.
        f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="meta">deadrelu {__version__}, rendered {stamp} from {len(results)} saved result(s).</p>'
        f"{_summary(results)}\n{sections}\n</body></html>\n"
    )


def report_page(
    saved: Sequence[dict[str, Any]],
    new: dict[str, dict[str, Any]],
    *,
    images: bool = True,
    rendered: dict[str, dict[str, bytes]] | None = None,
) -> str:
    """The report page of ``saved`` results (from :func:`saved_results`) plus ``new`` ones, file name → result,
    that a run has not written yet: its outputs can then all be written together.

    Example:
        >>> page = report_page([], {"lr-sweep.json": result})  # doctest: +SKIP
    """
    results = list(saved) + [dict(result, _file=name) for name, result in new.items()]
    return render_html(_in_report_order(results), images=images, rendered=rendered)


def write_report(
    results_dir: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    images: bool = True,
    rendered: dict[str, dict[str, bytes]] | None = None,
) -> Path:
    """Render ``results_dir``'s saved results to ``out`` (default ``results_dir/report.html``); returns the path.

    ``rendered`` passes plots already drawn, as :func:`render_html` takes them.

    Raises:
        DeadReluError: no results in the directory, ``out`` names a directory (``out/``) or is one of
            the JSON files it reads, or (``out`` not given) ``results_dir/report.html`` exists and is
            not a page deadrelu wrote.

    Example:
        >>> path = write_report("deadrelu-demo")  # doctest: +SKIP
    """
    if out is not None:
        refuse_directory_name(out, "the report to ")  # before Path(), which drops the "/" of "out/"
    results = load_results(results_dir)
    target = Path(out) if out is not None else Path(results_dir) / "report.html"
    if out is None and target.is_file() and not is_deadrelu_page(target):
        raise DeadReluError(
            f"{target} exists and is not a report deadrelu wrote; it was left as it is: "
            "pass --out FILE to write the report elsewhere, or delete the file"
        )
    for read in Path(results_dir).glob("*.json"):  # every one of them was read: none may be replaced
        if target.exists() and _same_file(target, read):
            raise DeadReluError(f"cannot write the report to {target}: it is the results file {read}, which it would overwrite")
    page = render_html(results, images=images, rendered=rendered)
    target.parent.mkdir(parents=True, exist_ok=True)
    with sigterm_raises():  # a SIGTERM mid-write removes the temporary file (see lab/termination.py)
        atomic_write_text(target, page)
    return target
