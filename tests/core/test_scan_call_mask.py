"""scan finds the attention mask where the model call passes it, as Probe does."""

from __future__ import annotations

import torch
from torch import nn

import deadrelu


class Tokens(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.act = nn.ReLU()

    def forward(self, input_ids, attention_mask=None):
        return self.act(self.emb(input_ids))


def _data():
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (4, 7))
    mask = torch.ones(4, 7, dtype=torch.long)
    mask[0, 3:] = 0
    mask[2, 5:] = 0
    return ids, mask


def _brute(model, ids, mask):
    out = model.act(model.emb(ids))[mask.bool()]
    return out.shape[0], (out > 0).sum(0).tolist()


def test_input_fn_dict_tuple_and_tuple_batches_are_masked():
    model = Tokens()
    ids, mask = _data()
    expected = _brute(model, ids, mask)
    runs = {
        "dict batch": deadrelu.scan(model, [{"input_ids": ids, "attention_mask": mask}]),
        "input_fn dict": deadrelu.scan(model, [(ids, mask)], input_fn=lambda b: {"input_ids": b[0], "attention_mask": b[1]}),
        "input_fn tuple": deadrelu.scan(model, [(ids, mask)], input_fn=lambda b: (b[0], b[1])),
    }
    for how, report in runs.items():
        site = report.sites[0]
        assert (site.observations, list(site.fired_counts)) == expected, how
    unmasked = deadrelu.scan(model, [(ids, mask)], mask=False).sites[0]
    assert unmasked.observations == ids.numel()


class FeaturesDict(Tokens):
    """sentence-transformers style: the forward takes one dict of features, positionally."""

    def forward(self, features):
        return self.act(self.emb(features["input_ids"]))


def test_a_call_with_one_dict_argument_is_masked_by_its_attention_mask():
    model = FeaturesDict()
    ids, mask = _data()
    expected = _brute(model, ids, mask)
    with deadrelu.Probe(model) as probe:
        model({"input_ids": ids, "attention_mask": mask})
    site = probe.report().sites[0]
    assert (site.observations, list(site.fired_counts)) == expected
    with deadrelu.Probe(model, mask=False) as probe:
        model({"input_ids": ids, "attention_mask": mask})
    assert probe.report().sites[0].observations == ids.numel()
