"""Observation masks: padding positions are not observations, checked against brute force."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fixtures.models import brute_force
from torch import nn

import deadrelu
from deadrelu.errors import DataError

PAD = 0


class TinyEncoder(nn.Module):
    """Hugging Face-style call ``model(input_ids=..., attention_mask=...)``: embedding → Linear(8, 16)
    → GELU module → Linear. Unit 3 fires only on the pad token (its embedding is planted so), so it
    is dead over real tokens but alive when pads are counted."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 16)
        self.act = nn.GELU()
        self.out = nn.Linear(16, 2)
        with torch.no_grad():
            self.fc.weight[3].zero_()
            self.fc.weight[3, 0] = 1.0
            self.fc.bias[3] = -5.0
            self.emb.weight[:, 0] = 0.0
            self.emb.weight[PAD, 0] = 10.0

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.act(self.fc(self.emb(input_ids))))

    def activation(self, ids):
        return torch.nn.functional.gelu(self.emb.weight[ids] @ self.fc.weight.T + self.fc.bias)


def padded_batches(n_batches=5, batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        lengths = torch.randint(1, 9, (batch,), generator=g)
        t = int(lengths.max())
        ids = torch.randint(1, 20, (batch, t), generator=g)
        mask = torch.arange(t)[None, :] < lengths[:, None]
        ids[~mask] = PAD
        out.append({"input_ids": ids, "attention_mask": mask.long()})
    return out


def truth_over(batches, model, masked):
    acts = [model.activation(b["input_ids"]) for b in batches]
    masks = [b["attention_mask"].bool() for b in batches]
    if masked:
        flat = torch.cat([a[m] for a, m in zip(acts, masks)])
    else:
        flat = torch.cat([a.reshape(-1, 16) for a in acts])
    return brute_force(flat, 1)


def test_dict_batches_with_attention_mask_count_only_real_tokens():
    model = TinyEncoder().eval()
    batches = padded_batches()
    with torch.no_grad():
        truth = truth_over(batches, model, masked=True)
        with_pads = truth_over(batches, model, masked=False)
    site = deadrelu.scan(model, batches).site("act")
    assert site.observations == truth["observations"] == sum(int(b["attention_mask"].sum()) for b in batches)
    assert list(site.fired_counts) == truth["fired"]
    assert 3 in site.dead_units and 3 not in with_pads["dead"]  # alive only on pads
    unmasked = deadrelu.scan(model, batches, mask=False).site("act")
    assert (unmasked.observations, list(unmasked.fired_counts)) == (with_pads["observations"], with_pads["fired"])


@pytest.mark.parametrize("how", ["key", "callable", "tensor"])
def test_explicit_masks(how):
    model = TinyEncoder().eval()
    batches = padded_batches(seed=1)
    with torch.no_grad():
        truth = truth_over(batches, model, masked=True)
    if how == "key":
        data = [{"ids": b["input_ids"], "keep": b["attention_mask"]} for b in batches]
        report = deadrelu.scan(model, data, input_fn=lambda b: {"input_ids": b["ids"]}, mask="keep")
    elif how == "callable":
        data = [(b["input_ids"], b["attention_mask"]) for b in batches]
        report = deadrelu.scan(model, data, mask=lambda b: b[1])
    else:  # one tensor of ids and one of masks, split alike
        t = max(b["input_ids"].shape[1] for b in batches)
        ids = torch.cat([nn.functional.pad(b["input_ids"], (0, t - b["input_ids"].shape[1])) for b in batches])
        keep = torch.cat([nn.functional.pad(b["attention_mask"], (0, t - b["input_ids"].shape[1])) for b in batches])
        report = deadrelu.scan(model, ids, batch_size=3, mask=keep.bool())
    site = report.site("act")
    assert (site.observations, list(site.fired_counts)) == (truth["observations"], truth["fired"])


def test_probe_and_monitor_take_the_mask_from_the_call():
    model = TinyEncoder()
    batches = padded_batches(seed=2)
    with torch.no_grad():
        truth = truth_over(batches, model, masked=True)
    with deadrelu.Probe(model) as probe:
        for b in batches:
            model(**b)
    site = probe.report().site("act")
    assert (site.observations, list(site.fired_counts)) == (truth["observations"], truth["fired"])
    with deadrelu.Monitor(model, window=len(batches), mask="attention_mask") as mon:
        for b in batches:
            model(**b).sum().backward()
            mon.step()
    site = mon.report().site("act")
    assert (site.observations, list(site.fired_counts)) == (truth["observations"], truth["fired"])


@pytest.mark.parametrize("batch_first", [True, False])
def test_transformer_encoder_with_padding_mask_is_exact(batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2).eval()  # nested tensors allowed: deadrelu still sees padded activations
    g = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(4):
        pad = torch.arange(7)[None, :] >= torch.randint(1, 8, (5,), generator=g)[:, None]  # (B, T), True = pad
        src = torch.randn(5, 7, 8, generator=g)
        batches.append({"src": src if batch_first else src.transpose(0, 1), "src_key_padding_mask": pad})
    # Truth: the ReLU input is linear1's output, read with a plain torch hook, rectified by hand.
    seen: dict[int, list[torch.Tensor]] = {0: [], 1: []}
    def keep(k, o):
        seen[k].append((o.to_padded_tensor(0.0, (5, 7, 12)) if o.is_nested else o).clamp(min=0))

    handles = [m.linear1.register_forward_hook(lambda mod, a, o, k=k: keep(k, o)) for k, m in enumerate(model.layers)]
    model.train()  # dropout is 0: the same outputs, and no eval fast path that skips linear1 (torch 2.2)
    with torch.no_grad():
        for b in batches:
            model(**b)
    model.eval()
    for h in handles:
        h.remove()
    report = deadrelu.scan(model, batches, mask=lambda b: ~b["src_key_padding_mask"])
    for k in (0, 1):
        acts = seen[k] if batch_first else [a.transpose(0, 1) for a in seen[k]]
        flat = torch.cat([a[~b["src_key_padding_mask"]] for a, b in zip(acts, batches)])
        truth = brute_force(flat, 1)
        site = report.site(f"layers.{k}:relu")
        assert (site.observations, list(site.fired_counts)) == (truth["observations"], truth["fired"])


def test_bad_masks_are_one_clear_error():
    model = TinyEncoder().eval()
    batches = padded_batches(n_batches=1)
    with pytest.raises(DataError, match="names a key the batch does not hold"):
        deadrelu.scan(model, batches, mask="nope")
    additive = [{**batches[0], "attention_mask": torch.where(batches[0]["attention_mask"] > 0, 0.0, float("-inf"))}]
    with pytest.raises(DataError, match="other than 0 and 1"):
        deadrelu.scan(model, additive)


@pytest.mark.parametrize("takes_mask", [True, False], ids=["mask passed down", "kept values copied"])
def test_mask_reaches_the_accumulator_without_a_copy_when_it_takes_one(takes_mask):
    """deadrelu's accumulators get the whole activation and the mask; a user's accumulator whose
    update() has no mask= gets the kept values instead. Both count the same."""
    from deadrelu.core.capture import ActivationCapture
    from deadrelu.core.stats import UnitStats

    seen = []

    class Recording(UnitStats):
        if takes_mask:

            def update(self, activation, unit_dim, nonnegative=False, mask=None):
                seen.append((tuple(activation.shape), None if mask is None else tuple(mask.shape)))
                super().update(activation, unit_dim, nonnegative, mask=mask)

        else:

            def update(self, activation, unit_dim, nonnegative=False):
                seen.append((tuple(activation.shape), None))
                super().update(activation, unit_dim, nonnegative)

    model = TinyEncoder().eval()
    batch = padded_batches(1)[0]
    with torch.no_grad():
        truth = truth_over([batch], model, masked=True)
        with ActivationCapture(model, stats_factory=lambda u, t, d: Recording(u, t, d)) as cap:
            model(**batch)
    (name, site), = [(n, s) for n, s in cap.ordered_sites() if n == "act"]
    assert list(site.stats.fired.tolist()) == truth["fired"]
    b, t = batch["input_ids"].shape
    kept = int(batch["attention_mask"].sum())
    assert seen == ([((b, t, 16), (b, t))] if takes_mask else [((kept, 16), None)])


def test_positional_attention_mask_counts_only_real_tokens():
    """``model(input_ids, attention_mask)`` is masked like ``model(input_ids=..., attention_mask=...)``."""
    model = TinyEncoder().eval()
    batches = padded_batches(seed=3)
    with torch.no_grad():
        truth = truth_over(batches, model, masked=True)
    with deadrelu.Probe(model) as probe, torch.no_grad():
        for b in batches:
            model(b["input_ids"], b["attention_mask"])
    site = probe.report().site("act")
    assert (site.observations, list(site.fired_counts)) == (truth["observations"], truth["fired"])


def test_an_additive_mask_passed_positionally_is_ignored_not_refused():
    class Additive(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, attention_mask=None):  # an additive 0 / -inf mask, as some blocks take
            return torch.relu(self.fc(x) + attention_mask[..., None])

    x = torch.randn(2, 3, 4)
    additive = torch.zeros(2, 3)
    additive[0, 2] = float("-inf")
    with deadrelu.Probe(Additive()) as probe, torch.no_grad():
        Additive()(x, additive)  # another instance: not observed
        probe.model(x, additive)
    assert probe.report().sites[0].observations == 6  # every position: the mask was not taken as 0/1


class FlatTokens(nn.Module):
    """Takes ``attention_mask`` but flattens tokens to ``(B*T, C)`` first: no activation is ``(B, T, ...)``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 6)
        self.act = nn.ReLU()

    def forward(self, x, attention_mask=None):
        return self.act(self.fc(x.flatten(0, 1)))


def test_a_given_mask_that_fits_no_activation_is_an_error():
    # It was dropped silently, so padding was counted.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 6), nn.ReLU())
    x = torch.randn(10, 5, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    fixed = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(deadrelu.DeadReluError, match=r"mask of shape \(4, 5\) fits no activation.*\(2, 5, 6\)"):
        deadrelu.scan(net, x, batch_size=4, mask=fixed)  # the last batch has 2 rows
    with pytest.raises(deadrelu.DeadReluError, match=r"mask of shape \(10, 4\) fits no activation"):
        deadrelu.scan(net, x, mask=torch.ones(10, 4, dtype=torch.bool))  # T - 1
    batches = [{"input": x[:4], "attention_mask": torch.zeros(4, 7)}]
    with pytest.raises(deadrelu.DeadReluError, match="fits no activation"):
        deadrelu.scan(net, batches, input_fn=lambda b: b["input"], mask="attention_mask")
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())
    # a mask that fits every batch is fine, and one that fits some sites of a pass is too
    r = deadrelu.scan(net, x, mask=torch.ones(10, 5, dtype=torch.bool))
    assert r.sites[0].observations == 50


def test_an_attention_mask_that_fits_no_activation_warns_once():
    net = FlatTokens()
    batch = {"x": torch.randn(2, 5, 3), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
    with pytest.warns(UserWarning, match="fits no activation.*padding included") as record:
        report = deadrelu.scan(net, [batch, batch])
    assert sum("fits no activation" in str(w.message) for w in record) == 1
    assert report.sites[0].observations == 20  # counted whole, as the warning says


def _tiny_t5(d_ff: int = 16):
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=50, d_model=8, d_kv=4, d_ff=d_ff, num_layers=1, num_decoder_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0,
    )
    torch.manual_seed(0)
    return transformers.T5Model(config).eval()


def _seq2seq_batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for lengths in ([5, 3, 2], [4, 4, 1]):
        t = max(lengths)
        mask = (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long()
        ids = torch.randint(1, 50, (3, t), generator=g) * mask
        # the decoder input is as long as the encoder's: the lengths coincide
        out.append({"input_ids": ids, "attention_mask": mask, "decoder_input_ids": torch.randint(1, 50, (3, t), generator=g)})
    return out


@pytest.mark.parametrize("decoder_mask", [False, True], ids=["no decoder mask", "decoder_attention_mask"])
def test_an_encoder_decoder_calls_attention_mask_is_the_encoders_only(decoder_mask):
    batches = _seq2seq_batches()
    if decoder_mask:
        for b in batches:
            b["decoder_attention_mask"] = torch.ones_like(b["decoder_input_ids"])
            b["decoder_attention_mask"][0, -1] = 0
    report = deadrelu.scan(_tiny_t5(), batches)
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    decoded = sum(int(b["decoder_attention_mask"].sum()) if decoder_mask else b["decoder_input_ids"].numel() for b in batches)
    got = {s.name.split(".")[0]: s.observations for s in report.sites}
    assert got == {"encoder": real, "decoder": decoded}  # the encoder's mask never lies over the decoder


def _decoder_truth(model, batches, path):
    """Brute force: the observations of the activation module at ``path``, at real decoder tokens only."""
    outs = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    with torch.no_grad():
        for b in batches:
            model(**b)
    handle.remove()
    kept = [o[b["decoder_attention_mask"].bool()] for o, b in zip(outs, batches)]
    return sum(k.shape[0] for k in kept), sum((k > 0).sum(0) for k in kept)


def test_a_decoder_attention_mask_is_honoured_without_an_encoder_mask():
    # A call with decoder_attention_mask but no attention_mask (Whisper's usual batch, T5 without
    # padding in its source) counted the decoder's padding: the decoder mask was read only beside
    # an encoder mask.
    model = _tiny_t5()
    g = torch.Generator().manual_seed(1)
    batches = []
    for lengths in ([5, 2], [3, 4]):
        dmask = (torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]).long()
        batches.append({"input_ids": torch.randint(1, 50, (2, 7), generator=g),
                        "decoder_input_ids": torch.randint(1, 50, (2, 5), generator=g), "decoder_attention_mask": dmask})
    path = next(n for n, m in model.named_modules() if n.startswith("decoder") and isinstance(m, nn.ReLU))
    observations, fired = _decoder_truth(model, batches, path)
    assert observations == 14
    site = deadrelu.scan(model, batches).site(path)
    assert site.observations == observations and torch.equal(torch.as_tensor(site.fired_counts), fired)
    with deadrelu.Monitor(model, window=4) as mon:
        for b in batches:
            model(**b)
            mon.step()
    assert mon.report("total").site(path).observations == observations
    encoder = next(s for s in deadrelu.scan(model, batches).sites if s.name.startswith("encoder"))
    assert encoder.observations == 2 * 2 * 7  # no encoder mask: every source token


class FlatDecoder(nn.Module):
    """An encoder-decoder whose encoder keeps (B, T, C) and whose decoder flattens its tokens to (B·T, C)."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(3, 4), nn.ReLU())
        self.decoder = nn.Sequential(nn.Linear(3, 4), nn.ReLU())

    def forward(self, x, tokens, attention_mask=None, decoder_attention_mask=None):
        return self.encoder(x).sum() + self.decoder(tokens.flatten(0, 1)).sum()


def test_a_decoder_mask_that_fits_nothing_warns_though_the_encoders_fits():
    # The warning was one flag per pass: the encoder's fitting mask hid the decoder's that fit nothing.
    batch = {"x": torch.randn(2, 5, 3), "tokens": torch.randn(2, 4, 3), "attention_mask": torch.ones(2, 5, dtype=torch.long),
             "decoder_attention_mask": torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])}
    with pytest.warns(UserWarning, match=r"decoder_attention_mask of shape \(2, 4\) fits no activation.*\(8, 4\)") as record:
        report = deadrelu.scan(FlatDecoder(), [batch, batch])
    said = [str(w.message) for w in record if "fits no activation" in str(w.message)]
    assert len(said) == 1 and "decoder_attention_mask" in said[0]
    assert {s.name.split(".")[0]: s.observations for s in report.sites} == {"encoder": 20, "decoder": 16}


class TwoTowers(nn.Module):
    """A CLIP-like model: a text tower on input_ids (B, T) and an image tower on pixel_values,
    whose patch tokens (B, P, C) have the text's length P = T by chance."""

    def __init__(self):
        super().__init__()
        self.text_embed = nn.Embedding(30, 8)
        self.text_mlp = nn.Sequential(nn.Linear(8, 6), nn.GELU())
        self.patch = nn.Conv2d(3, 8, 2, stride=2)
        self.image_mlp = nn.Sequential(nn.Linear(8, 6), nn.GELU())

    def forward(self, input_ids, pixel_values, attention_mask=None):
        text = self.text_mlp(self.text_embed(input_ids))
        patches = self.patch(pixel_values).flatten(2).transpose(1, 2)  # (B, 4, 8)
        image = F.relu(self.image_mlp(patches))
        return text.sum() + image.sum()


def test_the_text_mask_never_lies_over_the_image_towers_tokens():
    # A text attention_mask of (B, 4) fit the (B, 4 patches, C) image activations too and dropped
    # image tokens as if they were padding (a CLIP call whenever the text length equals the patches').
    torch.manual_seed(0)
    model = TwoTowers().eval()
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0]])
    batch = {"input_ids": torch.randint(0, 30, (2, 4), generator=g), "pixel_values": torch.randn(2, 3, 4, 4, generator=g),
             "attention_mask": mask}  # fmt: skip
    report = deadrelu.scan(model, [batch, batch])
    got = {s.name: s.observations for s in report.sites}
    assert got == {"text_mlp.1": 2 * 5, "image_mlp.1": 2 * 8, "<root>:relu": 2 * 8}
    with torch.no_grad():
        truth = (model.text_mlp(model.text_embed(batch["input_ids"]))[mask.bool()] > 0).sum(0) * 2
    assert list(report.site("text_mlp.1").fired_counts) == truth.tolist()
    with deadrelu.Monitor(model, window=4) as mon:
        model(**batch).backward()
        mon.step()
    assert {s.name: s.observations for s in mon.report("total").sites} == {k: v // 2 for k, v in got.items()}


def test_clip_vision_tokens_are_not_masked_by_the_text_mask():
    transformers = pytest.importorskip("transformers")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=60, hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32),
        vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                           patch_size=8),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.CLIPModel(config).eval()
    mask = torch.ones(2, 17, dtype=torch.long)  # 17 = 16 patches + CLS: the vision tower's length
    mask[0, 5:] = 0
    mask[1, 9:] = 0
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(3, 60, (2, 17), generator=g), "attention_mask": mask,
             "pixel_values": torch.randn(2, 3, 32, 32, generator=g)}  # fmt: skip
    got = {s.name.split(".")[0]: s.observations for s in deadrelu.scan(model, [batch]).sites}
    assert got == {"vision_model": 2 * 17, "text_model": int(mask.sum())}


# -- a mask that lies over some sites and not others ------------------------------------------------


class _DenseThenFlat(nn.Module):
    """A (B, T, C) layer, then one on the tokens flattened to (B·T, C) (a shared expert's layout)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.a, self.b = nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 6)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        h = F.relu(self.a(self.emb(input_ids)))
        B, T, C = h.shape
        return F.relu(self.b(h.reshape(B * T, C)))


def test_a_site_the_mask_does_not_lie_over_beside_sites_it_does_is_named_in_one_warning():
    import warnings

    ids = torch.randint(0, 30, (3, 5), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 1:] = 0
    mask[2, 3:] = 0
    model = _DenseThenFlat()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = deadrelu.scan(model, [{"input_ids": ids, "attention_mask": mask}] * 2)
    said = [str(w.message) for w in caught if "deadrelu" in str(w.message)]
    assert len(said) == 1  # one warning, not one per batch
    assert "<root> (relu, call 1, slot 2" in said[0] and "(15, 6)" in said[0] and "padding included" in said[0]
    # what it says is what was counted: the (B, T) site masked, the flattened one every position
    with torch.no_grad():
        h = F.relu(model.a(model.emb(ids)))
        flat = F.relu(model.b(h.reshape(15, 8)))
    dense_site, flat_site = report.sites
    assert dense_site.observations == 2 * int(mask.sum()) and flat_site.observations == 2 * 15
    assert list(dense_site.fired_counts) == (2 * (h[mask.bool()] > 0).sum(0)).tolist()
    assert list(flat_site.fired_counts) == (2 * (flat > 0).sum(0)).tolist()


def test_pooled_activations_of_one_row_per_sample_are_no_unmasked_padding():
    """(B, C) after pooling has no positions to mask: no warning beside masked (B, T, C) sites."""
    import warnings

    class Pooled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.a, self.pool = nn.Embedding(30, 8), nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, input_ids, attention_mask=None):
            h = F.relu(self.a(self.emb(input_ids)))
            return torch.tanh(self.pool(h[:, 0]))

    ids = torch.randint(0, 30, (3, 5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deadrelu.scan(Pooled(), [{"input_ids": ids, "attention_mask": torch.ones(3, 5, dtype=torch.long)}])


@pytest.mark.parametrize(
    "path, inside",
    [("decoder.block.0", True), ("model.decoder.layers.0.fc1", True), ("text_decoder.layers.0.ffn.act", True),
     ("model.text_decoder.layers.0", True), ("encoder.block.0", False), ("text_encoder.layers.0", False),
     ("decoder_embed", False), ("", False)],
)  # fmt: skip
def test_a_decoder_is_a_module_named_decoder_or_ending_in_underscore_decoder(path, inside):
    from deadrelu.core.inputs import in_decoder

    assert in_decoder(path) is inside


def test_a_text_decoder_takes_the_decoder_mask_not_the_encoders():
    """SeamlessM4T names its decoder text_decoder: its sites counted under the encoder's padding."""
    transformers = pytest.importorskip("transformers")
    config = transformers.SeamlessM4TConfig(
        vocab_size=60, t2u_vocab_size=60, hidden_size=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_layerdrop=0.0, decoder_layerdrop=0.0,
        max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.SeamlessM4TForTextToText(config).eval()
    g = torch.Generator().manual_seed(1)
    ids, dec = torch.randint(4, 60, (3, 7), generator=g), torch.randint(4, 60, (3, 5), generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 3:] = 0
    dmask = torch.ones(3, 5, dtype=torch.long)
    dmask[1, 2:] = 0
    outs = {}
    for name, m in model.named_modules():
        if name.endswith("ffn.act"):
            m.register_forward_hook(lambda mod, a, o, name=name: outs.setdefault(name, o.detach()))
    batch = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": dec, "decoder_attention_mask": dmask}
    with torch.no_grad():
        model(**batch)
    report = deadrelu.scan(model, [batch])
    decoder = next(s for s in report.sites if s.module.startswith("text_decoder"))
    assert decoder.observations == int(dmask.sum())  # the decoder's 12 positions, not all 15
    assert list(decoder.fired_counts) == (outs[decoder.module][dmask.bool()] > 0).sum(0).tolist()


class _HeadsFirst(nn.Module):
    """A linear-attention feature map on head-split queries, ``(B, T, H, d)`` transposed to
    ``(B, H, T, d)``, beside a ``(B, T, C)`` ReLU the mask does lie over."""

    def __init__(self, heads: int = 4, width: int = 32) -> None:
        super().__init__()
        self.heads, self.emb, self.q, self.ff = heads, nn.Embedding(50, width), nn.Linear(width, width), nn.Linear(width, 6)

    def forward(self, input_ids, attention_mask):
        x = self.emb(input_ids)
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.heads, c // self.heads).transpose(1, 2)
        phi = F.relu(q)  # (B, H, T, d): dims 0 and 1 are (B, H), not the mask's (B, T)
        mixed = phi.transpose(1, 2).reshape(b, t, c)  # back to (B, T, C)
        return F.relu(self.ff(mixed))


@pytest.mark.parametrize("tokens", [4, 6])  # 4 == heads: the mask was laid over (B, H), silently
def test_a_mask_never_lies_over_heads_moved_before_the_tokens(tokens):
    torch.manual_seed(0)
    model = _HeadsFirst().eval()
    mask = torch.ones(3, tokens, dtype=torch.long)
    mask[0, 1:] = 0
    batch = {"input_ids": torch.randint(0, 50, (3, tokens)), "attention_mask": mask}
    with pytest.warns(UserWarning, match="heads before tokens"):
        report = deadrelu.scan(model, [batch])
    heads_first, after = report.sites
    with torch.no_grad():
        q = model.q(model.emb(batch["input_ids"])).view(3, tokens, 4, 8).transpose(1, 2)
        phi = F.relu(q)
        out = F.relu(model.ff(phi.transpose(1, 2).reshape(3, tokens, 32)))
    # every position of the heads-first site is counted (as for any layout the mask does not fit) ...
    assert heads_first.observations == 3 * 4 * tokens
    assert heads_first.fired_counts == tuple((phi > 0).sum((0, 1, 2)).tolist())
    # ... and the (B, T, C) site after it takes the mask again
    kept = out[mask.bool()]
    assert after.observations == len(kept) and after.fired_counts == tuple((kept > 0).sum(0).tolist())
