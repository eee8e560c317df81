"""The unit axis follows the data: each site's units are the feature axis its producing layer made,
checked against hand-computed activations of models with planted dead units."""

from __future__ import annotations

import pytest
import torch
from fixtures.models import UNIT_AXIS_MODELS, brute_force
import torch.nn.functional as F
from torch import nn

import deadrelu

SOURCES = {
    "ChannelsLastMLP": ["producer:Linear"],
    "PVTMlp": ["producer:conv"],
    "Wav2Vec2Features": ["producer:conv", "producer:conv"],
    "ConvGRU": ["producer:RNN"],
    "LinearAfterConv": ["producer:Linear"],
}


@pytest.mark.parametrize("make", list(UNIT_AXIS_MODELS), ids=lambda m: m.__name__)
def test_units_counts_and_dead_sets_match_hand_computed_truth(make):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*UNIT_AXIS_MODELS[make], generator=torch.Generator().manual_seed(1))
    report = deadrelu.scan(model, x, batch_size=7)
    with torch.no_grad():
        expected = model.activations(x)
    assert [s.name for s in report.sites] == [name for name, _, _ in expected]
    for site, (name, act, unit_dim) in zip(report.sites, expected):
        truth = brute_force(act, unit_dim)
        assert (site.units, site.observations) == (truth["units"], truth["observations"]), name
        assert list(site.fired_counts) == truth["fired"], name
        assert site.dead_units == truth["dead"] == model.planted[name], name
        assert site.unit_dim == unit_dim % act.ndim
    assert [s.unit_axis_source for s in report.sites] == SOURCES[make.__name__]


def test_channels_last_mlp_from_the_issue():
    from fixtures.models import ChannelsLastMLP

    report = deadrelu.scan(ChannelsLastMLP(), torch.randn(64, 4, 4, 8))
    site = report.sites[0]
    assert (site.units, site.dead, site.observations) == (32, 10, 64 * 16)


def test_rank_rule_is_the_fallback_and_says_so():
    # Raw input with no producer: the rank rule decides, and the site reports it.
    raw = deadrelu.scan(nn.Sequential(nn.ReLU()), torch.randn(10, 3, 5)).sites[0]
    assert (raw.units, raw.unit_axis_source) == (5, "rank rule")
    # A flatten that merges the feature axis away: the axis cannot be inferred.
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.ReLU())
    merged = deadrelu.scan(net, torch.randn(4, 2, 5, 5)).sites[0]
    assert (merged.units, merged.unit_axis_source) == (27, "rank rule")
    # A norm on raw channels-first input decides by itself.
    bn = deadrelu.scan(nn.Sequential(nn.BatchNorm1d(3), nn.ReLU()), torch.randn(8, 3, 11)).sites[0]
    assert (bn.units, bn.unit_axis_source) == (3, "producer:norm")


def test_unit_dim_override_wins_and_is_recorded():
    from fixtures.models import ChannelsLastMLP

    site = deadrelu.scan(ChannelsLastMLP(), torch.randn(8, 4, 4, 8), unit_dim=1).sites[0]
    assert (site.units, site.unit_axis_source) == (4, "unit_dim override")


def test_layout_ops_move_the_axis():
    class Layouts(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 7)

        def forward(self, x):  # x: (B, T, 3)
            h = self.fc(x)  # (B, T, 7): units on 2
            a = torch.relu(h.permute(2, 0, 1))  # (7, B, T): units on 0
            b = torch.relu(h.mT)  # (B, 7, T): units on 1
            c = torch.relu(h.unsqueeze(1).movedim(3, 0))  # (7, B, 1, T): units on 0
            d = torch.relu(h[:, 0])  # (B, 7): units on 1
            e = torch.relu(h.reshape(-1, 7).view(2, -1, 7))  # units on 2
            return a.sum() + b.sum() + c.sum() + d.sum() + e.sum()

    report = deadrelu.scan(Layouts(), torch.randn(4, 5, 3))
    assert [(s.unit_dim, s.units) for s in report.sites] == [(0, 7), (1, 7), (0, 7), (1, 7), (2, 7)]
    assert {s.unit_axis_source for s in report.sites} == {"producer:Linear"}


def test_site_json_keeps_unit_axis_source():
    from fixtures.models import PVTMlp

    report = deadrelu.scan(PVTMlp(), torch.randn(4, 16, 5))
    again = deadrelu.Report.from_json(report.to_json())
    assert [s.unit_axis_source for s in again.sites] == ["producer:conv"]


def test_a_weight_multiplied_from_the_left_puts_its_rows_on_dim_minus_two():
    # Mamba's dt = dt_proj.weight @ h.transpose(1, 2): (B, out, T), the units are the weight's rows
    class LeftMatmul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.W = nn.Linear(4, 6), nn.Parameter(torch.randn(16, 6))
            with torch.no_grad():
                self.W[:3] = 0.0  # three rows that never fire (relu(0) = 0)

        def forward(self, x):
            return F.relu(self.W @ self.proj(x).transpose(1, 2))

    torch.manual_seed(0)
    data = [torch.randn(3, 7, 4), torch.randn(3, 9, 4)]  # two sequence lengths: T is no unit axis
    site = deadrelu.scan(LeftMatmul(), data).sites[0]
    assert (site.units, site.unit_dim, site.observations) == (16, 1, 3 * 7 + 3 * 9)
    assert site.dead_units == (0, 1, 2)

    class Reflected(nn.Module):  # the same product through Tensor.__rmatmul__
        def __init__(self) -> None:
            super().__init__()
            self.W = nn.Parameter(torch.randn(16, 6))

        def forward(self, x):
            return F.relu(x.__rmatmul__(self.W))

    assert deadrelu.scan(Reflected(), [torch.randn(2, 6, 5)]).sites[0].units == 16


class _AfterProducer(nn.Module):
    """``F.relu(op(producer(x)))`` with the producer's first three units planted dead."""

    def __init__(self, producer: nn.Module, op) -> None:
        super().__init__()
        self.producer, self.op = producer, op
        with torch.no_grad():
            producer.bias[:3] = -100.0

    def forward(self, x):
        return F.relu(self.op(self.producer(x)))


AXIS_KEEPING_OPS = [  # name, producer, input shape, op, the units' dim in the activation
    ("index None last", lambda: nn.Linear(4, 7), (3, 5, 4), lambda h: h[..., None], 2),
    ("index None middle", lambda: nn.Linear(4, 7), (3, 5, 4), lambda h: h[:, None], 3),
    ("index int and slice", lambda: nn.Linear(4, 7), (3, 5, 6, 4), lambda h: h[:, 0, 1:], 2),
    ("conv mean last", lambda: nn.Conv2d(4, 7, 1), (3, 4, 5, 6), lambda h: h.mean(-1), 1),
    ("conv amax dim 2", lambda: nn.Conv2d(4, 7, 1), (3, 4, 5, 6), lambda h: h.amax(dim=2), 1),
    ("conv sum two dims", lambda: nn.Conv2d(4, 7, 1), (3, 4, 5, 6), lambda h: h.sum((2, 3)), 1),
    ("conv max values", lambda: nn.Conv2d(4, 7, 1), (3, 4, 5, 6), lambda h: h.max(dim=3).values, 1),
    ("linear mean over tokens", lambda: nn.Linear(4, 7), (3, 5, 4), lambda h: h.mean(1), 1),
]


@pytest.mark.parametrize("case", AXIS_KEEPING_OPS, ids=lambda c: c[0])
def test_indexing_and_reductions_keep_the_producers_axis(case):
    # Shapes alone cannot say where the axis went (a conv map's (B, C, H, W).mean(-1) is 3-D like a
    # sequence): the index and the reduced dims do.
    _, make, shape, op, unit_dim = case
    torch.manual_seed(0)
    model = _AfterProducer(make(), op).eval()
    x = torch.randn(*shape)
    site = deadrelu.scan(model, x).sites[0]
    with torch.no_grad():
        truth = brute_force(model(x), unit_dim)
    assert (site.unit_dim, site.units, site.observations) == (unit_dim, truth["units"], truth["observations"])
    assert site.dead_units == truth["dead"] and {0, 1, 2} <= set(truth["dead"])
    assert site.unit_axis_source != "rank rule"


class _LeftWeight(nn.Module):
    """``relu(W @ x + b)`` on (features, T) inputs: W's 12 rows are the units, 4 planted dead."""

    def __init__(self, fused: str) -> None:
        super().__init__()
        self.fused = fused
        self.W = nn.Parameter(torch.randn(12, 8))
        self.b = nn.Parameter(torch.zeros(12, 1))
        with torch.no_grad():
            self.b[:4] = -100.0

    def forward(self, x):
        if self.fused == "addmm":
            return F.relu(torch.addmm(self.b, self.W, x))
        if self.fused == "einsum":
            return F.relu(torch.einsum("oc,ct->ot", self.W, x) + self.b)
        return F.relu(self.W @ x + self.b)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("form", ["matmul", "addmm", "einsum"])
def test_a_weight_on_the_left_is_found_in_every_form_trainable_or_frozen(form, frozen):
    # addmm(bias, W, x) has its product's operands at 1 and 2; a frozen nn.Parameter
    # (requires_grad_(False), as for inference) is still a weight.
    torch.manual_seed(0)
    model = _LeftWeight(form).requires_grad_(not frozen)
    batches = [torch.randn(8, 5) for _ in range(3)]
    site = deadrelu.scan(model, batches).sites[0]
    with torch.no_grad():
        acts = torch.cat([model(b) for b in batches], 1)
    truth = brute_force(acts, 0)
    assert (site.unit_dim, site.units) == (0, 12)
    assert site.dead_units == truth["dead"] == (0, 1, 2, 3)


def test_a_nested_tensor_at_an_activation_is_one_clear_error():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    nested = torch.nested.nested_tensor([torch.randn(2, 8), torch.randn(3, 8)])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(deadrelu.DeadReluError, match="nested tensor.*to_padded_tensor"):
        deadrelu.scan(model, [nested])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class HeadsAndMaps(nn.Module):
    """A Linear's features split into attention heads behind (B, T), and into a feature map right
    after the batch dim (a generator's ``fc(z).view(B, C, H, W)``), each before a ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.qk = nn.Linear(6, 12)  # 3 heads of 4
        self.fc = nn.Linear(6, 4 * 2 * 2)  # 4 channels of 2 x 2
        with torch.no_grad():
            self.qk.bias[[1, 5, 9]] = -100.0  # feature 1 of every head: dead
            self.fc.bias[8:12] = -100.0  # channel 2: dead

    def forward(self, x):  # x: (B, T, 6)
        heads = F.relu(self.qk(x).view(*x.shape[:2], 3, 4))
        maps = F.relu(self.fc(x[:, 0]).view(-1, 4, 2, 2))
        return heads.sum() + maps.sum()


def test_heads_count_each_heads_features_and_feature_maps_their_channels():
    # heads: the rank rule's dim 1 of a (B, T, H, d) activation counted tokens as units (and a batch
    # of another sequence length was an error); now each head's features, the heads pooled
    model = HeadsAndMaps()
    x = torch.randn(8, 5, 6, generator=torch.Generator().manual_seed(0))
    report = deadrelu.scan(model, [x[:4], x[4:, :3]])  # two sequence lengths
    heads, maps = report.sites
    with torch.no_grad():
        h = torch.cat([F.relu(model.qk(b).view(*b.shape[:2], 3, 4)).reshape(-1, 4) for b in (x[:4], x[4:, :3])])
        m = F.relu(model.fc(x[:, 0]).view(-1, 4, 2, 2)).permute(0, 2, 3, 1).reshape(-1, 4)
    assert (heads.unit_dim, heads.units, heads.observations) == (3, 4, h.shape[0])
    assert list(heads.fired_counts) == (h > 0).sum(0).tolist() and heads.dead_units == (1,)
    assert heads.unit_axis_source == "producer:Linear"
    assert (maps.unit_dim, maps.units, maps.observations) == (1, 4, m.shape[0])
    assert list(maps.fired_counts) == (m > 0).sum(0).tolist() and maps.dead_units == (2,)


class _SqueezedHead(nn.Module):
    """A non-negative per-sample prediction: ``relu(Linear(d, 1)(h))`` with the size-1 axis removed
    first, in the ways code writes it; ``spell`` picks one."""

    def __init__(self, spell: str) -> None:
        super().__init__()
        self.body, self.head, self.act, self.spell = nn.Linear(6, 10), nn.Linear(10, 1), nn.ReLU(), spell
        with torch.no_grad():
            self.body.bias[:3] = -50.0  # planted dead units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.head(F.relu(self.body(x)))
        if self.spell == "tokens":  # (B, T, 1) -> (B, T)
            o = self.head(F.relu(self.body(x)).unsqueeze(1).expand(-1, 3, -1))
            return F.relu(o.squeeze(-1))
        squeezed = {"squeeze": o.squeeze(-1), "view": o.view(-1), "flatten": o.flatten(), "index": o[:, 0],
                    "select": o.select(1, 0)}[self.spell]  # fmt: skip
        return self.act(squeezed * 2 + 1) if self.spell == "index" else F.relu(squeezed)


@pytest.mark.parametrize("spell", ["squeeze", "view", "flatten", "index", "select", "tokens"])
def test_a_squeezed_single_output_is_one_unit_even_with_a_short_last_batch(spell):
    """Its values are observations of the head's one unit: the rank rule made each batch row a unit
    (16 units of 3 observations for 48 samples) and a short last batch then raised."""
    torch.manual_seed(0)
    model = _SqueezedHead(spell).eval()
    x = torch.randn(40, 6)  # batches of 16, 16 and 8
    report = deadrelu.scan(model, x, batch_size=16)
    with torch.no_grad():
        out = model(x)
        body = F.relu(model.body(x))
    head = report.sites[-1]
    assert (head.units, head.observations, head.fired_counts) == (1, out.numel(), (int((out > 0).sum()),))
    assert head.unit_axis_source == "producer: its single output, squeezed"
    assert report.sites[0].dead_units == tuple(int(u) for u in torch.nonzero((body > 0).sum(0) == 0).flatten())


def test_a_squeezed_single_output_in_the_training_monitor():
    torch.manual_seed(0)
    model = _SqueezedHead("squeeze")
    with deadrelu.Monitor(model, window=4) as mon:
        fired = 0
        for size in (16, 16, 8):
            x = torch.randn(size, 6)
            model(x).sum().backward()
            with torch.no_grad():
                fired += int((model(x) > 0).sum())
            mon.step()
    head = mon.report("total").sites[-1]
    assert (head.units, head.observations, head.fired_counts) == (1, 40, (fired,))
