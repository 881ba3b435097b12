"""Static attention-layer drop on a tiny Llama: the dropped forward, Attention Drop's cosine choice, and the
export of tuned routers' learned keep rates."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.integrations.hf import mindskip_layers
from mindskip_kernels.layer_drop import (
    attention_drop,
    attention_similarity,
    drop_attention,
    dropped_layers,
    export_layers,
)
from tests.test_hf import tiny_model


def items(n: int = 3, length: int = 10) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 97, (n, length))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


def test_dropped_layer_equals_a_routed_layer_that_skips_everything():
    ids = torch.randint(0, 97, (2, 9))
    routed = tiny_model("llama", layers=5)
    mk.apply_mindskip(routed, layers=[1, 3], threshold=1.0, backend="reference")  # scores < 1: all skipped
    dropped = drop_attention(tiny_model("llama", layers=5), [3, 1])
    assert dropped_layers(dropped) == [1, 3]
    with torch.no_grad():
        torch.testing.assert_close(dropped(ids).logits, routed(ids).logits, rtol=0, atol=0)
        assert not torch.equal(dropped(ids).logits, tiny_model("llama", layers=5)(ids).logits)


def test_attention_similarity_is_the_cosine_of_the_sublayer_input_and_output():
    model = tiny_model("llama", layers=5)
    data = items()
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()  # attention output 0: cosine exactly 1
    sim = attention_similarity(model, data, layers=[1, 2, 3])
    assert set(sim) == {1, 2, 3} and sim[2] == pytest.approx(1.0) and max(sim[1], sim[3]) < 1.0 - 1e-4
    # independent: hook-free recomputation of layer 1's cosine on the first item
    base = model.model
    ids = data[0]["input_ids"].unsqueeze(0)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        h = base.embed_tokens(ids)
        h = base.layers[0](h, position_ids=pos, position_embeddings=base.rotary_emb(h, pos))
        attn, _ = base.layers[1].self_attn(base.layers[1].input_layernorm(h),
                                           position_embeddings=base.rotary_emb(h, pos), attention_mask=None)
        first = torch.nn.functional.cosine_similarity(h, h + attn, dim=-1).mean()
    one = attention_similarity(model, data[:1], layers=[1])
    assert one[1] == pytest.approx(float(first), rel=1e-5)


def test_attention_drop_removes_the_most_similar_layers():
    model = tiny_model("llama", layers=6)
    with torch.no_grad():
        for i in (2, 4):
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
    chosen = attention_drop(model, items(), n=2)
    assert chosen == [2, 4] and dropped_layers(model) == [2, 4]
    with pytest.raises(ValueError, match="exactly one of n"):
        attention_drop(tiny_model("llama", layers=6), items(), n=1, keep=0.5)
    with pytest.raises(ValueError, match="n must be"):
        attention_drop(tiny_model("llama", layers=6), items(), n=9)
    assert attention_drop(tiny_model("llama", layers=6), items(), keep=0.5) == sorted(
        attention_drop(tiny_model("llama", layers=6), items(), n=2))


def test_export_layers_from_learned_keep_rates():
    rates = {3: 0.9, 4: 0.1, 5: 0.45, 6: 0.55, 7: 0.0}
    assert export_layers(rates) == [4, 5, 7]
    assert export_layers(rates, n=2) == [4, 7]
    assert export_layers(rates, keep=0.4) == [4, 5, 7]
    with pytest.raises(ValueError, match="empty"):
        export_layers({})


def test_drop_attention_refuses_routed_layers_and_bad_indices():
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[1])
    with pytest.raises(ValueError, match="routed by apply_mindskip"):
        drop_attention(model, [1])
    with pytest.raises(ValueError, match="decoder layer indices"):
        drop_attention(model, [7])
    assert dropped_layers(model) == [] and set(mindskip_layers(model)) == {1}
