"""Static sub-layer drop on a tiny Llama: the dropped forward of each target, the training-free drops' cosine
choice, and the export of tuned routers' learned keep rates."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.integrations.hf import TARGETS, mindskip_layers
from mindskip_kernels.layer_drop import (
    drop_sublayers,
    dropped_layers,
    layer_drop,
    layers_to_drop_by_keep_rate,
    layers_to_drop_by_similarity,
    sublayer_similarity,
)
from tests.models import greedy, left_padded_prompts, tiny_model


def items(n: int = 3, length: int = 10) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, 97, (n, length))
    return [{"input_ids": row, "labels": row.clone()} for row in ids]


@pytest.mark.parametrize("target", TARGETS)
def test_dropped_layer_equals_a_routed_layer_that_skips_everything(target):
    ids = torch.randint(0, 97, (2, 9))
    routed = tiny_model("llama", layers=5)
    mk.apply_mindskip(routed, layers=[1, 3], threshold=1.0, backend="reference", target=target)  # all skipped
    dropped = drop_sublayers(tiny_model("llama", layers=5), [3, 1], target)
    assert dropped_layers(dropped) == {1: target, 3: target}
    with torch.no_grad():
        torch.testing.assert_close(dropped(ids).logits, routed(ids).logits, rtol=0, atol=0)
        assert not torch.equal(dropped(ids).logits, tiny_model("llama", layers=5)(ids).logits)


@pytest.mark.parametrize("target", TARGETS)
def test_dropped_layer_equals_the_dense_layer_with_that_sublayer_zeroed(target):
    """An oracle that shares no code with the routed path: zero the dropped sub-layer's output projection(s) in
    a dense copy; each dropped layer also takes the bare call any decoder layer takes."""
    ids = torch.randint(0, 97, (2, 9))
    dense = tiny_model("llama", layers=5)
    with torch.no_grad():
        for i in (1, 3):
            if target != "mlp":
                dense.model.layers[i].self_attn.o_proj.weight.zero_()
            if target != "attention":
                dense.model.layers[i].mlp.down_proj.weight.zero_()
    dropped = drop_sublayers(tiny_model("llama", layers=5), [1, 3], target)
    with torch.no_grad():
        torch.testing.assert_close(dropped(ids).logits, dense(ids).logits, rtol=1e-6, atol=1e-6)
        h = torch.randn(2, 9, 48)
        pos = torch.arange(9).unsqueeze(0)
        layer = dropped.model.layers[1]
        out = layer(h, position_ids=pos, position_embeddings=dropped.model.rotary_emb(h, pos))
        assert out.shape == h.shape


def test_mlp_drop_generates_with_the_dense_cache():
    model = drop_sublayers(tiny_model("llama", layers=4), [0, 2], "mlp")
    ids, mask = left_padded_prompts([9, 5, 2], 0)
    torch.testing.assert_close(greedy(model, ids, mask, use_cache=True), greedy(model, ids, mask, use_cache=False),
                               rtol=0, atol=0)


def _layer1_cosine(model, ids: torch.Tensor, target: str) -> float:
    """Hook-free recomputation of layer 1's input/output cosine for `target` on one unpadded sequence."""
    base = model.model
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    with torch.no_grad():
        h = base.embed_tokens(ids)
        rope = base.rotary_emb(h, pos)
        h = base.layers[0](h, position_ids=pos, position_embeddings=rope)
        layer = base.layers[1]
        attn, _ = layer.self_attn(layer.input_layernorm(h), position_embeddings=rope, attention_mask=None)
        mid = h + attn
        out = mid + layer.mlp(layer.post_attention_layernorm(mid))
        x, y = {"attention": (h, mid), "mlp": (mid, out), "block": (h, out)}[target]
        return float(torch.nn.functional.cosine_similarity(x, y, dim=-1).mean())


@pytest.mark.parametrize("target", TARGETS)
def test_similarity_is_the_cosine_of_the_sublayer_input_and_output(target):
    model = tiny_model("llama", layers=5)
    data = items()
    with torch.no_grad():  # the target's output 0 in layer 2: cosine exactly 1
        if target != "mlp":
            model.model.layers[2].self_attn.o_proj.weight.zero_()
        if target != "attention":
            model.model.layers[2].mlp.down_proj.weight.zero_()
    sim = sublayer_similarity(model, data, target=target, layers=[1, 2, 3])
    assert set(sim) == {1, 2, 3} and sim[2] == pytest.approx(1.0) and max(sim[1], sim[3]) < 1.0 - 1e-4
    one = sublayer_similarity(model, data[:1], target=target, layers=[1])
    assert one[1] == pytest.approx(_layer1_cosine(model, data[0]["input_ids"].unsqueeze(0), target), rel=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_layer_drop_removes_the_most_similar_layers(target):
    model = tiny_model("llama", layers=6)
    with torch.no_grad():
        for i in (2, 4):
            model.model.layers[i].self_attn.o_proj.weight.mul_(1e-3)
            model.model.layers[i].mlp.down_proj.weight.mul_(1e-3)
    chosen = layer_drop(model, items(), target=target, n=2)
    assert chosen == [2, 4] and dropped_layers(model) == {2: target, 4: target}
    with pytest.raises(ValueError, match="exactly one of n"):
        layer_drop(tiny_model("llama", layers=6), items(), target=target, n=1, keep=0.5)
    with pytest.raises(ValueError, match="n must be"):
        layer_drop(tiny_model("llama", layers=6), items(), target=target, n=9)
    assert layer_drop(tiny_model("llama", layers=6), items(), target=target, keep=0.5) == sorted(
        layer_drop(tiny_model("llama", layers=6), items(), target=target, n=2))


def test_layers_to_drop_by_similarity_breaks_ties_by_index():
    similarity = {3: 0.5, 2: 0.9, 1: 0.9, 0: 0.1}  # the tied layers inserted high index first
    assert layers_to_drop_by_similarity(similarity, n=1) == [1]
    assert layers_to_drop_by_similarity(similarity, n=2) == [1, 2]
    assert layers_to_drop_by_similarity(similarity, keep=0.25) == [1, 2, 3]


def test_layers_to_drop_by_keep_rate_from_learned_keep_rates():
    rates = {3: 0.9, 4: 0.1, 5: 0.45, 6: 0.55, 7: 0.0}
    assert layers_to_drop_by_keep_rate(rates) == [4, 5, 7]
    assert layers_to_drop_by_keep_rate(rates, n=2) == [4, 7]
    assert layers_to_drop_by_keep_rate(rates, keep=0.4) == [4, 5, 7]
    with pytest.raises(ValueError, match="empty"):
        layers_to_drop_by_keep_rate({})


def test_drop_sublayers_refuses_bad_input_and_changes_nothing():
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[1])
    with pytest.raises(ValueError, match="routed by apply_mindskip"):
        drop_sublayers(model, [1])
    with pytest.raises(ValueError, match="decoder layer indices"):
        drop_sublayers(model, [7])
    with pytest.raises(ValueError, match="target must be one of"):
        drop_sublayers(model, [2], "ffn")
    with pytest.raises(ValueError, match="target must be one of"):
        sublayer_similarity(model, items(), target="ffn")
    assert dropped_layers(model) == {} and set(mindskip_layers(model)) == {1}
    drop_sublayers(model, [2], "mlp")
    with pytest.raises(ValueError, match="already dropped"):
        drop_sublayers(model, [2, 3], "block")
    assert dropped_layers(model) == {2: "mlp"}
    with pytest.raises(ValueError, match="already dropped"):
        sublayer_similarity(model, items(), target="block", layers=[0, 2])
    with pytest.raises(ValueError, match="routed by apply_mindskip"):
        sublayer_similarity(model, items(), layers=[0, 1])
    with pytest.raises(ValueError, match="drop_sublayers"):
        mk.apply_mindskip(model, layers=[2])
    assert dropped_layers(model) == {2: "mlp"} and set(mindskip_layers(model)) == {1}


def test_unsupported_architectures_are_refused():
    import transformers

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=97))
    with pytest.raises(ValueError, match="model must be one of"):
        sublayer_similarity(gpt2, items(), target="mlp")
    with pytest.raises(ValueError, match="model must be one of"):
        drop_sublayers(gpt2, [0], "mlp")
