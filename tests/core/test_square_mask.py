"""A square observation mask (batch size = sequence length) fits a batch-first ``(B, T, C)`` and a
sequence-first ``(T, B, C)`` activation alike: each site reads it as its activation lay under the
last mask with B != T, and a sequence-first model warns while no such batch has been seen."""

from __future__ import annotations

import warnings

import pytest
import torch
from fixtures.models import brute_force
from torch import nn

import deadrelu


class SequenceFirst(nn.Module):
    """(B, T, F) input made (T, B, F) as ``nn.MultiheadAttention(batch_first=False)`` wants it; a
    ReLU over the (T, B, 8) projection. Unit 3 fires only on padded positions."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2)  # batch_first=False: the model is sequence-first
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.proj(x.transpose(0, 1)))

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.transpose(0, 1))


def batch(b: int, t: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    mask = torch.arange(t)[None, :] < lengths[:, None]
    x = torch.randn(b, t, 4, generator=g)
    return {"x": x, "attention_mask": mask}


def truth(model: SequenceFirst, batches) -> dict:
    kept = []
    with torch.no_grad():
        for bt in batches:
            h = model.pre_activation(bt["x"]).clamp(min=0)  # (T, B, 8)
            kept.append(h[bt["attention_mask"].T])  # the (B, T) mask transposed onto (T, B)
    return brute_force(torch.cat(kept), 1)


def test_a_square_mask_follows_the_sites_layout_after_a_non_square_batch():
    model = SequenceFirst().eval()
    g = torch.Generator().manual_seed(1)
    batches = [batch(3, 5, g), batch(4, 4, g), batch(6, 6, g), batch(2, 7, g)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the first batch showed the layout: nothing to warn about
        report = deadrelu.scan(model, batches, input_fn=lambda b: b["x"])
    site = report.sites[0]
    expected = truth(model, batches)
    assert site.observations == expected["observations"] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert list(site.fired_counts) == expected["fired"]


def test_a_square_first_batch_of_a_sequence_first_model_warns_once():
    model = SequenceFirst().eval()
    g = torch.Generator().manual_seed(2)
    batches = [batch(4, 4, g), batch(5, 5, g)]
    with pytest.warns(RuntimeWarning, match=r"square \(4 x 4\).*sequence-first") as caught:
        deadrelu.scan(model, batches, input_fn=lambda b: b["x"])
    assert sum("square" in str(w.message) for w in caught) == 1
    # the advice works: the mask given as (T, B) is laid over (T, B, C) as it is
    report = deadrelu.scan(model, batches, input_fn=lambda b: b["x"], mask=lambda b: b["attention_mask"].T)
    expected = truth(model, batches)
    assert (report.sites[0].observations, list(report.sites[0].fired_counts)) == (expected["observations"], expected["fired"])


def test_a_batch_first_model_never_warns_about_a_square_mask():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU()).eval()
    g = torch.Generator().manual_seed(3)
    batches = [batch(4, 4, g), batch(3, 6, g)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = deadrelu.scan(model, batches, input_fn=lambda b: b["x"])
    kept = torch.cat([model(b["x"]).detach()[b["attention_mask"]] for b in batches])
    assert list(report.sites[0].fired_counts) == brute_force(kept, 1)["fired"]
