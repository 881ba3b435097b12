"""The benchmarks' per-layer ideal (benchmarks/models.py) computes what a routed layer computes (so its time is the
time of that work): every token kept == the dense layer, none kept == the skipped work removed, and under kv="all"
the kept rows get exactly the dense layer's output, the others pass (block) or get only the MLP (attention)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_routed_cost import CONFIGS
from benchmarks.models import IdealLayer
from tests.models import tiny_model


@pytest.fixture(scope="module")
def layer_inputs():
    model = tiny_model("llama", layers=2)
    layer = model.model.layers[1]
    x = torch.randn(2, 11, model.config.hidden_size)
    pos = torch.arange(11).expand(2, 11)
    return layer, x, model.model.rotary_emb(x, pos)


def dense(layer, x, emb):
    return layer(x, position_embeddings=emb)


@pytest.mark.parametrize("config", CONFIGS)
def test_every_token_kept_is_the_dense_layer(layer_inputs, config):
    layer, x, emb = layer_inputs
    with torch.no_grad():
        out = IdealLayer(layer, *CONFIGS[config], kept=11, seq_len=11)(x, position_embeddings=emb)
        torch.testing.assert_close(out, dense(layer, x, emb))


@pytest.mark.parametrize("config", CONFIGS)
def test_nothing_kept_removes_the_target(layer_inputs, config):
    layer, x, emb = layer_inputs
    target, _ = CONFIGS[config]
    with torch.no_grad():
        out = IdealLayer(layer, *CONFIGS[config], kept=0, seq_len=11)(x, position_embeddings=emb)
        if target == "block":
            expected = x
        elif target == "attention":
            expected = x + layer.mlp(layer.post_attention_layernorm(x))
        else:
            expected = x + layer.self_attn(layer.input_layernorm(x), emb, None)[0]
        torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("config", ["attention-all", "block-all"])
def test_kv_all_kept_rows_get_the_dense_output(layer_inputs, config):
    layer, x, emb = layer_inputs
    ideal = IdealLayer(layer, *CONFIGS[config], kept=5, seq_len=11)
    rows = ideal.rows
    others = torch.ones(11, dtype=torch.bool)
    others[rows] = False
    with torch.no_grad():
        out = ideal(x, position_embeddings=emb)
        torch.testing.assert_close(out[:, rows], dense(layer, x, emb)[:, rows])
        passed = x if config == "block-all" else x + layer.mlp(layer.post_attention_layernorm(x))
        torch.testing.assert_close(out[:, others], passed[:, others])


def test_kv_kept_prefix_is_the_dense_layer_on_the_prefix(layer_inputs):
    layer, x, emb = layer_inputs
    cos, sin = emb
    with torch.no_grad():
        out = IdealLayer(layer, "block", "kept", kept=4, seq_len=11)(x, position_embeddings=emb)
        torch.testing.assert_close(out[:, :4], dense(layer, x[:, :4], (cos[:, :4], sin[:, :4])))
        torch.testing.assert_close(out[:, 4:], x[:, 4:])


@pytest.mark.parametrize("kept", [0, 5, 11])
@pytest.mark.parametrize("config", CONFIGS)
def test_adapter_goes_on_the_skipped_rows_only(layer_inputs, config, kept):
    """With a skipped-token adapter, the kept rows are as without it and the others get x + adapter(norm(x))
    where they passed (kept=0: the static linear replacement of the target, layer_drop's)."""
    from mindskip_kernels.adapter import SkipAdapter
    from mindskip_kernels.layer_drop import drop_sublayers

    layer, x, emb = layer_inputs
    target, kv = CONFIGS[config]
    adapter = SkipAdapter(x.shape[-1], "linear", 3)
    for p in adapter.parameters():
        torch.nn.init.normal_(p, std=0.3)
    plain = IdealLayer(layer, target, kv, kept=kept, seq_len=11)
    ideal = IdealLayer(layer, target, kv, kept=kept, seq_len=11, adapter=adapter)
    skipped = torch.ones(11, dtype=torch.bool)
    skipped[ideal.rows if kv == "all" else torch.arange(kept)] = False
    with torch.no_grad():
        out, without = ideal(x, position_embeddings=emb), plain(x, position_embeddings=emb)
        torch.testing.assert_close(out[:, ~skipped], without[:, ~skipped])
        if kept == 0:  # the static linear replacement: drop_sublayers' forward with the map
            import copy

            model = tiny_model("llama", layers=2)
            replaced = drop_sublayers(copy.deepcopy(model), [1], target, {1: adapter}).model.layers[1]
            torch.testing.assert_close(out, replaced(x, position_embeddings=emb, attention_mask=None))
        elif skipped.any():
            assert (out[:, skipped] - without[:, skipped]).abs().max() > 1e-3
