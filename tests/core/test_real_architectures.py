"""Real Hugging Face architectures (tiny random-init configs, no download): every activation site's
units, observations and fired counts equal an independent truth read with plain torch forward hooks
on the activation modules, reduced over the dimension the architecture puts its features on."""

from __future__ import annotations

import pytest
import torch

import deadrelu

T = pytest.importorskip("transformers")

ACT_CLASSES = {"GELUActivation", "NewGELUActivation", "QuickGELUActivation", "BloomGelu", "GELU",
               "FastGELUActivation", "PytorchGELUTanh", "GELUTanh"}  # fmt: skip


def hook_truth(model, batches, feature_dim):
    acts = [(p, m) for p, m in model.named_modules() if type(m).__name__ in ACT_CLASSES]
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, o, p=p: seen.setdefault(p, []).append(o.detach())) for p, m in acts]
    try:
        with torch.no_grad():
            for b in batches:
                model(**b) if isinstance(b, dict) else model(b)
    finally:
        for h in hooks:
            h.remove()
    truth = {}
    for path, outs in seen.items():
        d = feature_dim(path, outs[0])
        flat = torch.cat([o.movedim(d, -1).reshape(-1, o.shape[d]) for o in outs])
        truth[path] = (flat.shape[1], flat.shape[0], (flat > 0).sum(0).tolist())
    return truth


def last(path, t):
    return t.ndim - 1


def wav2vec2_dim(path, t):
    conv = "feature_extractor" in path or "pos_conv_embed" in path
    return 1 if conv else t.ndim - 1  # conv outputs are (B, C, T)


def images(n=2, size=32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, 3, size, size, generator=g) for _ in range(n)]


def tokens(vocab=50):
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, vocab, (2, 7), generator=g)} for _ in range(2)]


CASES = {
    "convnext": (lambda: T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)), images, last),
    "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4)), images, last),
    "pvt_v2": (lambda: T.PvtV2Model(T.PvtV2Config(hidden_sizes=[8, 16, 16, 16], depths=[1] * 4, num_attention_heads=[1] * 4, mlp_ratios=[2] * 4)), lambda: images(size=64), last),
    "segformer": (lambda: T.SegformerModel(T.SegformerConfig(hidden_sizes=[8, 16, 16, 16], depths=[1] * 4, num_attention_heads=[1] * 4, decoder_hidden_size=16)), lambda: images(size=64), last),
    "wav2vec2_layer_norm": (lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), feat_extract_norm="layer", num_conv_pos_embeddings=4, num_conv_pos_embedding_groups=2)), lambda: [torch.randn(2, 800, generator=torch.Generator().manual_seed(0))] * 2, wav2vec2_dim),
    "gpt2": (lambda: T.GPT2Model(T.GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, bos_token_id=0, eos_token_id=0)), tokens, last),
    "clip_vision": (lambda: T.CLIPVisionModel(T.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=32, patch_size=8)), images, last),
    "bloom": (lambda: T.BloomModel(T.BloomConfig(hidden_size=16, n_layer=2, n_head=2, vocab_size=50)), tokens, last),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_real_architecture_matches_hook_truth(name):
    torch.manual_seed(0)
    make, data, feature_dim = CASES[name]
    model = make().eval()
    batches = data()
    truth = hook_truth(model, batches, feature_dim)
    report = deadrelu.scan(model, batches)
    assert truth and len(report.sites) == len(truth)
    for site in report.sites:
        units, observations, fired = truth[site.module]
        assert (site.units, site.observations, list(site.fired_counts)) == (units, observations, fired), site.name
        assert site.unit_axis_source.startswith("producer:")
    assert report.uncaptured == ()
