"""A ReLU *spelled* ``clamp(min=0)`` is an activation only where it clamps a layer's features, not
part of them: detection heads and losses clamp box corners, widths and intersections
(``(rb - lt).clamp(min=0)``) and numerical guards clamp variances, whose "units" would be
coordinates or boxes (a 1-D width per box read as one unit per box, most of them "dead"). Such a
clamp is no site in the eager scan, TorchScript, torch.export and the monitors, eager or compiled,
and the rescue functions leave it alone; ``F.relu`` on the same values still is a site (the call
says it is an activation), and a clamp of a layer's output split into heads, or normalised by a
statistic of it, still is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures.models import plant
from fixtures.toolchain import needs_inductor
from torch import nn

import deadrelu
from deadrelu.core.unit_axis import AxisTable, kind_of


class BoxHead(nn.Module):
    """A backbone whose ReLUs are spelled as clamps, and box arithmetic that clamps too."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 16)
        self.heads = nn.Linear(16, 12)
        self.box = nn.Linear(16, 4)
        plant(self.body.bias, [3, 7])

    def forward(self, x):
        h = self.body(x).clamp(min=0)  # a layer's output: a site
        g = self.heads(h).view(-1, 3, 4).clamp(min=0)  # split into heads: a site (units by the rank rule: the last dim)
        b = self.box(h).sigmoid()  # (N, 4) boxes x0, y0, x1, y1
        lt = torch.max(b[:, None, :2], b[None, :, :2])
        rb = torch.min(b[:, None, 2:], b[None, :, 2:])
        inter = (rb - lt).clamp(min=0).prod(-1)  # pairwise intersections: no site
        widths = (b[:, 2] - b[:, 0]).clamp(min=0)  # one value per box: no site
        spread = h.var(-1, keepdim=True).clamp(min=0).sqrt()  # a numerical guard: no site
        normed = (torch.rsqrt(h.var(-1, keepdim=True) + 1e-5) * h).clamp(min=0)  # h normalised: a site
        sizes = F.relu(b[:, 3] - b[:, 1])  # an F.relu call: a site, whatever it reads
        return inter.sum() + widths.sum() + spread.sum() + g.sum() + normed.sum() + sizes.sum()


def data() -> torch.Tensor:
    return torch.randn(48, 8, generator=torch.Generator().manual_seed(3))


def model() -> BoxHead:
    torch.manual_seed(0)
    return BoxHead()


def summary(report: deadrelu.Report) -> list[tuple]:
    return [(s.function, s.units, s.observations, s.fired_counts) for s in report.sites]


def brute_force(net: BoxHead, x: torch.Tensor) -> list[tuple]:
    """The sites' activations recomputed with plain ops, and their firing counts."""
    with torch.no_grad():
        h = torch.maximum(net.body(x), torch.zeros(()))
        g = torch.maximum(net.heads(h).view(-1, 3, 4), torch.zeros(()))
        normed = torch.maximum(h / torch.sqrt(h.var(-1, keepdim=True) + 1e-5), torch.zeros(()))
        b = net.box(h).sigmoid()
        sizes = torch.maximum(b[:, 3] - b[:, 1], torch.zeros(()))
    rows = [h, g.reshape(-1, 4), normed]
    expected = [("relu", r.shape[-1], r.shape[0], tuple((r > 0).sum(0).tolist())) for r in rows]
    # a 1-D output of an F.relu is one sample of its units (one per box)
    expected.append(("relu", sizes.numel(), 1, tuple((sizes > 0).long().tolist())))
    return expected


def test_clamps_of_box_arithmetic_are_no_sites_and_the_rest_count_exactly():
    net, x = model(), data()
    report = deadrelu.scan(net, x)
    assert summary(report) == brute_force(net, x)
    assert report.sites[0].dead_units == (3, 7)


def test_every_path_finds_the_same_sites():
    net, x = model(), data()
    eager = summary(deadrelu.scan(net, x))
    assert summary(deadrelu.scan(torch.export.export(net, (x,)).module(), x)) == eager
    scripted = deadrelu.scan(torch.jit.script(net), x)
    assert [(s.function, s.units, s.fired_counts) for s in scripted.sites] == [e[:2] + e[3:] for e in eager]
    with deadrelu.Monitor(net, window=1, log_every=100) as mon:
        net(x).backward()
        mon.step()
        assert summary(mon.report("total")) == eager


@needs_inductor
@pytest.mark.parametrize("given", [False, True], ids=["boxes a layer made", "boxes given"])
def test_the_compiled_monitor_finds_them_too(given):
    net, x = (GivenBoxes(), torch.rand(30, 4, generator=torch.Generator().manual_seed(0))) if given else (model(), data())
    eager = summary(deadrelu.scan(net, x))
    torch._dynamo.reset()
    try:
        with deadrelu.Monitor(net, window=1, log_every=100, compiled=True) as mon:
            torch.compile(net, fullgraph=True)(x).backward()
            mon.step()
            assert summary(mon.report("total")) == eager
    finally:
        torch._dynamo.reset()


def _traced(ops):
    """Run ``ops(op, h)`` on a Linear's output ``h``, each ``op(func, *args)`` call fed to an AxisTable as the
    capture feeds it; the table and the result."""
    table, fc = AxisTable(), nn.Linear(3, 6)
    x = torch.randn(5, 3)
    h = F.linear(x, fc.weight, fc.bias)
    table.on_op(kind_of(F.linear), (x, fc.weight, fc.bias), None, h)

    def op(func, *args, **kwargs):
        out = func(*args, **kwargs)
        table.on_op(kind_of(func), args, kwargs or None, out)
        return out

    return table, ops(op, h)


@pytest.mark.parametrize(
    "ops, part",
    [
        (lambda op, h: op(torch.Tensor.__getitem__, h, (slice(None), slice(0, 2))), True),
        (lambda op, h: op(torch.Tensor.__getitem__, h, (slice(None), 2)), True),
        (lambda op, h: op(torch.mean, h, -1, keepdim=True), True),
        (lambda op, h: op(torch.sum, h, 1), True),
        (lambda op, h: op(torch.Tensor.chunk, h, 2, -1)[0], True),
        (lambda op, h: op(torch.sub, op(torch.Tensor.__getitem__, h, (slice(None), 2)), op(torch.Tensor.__getitem__, h, (slice(None), 0))), True),
        (lambda op, h: op(torch.mul, op(torch.mean, h, -1, keepdim=True), h), False),
        (lambda op, h: op(torch.Tensor.view, h, 5, 2, 3), False),
        (lambda op, h: op(torch.cat, [h, h], -1), False),
        (lambda op, h: op(torch.mean, h, 0), False),
        (lambda op, h: op(torch.Tensor.__getitem__, h, 0), False),
        (lambda op, h: op(torch.add, h, 1.0), False),
    ],
    ids=["slice", "one feature", "keepdim mean", "sum over units", "chunk", "parts minus parts", "rescaled by its mean",
         "split into heads", "cat", "mean over rows", "one row", "elementwise"],
)  # fmt: skip
def test_which_ops_leave_part_of_a_layers_features(ops, part):
    table, out = _traced(ops)
    assert table.is_part(out) is part


def test_a_one_dimensional_activation_is_one_sample_of_its_units_in_the_traceable_sums():
    # torch sums over every dim for dim=(): the compiled monitor gave each unit of a 1-D activation
    # (the F.relu of box sizes above) the count of the whole tensor
    from deadrelu.core.stats import traceable_batch_sums
    from deadrelu.core.unit_layout import per_unit_sum

    sums = traceable_batch_sums(torch.tensor([1.0, -2.0, 3.0]), 0, 0.0, False)
    assert sums["fired"].tolist() == [1, 0, 1] and sums["abs_sum"].tolist() == [1.0, 2.0, 3.0]
    assert sums["observations"].tolist() == [1]
    assert per_unit_sum(torch.tensor([1.0, 2.0]), 0).tolist() == [1.0, 2.0]


def test_rescue_leaves_the_box_clamps_alone():
    # swap_activations reads no values: it tells parts from the ops of its trace, and rewrites the
    # scan's four sites only; a LeakyReLU of box widths would let them go negative
    net, x = model(), data()
    result = deadrelu.swap_activations(net, "leaky_relu", copy=True)
    assert [c.site for c in result.changes] == ["<root>:clamp", "<root>:clamp_1", "<root>:clamp_5", "<root>:relu"]
    assert len(result.changes) == len(deadrelu.scan(net, x).sites)
    swapped = result.model
    traced = dict(swapped.named_modules())
    assert "swapped_act_0" in traced and "swapped_act_4" not in traced
    assert sum(n.target == "clamp" for n in swapped.graph.nodes if n.op == "call_method") == 3
    # prune and reinit map the scan's sites onto the same trace: the first site's slot is found (and
    # refused for its .var() reader), not shifted onto a box clamp
    with pytest.raises(deadrelu.RefusedError, match=r"relu\.1.*var"):
        deadrelu.prune_dead(net, deadrelu.scan(net, x))


class GivenBoxes(nn.Module):
    """Boxes passed in (proposals, anchors, targets): no layer made them; their parts are parts too."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        plant(self.fc.bias, [2])

    def forward(self, boxes):
        widths = (boxes[:, 2] - boxes[:, 0]).clamp(min=0)  # one value per box: no site
        lt = torch.max(boxes[:, None, :2], boxes[None, :, :2])
        inter = (torch.min(boxes[:, None, 2:], boxes[None, :, 2:]) - lt).clamp(min=0)  # no site
        return self.fc(boxes).clamp(min=0).sum() + widths.sum() + inter.sum()


def test_parts_of_an_input_are_no_sites_either():
    # widths of given boxes made one "unit" per box, and a shorter last batch was an error
    net, boxes = GivenBoxes(), torch.rand(30, 4, generator=torch.Generator().manual_seed(0))
    report = deadrelu.scan(net, boxes, batch_size=16)
    with torch.no_grad():
        h = net.fc(boxes)
    assert [(s.units, s.unit_axis_source, s.fired_counts) for s in report.sites] == [
        (8, "producer:Linear", tuple((h > 0).sum(0).tolist()))
    ]
    assert summary(deadrelu.scan(torch.export.export(net, (boxes[:16],)).module(), boxes[:16])) == summary(
        deadrelu.scan(net, boxes[:16])
    )
    assert [c.site for c in deadrelu.swap_activations(net, copy=True).changes] == ["<root>:clamp_2"]


@pytest.mark.parametrize("fused", [True, False], ids=["fused ReLU", "torch's ReLU"])
def test_an_f_relu_of_a_part_keeps_it_a_part(fused, monkeypatch):
    # F.relu is a site; its output is still part of the layer's features, so a clamp of it is none
    if not fused:
        monkeypatch.setenv("DEADRELU_NO_FUSED_RELU", "1")

    class Clamped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 6)

        def forward(self, x):
            return F.relu(self.fc(x)[:, :2]).clamp(min=0).sum()

    net, x = Clamped(), torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    sites = deadrelu.scan(net, x).sites
    with torch.no_grad():
        h = net.fc(x)[:, :2]
    assert [(s.function, s.units, s.fired_counts) for s in sites] == [("relu", 2, tuple((h > 0).sum(0).tolist()))]
