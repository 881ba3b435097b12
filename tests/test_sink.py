"""Attention sinks (`apply_mindskip(sink_tokens=n)`): the first n real tokens of each sequence always run
attention in token-granularity layers, in prefill, training, cached generation, and through save/load."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.integrations.hf import mindskip_layers, record_routing
from tests.models import greedy, left_padded_prompts, randomize_routers, tiny_model


def test_skip_all_but_the_sink_matches_a_recomputation():
    """threshold 1 (every score below it) with one sink: each routed layer runs attention for token 0 only,
    which attends to itself alone."""
    model = tiny_model("llama")
    reference = tiny_model("llama")
    mk.apply_mindskip(model, layers=[1, 2], threshold=1.0, sink_tokens=1, backend="reference")
    ids = torch.randint(0, 97, (1, 8))
    base = reference.model
    pos = torch.arange(8).unsqueeze(0)
    with torch.no_grad():
        h = base.embed_tokens(ids)
        for i, layer in enumerate(base.layers):
            if i in (1, 2):
                z = layer.input_layernorm(h)
                out, _ = layer.self_attn(z[:, :1], position_embeddings=base.rotary_emb(z, pos[:, :1]),
                                         attention_mask=None)
                h = h.clone()
                h[:, :1] += out
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            else:
                h = layer(h, position_ids=pos, position_embeddings=base.rotary_emb(h, pos))
        expected = reference.lm_head(base.norm(h))
        torch.testing.assert_close(model(ids, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)


def test_sinks_are_the_first_real_tokens_under_left_padding_and_never_padding():
    model = tiny_model("llama")
    mk.apply_mindskip(model, threshold=1.0, sink_tokens=2, backend="reference")
    ids, mask = left_padded_prompts([6, 3, 1], seed=0)
    with torch.no_grad(), record_routing(model) as rec:
        model(ids, attention_mask=mask, use_cache=False)
    first_real = (mask != 0).long().cumsum(1) - 1
    expected = (mask != 0) & (first_real < 2)
    for entry in rec.entries:
        assert torch.equal(entry.keep, expected)


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_generation_with_sinks_equals_recompute(seed):
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[0, 2], sink_tokens=3)
    torch.manual_seed(seed)
    randomize_routers(model)
    ids, mask = left_padded_prompts([9, 5, 2], seed)
    cached = greedy(model, ids, mask, use_cache=True)
    torch.testing.assert_close(cached, greedy(model, ids, mask, use_cache=False), rtol=0, atol=0)


def test_sinks_in_training_save_and_load(tmp_path):
    model = tiny_model("llama")
    mk.apply_mindskip(model, threshold=1.0, sink_tokens=1, backend="reference")
    for layer in mindskip_layers(model).values():
        layer.router.weight.requires_grad_(True)
    model.train()
    ids = torch.randint(0, 97, (2, 7))
    with record_routing(model) as rec:
        model(ids, labels=ids).loss.backward()
    assert all(int(e.keep.sum()) == 2 and bool(e.keep[:, 0].all()) for e in rec.entries)
    mk.save_routers(model, tmp_path)
    loaded = tiny_model("llama")
    mk.load_routers(loaded, tmp_path)
    assert {layer.mindskip.sink_tokens for layer in mindskip_layers(loaded).values()} == {1}
    with pytest.raises(ValueError, match="sink_tokens must be"):
        mk.apply_mindskip(tiny_model("llama"), sink_tokens=-1)


def test_sequence_granularity_ignores_sinks():
    model = tiny_model("llama")
    mk.apply_mindskip(model, threshold=1.0, granularity="sequence", sink_tokens=4, backend="reference")
    with torch.no_grad(), record_routing(model) as rec:
        model(torch.randint(0, 97, (2, 6)), use_cache=False)
    assert not any(bool(e.keep.any()) for e in rec.entries)
