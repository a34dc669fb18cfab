"""The source model's reference distributions and the KL of cut models from them (zeroc/compression/divergence.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zeroc.compression.divergence import cut_kl, divergence, layer_inputs, reference
from zeroc.compression.fold import build_compressed, cut_attention, whole_layer
from zeroc.config import AttentionCompression


@torch.inference_mode()
def test_position_offsets_leave_the_models_predictions_unchanged(random_gqa):
    """Calibration runs windows at random absolute offsets; attention is relative, so nothing else moves."""
    model = random_gqa.model
    windows = torch.randint(0, model.config.vocab_size, (3, 64), generator=torch.Generator().manual_seed(5))
    ref = reference(model, windows, batch=2)
    assert ref.positions[:, 0].unique().numel() == 3 and int(ref.positions.max()) < model.config.max_position_embeddings
    plain = torch.cat([F.log_softmax(model(windows[i: i + 2, :-1]), -1) for i in (0, 2)])
    torch.testing.assert_close(torch.cat(ref.log_probs), plain, atol=2e-4, rtol=0)
    kl, loss = divergence(model, ref)
    assert abs(kl) < 1e-6 and loss == pytest.approx(ref.loss, rel=1e-6)


@pytest.mark.parametrize("mode", ["fold", "rotate", "v"])
def test_a_cut_resumed_at_its_layer_has_the_kl_of_the_whole_cut_model(bundled, bundled_factors, mode):
    """`cut_kl` runs only the layers from the cut on, from the source's hidden states there: its KL is the KL of
    the whole model built with that cut (`build_compressed`, every other layer whole), to float noise, for a cut
    in each layer; and the source model is left as it was."""
    model, cfg, factors = bundled.model, bundled.config, bundled_factors
    ref = reference(model, torch.randint(4, cfg.vocab_size, (3, 80), generator=torch.Generator().manual_seed(7)),
                    batch=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        cut = (d // 8, d // 4)  # per KV head
        comp = factors[i].layer_compression(d, cut) if mode == "v" else factors[i].layer_compression(cut, d, mode)
        layers = [whole_layer(cfg)] * cfg.num_hidden_layers
        layers[i] = comp
        whole, _ = divergence(build_compressed(model, factors, AttentionCompression(tuple(layers), "", 1.0)), ref)
        resumed = cut_kl(model, ref, i, cut_attention(model.model.layers[i].self_attn, cfg, i, factors[i], comp),
                         layer_inputs(model, ref, i))
        assert whole > 1e-5  # a real cut (float noise is about 1e-8)
        assert resumed == pytest.approx(whole, rel=1e-3, abs=1e-7), (i, mode)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
