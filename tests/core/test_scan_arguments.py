"""Bad ``unit_dim`` and ``device`` options of ``deadrelu.scan``: one clear DeadReluError, raised before
any batch runs, naming what is wrong, and the model left as it was."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import deadrelu
from deadrelu.core.capture import checked_unit_dim
from deadrelu.errors import DeadReluError, ForwardError


class Counting(nn.Module):
    """Linear -> functional ReLU -> Linear, counting its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.fc2(F.relu(self.fc1(x)))


def state(model: nn.Module) -> tuple:
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in model.modules()],
    )


def assert_same(before: tuple, after: tuple) -> None:
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


def refused(model: nn.Module, match: str, **options) -> DeadReluError:
    """Scan with bad options: a DeadReluError (not a ForwardError) before the first forward; nothing changed."""
    before = state(model)
    calls = getattr(model, "calls", 0)
    with pytest.raises(DeadReluError, match=match) as info:
        deadrelu.scan(model, torch.randn(10, 4), **options)
    assert not isinstance(info.value, ForwardError)
    assert getattr(model, "calls", 0) == calls
    assert_same(before, state(model))
    return info.value


FORMS = r"unit_dim must be an int \(every site\), a mapping \{module path or site name: int\}, or a callable"


@pytest.mark.parametrize(
    "spec, match",
    [
        ("x", FORMS + r".*; got str 'x'"),
        (1.5, FORMS + r".*; got float 1.5"),
        (True, FORMS + r".*; got bool True"),
        ([1], FORMS + r".*; got list \[1\]"),
        (object(), FORMS + r".*; got object <object"),
        ({"fc1": "a"}, r"unit_dim\['fc1'\] must be an int dimension \(or None\), got 'a'"),
        ({"fc1": 1.0}, r"unit_dim\['fc1'\] must be an int dimension \(or None\), got 1.0"),
        ({0: 1}, r"unit_dim mapping keys must be module paths or site names \(text\), got 0"),
    ],
    ids=["str", "float", "bool", "list", "object", "dict-str-value", "dict-float-value", "dict-int-key"],
)
def test_unit_dim_of_the_wrong_type_is_refused_before_any_batch(spec, match):
    refused(Counting(), match, unit_dim=spec)


def test_a_raising_unit_dim_callable_is_named_as_the_callable_not_the_model():
    def pick_axis(info):
        raise KeyError("no rule for this site")

    err = refused_after_forward(Counting(), unit_dim=pick_axis)
    message = str(err)
    assert message.startswith("the unit_dim callable ")
    assert "pick_axis raised KeyError for activation site <root> (relu, call 1" in message
    assert "shape (10, 6)" in message and "no rule for this site" in message
    assert "the model raised" not in message
    assert isinstance(err.__cause__, KeyError)


def test_a_raising_unit_dim_callable_on_a_module_site_names_that_module():
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    err = refused_after_forward(net, unit_dim=lambda info: 1 // 0)
    assert "the unit_dim callable " in str(err) and "raised ZeroDivisionError for activation site 1 (relu, call 1" in str(err)
    assert isinstance(err.__cause__, ZeroDivisionError)


def test_a_unit_dim_callable_returning_a_non_int_is_named():
    err = refused_after_forward(Counting(), unit_dim=lambda info: "last")
    assert "unit_dim gave 'last' for activation site <root> (relu" in str(err)
    assert "it must be an int dimension or None" in str(err)


def refused_after_forward(model: nn.Module, **options) -> DeadReluError:
    """A callable can only fail once a site exists: a DeadReluError (not a ForwardError); nothing changed."""
    before = state(model)
    with pytest.raises(DeadReluError) as info:
        deadrelu.scan(model, torch.randn(10, 4), **options)
    assert not isinstance(info.value, ForwardError)
    assert_same(before, state(model))
    return info.value


def test_good_unit_dim_specs_still_work():
    x = torch.randn(10, 4)
    for spec in (None, -1, 1, {"<root>:relu": 1}, {"<root>:relu": None}, lambda info: None, lambda info: 1):
        site = deadrelu.scan(Counting(), x, unit_dim=spec).sites[0]
        assert (site.unit_dim, site.units) == (1, 6)
    assert deadrelu.scan(Counting(), x, unit_dim=0).sites[0].units == 10
    np = pytest.importorskip("numpy")
    assert checked_unit_dim(np.int64(1)) == 1 and type(checked_unit_dim(np.int64(1))) is int
    assert checked_unit_dim({"a": np.int32(-1)}) == {"a": -1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", torch.device("cuda", 1)])
def test_cuda_without_cuda_is_refused_up_front(device):
    err = refused(Counting(), "is not available: this machine has no usable CUDA device", device=device)
    assert f"device={device!r}" in str(err)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_index_beyond_the_machine_is_refused_up_front():
    n = torch.cuda.device_count()
    refused(Counting(), rf"device='cuda:{n}' is not available: this machine has {n} CUDA device", device=f"cuda:{n}")


@pytest.mark.parametrize("device", ["gpu0", "cuda:x", ""])
def test_a_malformed_device_name_is_refused_up_front(device):
    refused(Counting(), rf"device={device!r} is not a device name \(e.g. 'cpu', 'cuda', 'cuda:0'\)", device=device)


@pytest.mark.parametrize("device", [1.5, True, ["cpu"]])
def test_a_device_of_the_wrong_type_is_refused_up_front(device):
    refused(Counting(), "device must be a torch.device, a device name such as 'cpu' or 'cuda:0', or None", device=device)


def test_the_meta_device_is_refused_up_front():
    refused(Counting(), "device='meta' holds no values", device="meta")


def test_cpu_devices_still_work():
    x = torch.randn(10, 4)
    reports = []
    for device in (None, "cpu", torch.device("cpu"), "cpu:0"):
        torch.manual_seed(0)
        reports.append(deadrelu.scan(Counting(), x, device=device).to_dict()["sites"])
    assert all(r == reports[0] for r in reports)


def test_a_raising_threshold_callable_is_named_as_the_callable_not_the_model():
    def pick_threshold(info):
        raise LookupError("no such layer")

    with pytest.raises(DeadReluError) as caught:
        deadrelu.scan(Counting(), torch.randn(4, 4), threshold=pick_threshold)
    message = str(caught.value)
    assert message.startswith("the threshold callable ") and "pick_threshold raised LookupError" in message
    assert "the model raised" not in message and isinstance(caught.value.__cause__, LookupError)
    with pytest.raises(DeadReluError, match=r"threshold gave 'high' for activation site"):
        deadrelu.scan(Counting(), torch.randn(4, 4), threshold=lambda info: "high")
    with pytest.raises(DeadReluError, match=r"^threshold must be a number \(or the option a mapping or a callable\), got 'x'$"):
        deadrelu.scan(Counting(), torch.randn(4, 4), threshold="x")


def test_a_probe_checks_unit_dim_when_made():
    with pytest.raises(DeadReluError, match=FORMS):
        deadrelu.Probe(Counting(), unit_dim="x")


class Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc(x))


def test_a_torchscript_models_failure_names_its_cause():
    # The interpreter's message starts "The following operation failed in the TorchScript
    # interpreter." and, under deadrelu's dispatch mode, drops the op's own message.
    with pytest.raises(ForwardError) as caught:
        deadrelu.scan(torch.jit.script(Scripted()), torch.randn(6, 5))
    message = str(caught.value)
    assert "TorchScript interpreter" in message and "mat1 and mat2 shapes cannot be multiplied (6x5 and 8x4)" in message


class ScriptedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % 2 == 0:  # runs for some batches only
            x = torch.relu(self.a(x))
        return torch.relu(self.b(x))


def test_deadrelus_own_error_inside_a_torchscript_model_is_not_blamed_on_the_model():
    # The interpreter wrapped it: "the model raised RuntimeError: ... TorchScript interpreter ... —".
    with pytest.raises(deadrelu.DeadReluError) as caught:
        deadrelu.scan(torch.jit.script(nn.Sequential(nn.Linear(4, 8), nn.ReLU())), torch.randn(6, 4), unit_dim=5)
    assert not isinstance(caught.value, ForwardError) and "unit_dim 5 is out of range" in str(caught.value)
    with pytest.raises(deadrelu.DeadReluError) as caught:
        deadrelu.scan(torch.jit.script(ScriptedBranch()), [torch.randn(4, 4), torch.randn(5, 4)])
    message = str(caught.value)
    assert not isinstance(caught.value, ForwardError)
    assert "has 6 units along dim 1" in message and "scan the eager module" in message


@pytest.mark.parametrize("max_batches", [0, -1, 2.5, True, "2"], ids=["0", "-1", "2.5", "True", "str"])
def test_max_batches_that_is_not_a_count_is_refused_before_any_batch(max_batches):
    refused(Counting(), r"^max_batches must be a whole number of at least 1 \(or None\), got ", max_batches=max_batches)


def test_max_batches_stops_after_that_many_batches():
    import numpy as np

    for limit in (1, np.int64(2)):
        model = Counting()
        report = deadrelu.scan(model, torch.randn(40, 4), batch_size=8, max_batches=limit)
        assert report.batches == int(limit) == model.calls and report.sites[0].observations == 8 * int(limit)


def test_a_numpy_or_tensor_number_is_a_threshold_like_a_float():
    import numpy as np

    x = torch.randn(50, 4)
    torch.manual_seed(0)
    want = deadrelu.scan(Counting(), x, threshold=0.25).to_dict()["sites"]
    for threshold in (np.float32(0.25), np.float64(0.25), torch.tensor(0.25), {"relu": np.float32(0.25)}):
        torch.manual_seed(0)
        assert deadrelu.scan(Counting(), x, threshold=threshold).to_dict()["sites"] == want, threshold
    for bad in (torch.tensor([0.1, 0.2]), True, {"relu": "0.1"}):
        refused(Counting(), r"threshold.* must be a number", threshold=bad)


def test_a_batch_on_the_meta_device_is_a_data_error_not_a_crash():
    from deadrelu.errors import DataError

    model = Counting()
    before = state(model)
    with pytest.raises(DataError, match=r"a batch holds a tensor on the meta device .*\(3, 4\)"):
        deadrelu.scan(model, torch.randn(3, 4, device="meta"))
    assert model.calls == 0
    assert_same(before, state(model))


def test_a_forward_that_writes_its_own_buffer_in_eval_mode_is_named_in_a_warning():
    class Counter(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.register_buffer("seen", torch.zeros(()))

        def forward(self, x):
            self.seen += x.shape[0]
            return F.relu(self.fc(x))

    model = Counter()
    with pytest.warns(UserWarning, match=r"wrote its own parameters or buffers during the scan \(seen\)"):
        deadrelu.scan(model, torch.randn(6, 4), batch_size=3)
    assert model.seen.item() == 6  # what the model wrote stays: deadrelu says so, it does not guess
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deadrelu.scan(model, torch.randn(6, 4), train=True)  # buffers restored in train mode: nothing to say
    assert model.seen.item() == 6
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deadrelu.scan(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU()), torch.randn(6, 4))


def test_a_one_dimensional_data_tensor_is_refused_with_the_shapes_to_give():
    from deadrelu.errors import DataError

    model = Counting()
    with pytest.raises(DataError, match=r"shape \(8,\): deadrelu expects a batch dimension first.*unsqueeze\(1\)"):
        deadrelu.scan(model, torch.randn(8))
    assert model.calls == 0
