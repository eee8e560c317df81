"""Malformed inputs to the lab's library functions: one DataError / ReportFormatError naming the file, nothing written.

* the MNIST loader validates the IDX files it reads (shapes, dtypes, counts, label range, damaged ``.gz``);
* a result JSON that looks like deadrelu's but does not parse is an error, not silently left out of the report;
* a run never replaces a ``results.json`` / ``NAME.json`` / ``report.html`` in ``--out`` that deadrelu did not write.
"""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from deadrelu.errors import DataError, DeadReluError, ReportFormatError
from deadrelu.lab.datasets import MNIST_FILES, load_dataset
from deadrelu.lab.idx import write_idx

TRAIN_IMG, TRAIN_LAB, TEST_IMG, TEST_LAB = MNIST_FILES


def _mnist_dir(root, gz=False, **replace):
    """Four tiny, valid MNIST IDX files in ``root`` (20 train, 10 test 28×28 images); ``replace`` swaps some."""
    g = torch.Generator().manual_seed(0)
    files = {
        TRAIN_IMG: torch.randint(0, 256, (20, 28, 28), dtype=torch.uint8, generator=g),
        TRAIN_LAB: torch.arange(20, dtype=torch.uint8) % 10,
        TEST_IMG: torch.randint(0, 256, (10, 28, 28), dtype=torch.uint8, generator=g),
        TEST_LAB: torch.arange(10, dtype=torch.uint8),
    }
    files.update(replace)
    root.mkdir(parents=True, exist_ok=True)
    for name, tensor in files.items():
        write_idx(root / (name + (".gz" if gz else "")), tensor)
    return root


def test_valid_tiny_mnist_files_load(tmp_path):
    ds = load_dataset("mnist", data_dir=_mnist_dir(tmp_path / "ok"))
    assert ds.x_train.shape == (20, 784) and ds.x_val.shape == (10, 784)
    assert ds.y_train.dtype == torch.int64 and int(ds.y_train.max()) == 9
    ds = load_dataset("mnist", data_dir=_mnist_dir(tmp_path / "gz", gz=True))
    assert ds.x_train.shape == (20, 784)


BAD_MNIST = {
    "label 10 or more": ({TRAIN_LAB: torch.full((20,), 111, dtype=torch.uint8)}, TRAIN_LAB, "0..9"),
    "negative label": ({TEST_LAB: torch.full((10,), -1, dtype=torch.int8)}, TEST_LAB, "0..9"),
    "header declares 0 items": ({TRAIN_IMG: torch.zeros(0, 28, 28, dtype=torch.uint8),
                                 TRAIN_LAB: torch.zeros(0, dtype=torch.uint8)}, TRAIN_IMG, "no samples"),
    "labels file holds images": ({TRAIN_LAB: torch.zeros(20, 28, 28, dtype=torch.uint8)}, TRAIN_LAB, "label per image"),
    "2-D labels": ({TRAIN_LAB: torch.zeros(20, 2, dtype=torch.uint8)}, TRAIN_LAB, "label per image"),
    "float labels": ({TRAIN_LAB: torch.rand(20)}, TRAIN_LAB, "integer label"),
    "2-D images": ({TEST_IMG: torch.zeros(10, 784, dtype=torch.uint8)}, TEST_IMG, "uint8 images"),
    "float images": ({TRAIN_IMG: torch.rand(20, 28, 28)}, TRAIN_IMG, "uint8 images"),
    "fewer labels than images": ({TRAIN_LAB: torch.zeros(19, dtype=torch.uint8)}, TRAIN_LAB, "19 labels"),
    "test images of another size": ({TEST_IMG: torch.zeros(10, 20, 20, dtype=torch.uint8)}, TEST_IMG, "same size"),
}


@pytest.mark.parametrize("case", sorted(BAD_MNIST))
def test_malformed_mnist_files_are_one_data_error_naming_the_file(case, tmp_path):
    replace, culprit, words = BAD_MNIST[case]
    root = _mnist_dir(tmp_path / "mnist", **replace)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=root)
    message = str(info.value)
    assert "\n" not in message and culprit in message and words in message


def test_a_truncated_gz_mnist_file_is_one_data_error_naming_it(tmp_path):
    root = _mnist_dir(tmp_path / "mnist", gz=True)
    path = root / (TRAIN_IMG + ".gz")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="damaged gzip") as info:
        load_dataset("mnist", data_dir=root)
    assert str(path) in str(info.value)
    (root / (TEST_LAB + ".gz")).write_bytes(gzip.compress(b"x")[:-3] + b"zzz")  # bad CRC / garbage tail
    path.write_bytes(raw)
    with pytest.raises(DataError, match=TEST_LAB):
        load_dataset("mnist", data_dir=root)


# -- results that do not parse ------------------------------------------------------------------------
def test_a_truncated_result_is_an_error_naming_it_not_skipped(tmp_path):
    from deadrelu.lab.html_report import load_results, saved_results

    (tmp_path / "init.json").write_text('{"kind": "deadrelu.evidence", "experiment": "in')
    with pytest.raises(ReportFormatError, match="init.json") as info:
        load_results(tmp_path)
    assert "no deadrelu results" not in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ReportFormatError, match="init.json"):
        saved_results(tmp_path)
    assert saved_results(tmp_path, skip="init.json") == []  # the file a run is about to replace


def test_a_damaged_file_carrying_the_evidence_marker_is_an_error_whatever_its_name(tmp_path):
    from deadrelu.lab.html_report import saved_results

    (tmp_path / "mine-copy.json").write_bytes(b'{"kind": "deadrelu.evidence", "x": "\xff\xfe')
    with pytest.raises(ReportFormatError, match="mine-copy.json"):
        saved_results(tmp_path)


def test_other_programs_broken_json_is_still_left_alone(tmp_path):
    from deadrelu.lab.html_report import saved_results

    (tmp_path / "settings.json").write_text("{broken")
    (tmp_path / "notes.json").write_text('{"my": "data"}')
    assert saved_results(tmp_path) == []


# -- outputs deadrelu did not write -------------------------------------------------------------------
@pytest.mark.parametrize("name, results_name", [("results.json", "results.json"), ("init.json", "init.json"),
                                                ("report.html", "results.json")])
def test_plan_outputs_refuses_to_replace_a_file_deadrelu_did_not_write(name, results_name, tmp_path):
    from deadrelu.lab.demo import plan_outputs

    (tmp_path / name).write_text('{"my": "precious results"}' if name.endswith(".json") else "<p>mine</p>")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(DeadReluError) as info:
        plan_outputs(tmp_path, "demo", results_name=results_name)
    message = str(info.value)
    assert name in message and "not" in message and "--out" in message and "\n" not in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_plan_outputs_accepts_files_deadrelu_wrote(tmp_path):
    from deadrelu.lab.demo import plan_outputs

    (tmp_path / "results.json").write_text(json.dumps({"kind": "deadrelu.evidence", "experiment": "demo"}))
    (tmp_path / "report.html").write_text('<!DOCTYPE html>\n<html><head></head><body><p class="meta">deadrelu 1.0, '
                                          "rendered today</p></body></html>\n")
    plan = plan_outputs(tmp_path, "demo", plots=False)
    assert plan.saved == []
