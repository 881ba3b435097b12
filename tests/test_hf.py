"""apply_mindskip on real (tiny, randomly initialised) transformers models against independent computations."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

import mindskip_kernels as mk
from mindskip_kernels.integrations.hf import mindskip_layers, record_routing
from tests.models import ARCHS, randomize_routers, tiny_model


def recompute_one(dense, routed: dict[int, torch.Tensor], ids: torch.Tensor, threshold: float, granularity: str):
    """Independent MindSkip forward of ONE unpadded sequence with the dense model's own modules: for each
    routed layer, the HF attention module runs on the kept tokens only (its own causal SDPA) with RoPE at
    their original positions; skipped tokens pass through; the MLP runs for all."""
    base = dense.model
    h = base.embed_tokens(ids)
    pos = torch.arange(ids.shape[1]).unsqueeze(0)
    for i, layer in enumerate(base.layers):
        if i not in routed:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=base.rotary_emb(h, pos))
            continue
        z = layer.input_layernorm(h)
        logits = z[0] @ routed[i][0]
        score = torch.sigmoid(logits) if granularity == "token" else torch.sigmoid(z[0].mean(0) @ routed[i][0])
        kept = torch.nonzero((score >= threshold).expand(ids.shape[1])).squeeze(1)
        h = h.clone()
        if kept.numel():
            zk = z[:, kept]
            attn_out, _ = layer.self_attn(zk, position_embeddings=base.rotary_emb(zk, kept.unsqueeze(0)),
                                          attention_mask=None)
            h[:, kept] = h[:, kept] + attn_out
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return dense.lm_head(base.norm(h))


@pytest.mark.parametrize("arch", list(ARCHS))
def test_threshold_zero_is_dense(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        dense = model(ids).logits
        mk.apply_mindskip(model, threshold=0.0, backend="reference")
        with record_routing(model) as rec:
            out = model(ids).logits
    assert set(mindskip_layers(model)) == {1, 2}, "paper choice for 4 layers: the 2 before the final one"
    assert rec.keep_rates() == {1: 1.0, 2: 1.0}
    torch.testing.assert_close(out, dense, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_skip_everything_removes_attention(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, 97, (2, 13))
    removed = copy.deepcopy(model)
    for i in (1, 2):  # the same model with those attention sub-layers removed
        removed.model.layers[i].self_attn.forward = lambda hidden_states, **kw: (torch.zeros_like(hidden_states),
                                                                                 None)
    with torch.no_grad():
        mk.apply_mindskip(model, threshold=1.0)  # zero routers score 0.5 < 1: nothing kept
        with record_routing(model) as rec:
            out = model(ids).logits
        expect = removed(ids).logits
    assert rec.keep_rates() == {1: 0.0, 2: 0.0}
    torch.testing.assert_close(out, expect, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_mixed_routing_matches_independent_recompute(arch, granularity):
    model = tiny_model(arch)
    dense = copy.deepcopy(model)
    ids = torch.randint(0, 97, (4, 17))
    mk.apply_mindskip(model, layers=[0, 2], granularity=granularity)
    randomize_routers(model)
    routed = {i: layer.router.weight.detach() for i, layer in mindskip_layers(model).items()}
    with torch.no_grad(), record_routing(model) as rec:
        out = model(ids).logits
        rates = rec.keep_rates()
        for b in range(ids.shape[0]):
            expect = recompute_one(dense, routed, ids[b : b + 1], 0.5, granularity)
            torch.testing.assert_close(out[b : b + 1], expect, atol=2e-5, rtol=1e-5)
    assert any(0.0 < r < 1.0 for r in rates.values()), f"routing should be mixed, got {rates}"


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_padding_left_and_right_matches_alone(granularity):
    model = tiny_model("llama")
    mk.apply_mindskip(model, granularity=granularity)
    randomize_routers(model)
    lengths, n = [11, 7, 4], 11
    seqs = [torch.randint(0, 97, (length,)) for length in lengths]
    for side in ("left", "right"):
        ids = torch.zeros(len(seqs), n, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, s in enumerate(seqs):
            sl = slice(n - len(s), n) if side == "left" else slice(0, len(s))
            ids[b, sl], mask[b, sl] = s, 1
        pos = (mask.cumsum(1) - 1).clamp_min(0)
        with torch.no_grad():
            batched = model(ids, attention_mask=mask, position_ids=pos).logits
            for b, s in enumerate(seqs):
                alone = model(s.unsqueeze(0)).logits[0]
                torch.testing.assert_close(batched[b][mask[b].bool()], alone, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_router_gets_straight_through_gradient(granularity):
    model = tiny_model("llama")
    mk.apply_mindskip(model, granularity=granularity)
    randomize_routers(model, std=0.5)
    for name, p in model.named_parameters():
        p.requires_grad_(".router." in name)
    model.train()
    ids = torch.randint(0, 97, (3, 15))
    with record_routing(model) as rec:
        out = model(ids, labels=ids)
    layers = mindskip_layers(model)
    sparsity = rec.training_keep_rates().sum()
    (out.loss + 0.01 * sparsity).backward()
    for i, layer in layers.items():
        g = layer.router.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, f"layer {i} router gradient {g}"
    frozen = [n for n, p in model.named_parameters() if ".router." not in n]
    assert all(model.get_parameter(n).grad is None for n in frozen)


def test_save_load_round_trip(tmp_path):
    model = tiny_model("qwen2")
    mk.apply_mindskip(model, layers=2, threshold=0.4, granularity="sequence")
    randomize_routers(model)
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expect = model(ids).logits
    mk.save_routers(model, tmp_path / "routers")
    fresh = tiny_model("qwen2")
    mk.load_routers(fresh, tmp_path / "routers")
    layers = mindskip_layers(fresh)
    assert set(layers) == {1, 2}
    assert layers[1].mindskip.threshold == 0.4 and layers[1].mindskip.granularity == "sequence"
    assert "model.layers.1.router.weight" in fresh.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, expect)


def test_two_models_in_one_process_do_not_interfere():
    a, b, plain = tiny_model("llama"), tiny_model("llama"), tiny_model("llama")
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        dense = plain(ids).logits
        mk.apply_mindskip(a, threshold=0.0)
        mk.apply_mindskip(b, threshold=1.0)
        out_a, out_b, out_plain = a(ids).logits, b(ids).logits, plain(ids).logits
    torch.testing.assert_close(out_a, dense, atol=2e-5, rtol=1e-5)
    assert (out_b - dense).abs().max() > 1e-3, "model b skips attention, its logits must differ"
    assert torch.equal(out_plain, dense), "an unpatched model of the same class must be untouched"
    assert not mindskip_layers(plain)


def test_bad_arguments_raise_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="threshold"):
        mk.apply_mindskip(model, threshold=1.5)
    with pytest.raises(ValueError, match="granularity"):
        mk.apply_mindskip(model, granularity="layer")
    with pytest.raises(ValueError, match="final layer"):
        mk.apply_mindskip(model, layers=[3])
    with pytest.raises(ValueError, match="layers"):
        mk.apply_mindskip(model, layers=7)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model must be one of"):
        mk.apply_mindskip(gpt2)
    with pytest.raises(ValueError, match="no MindSkip routers"):
        mk.save_routers(model, "/tmp/never-written")


# ---- issue 12: state that travels with a copy, padding masks, router files --------------------------------------


def _padded_batch(seqs: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded ids and mask [B, n]."""
    ids = torch.zeros(len(seqs), n, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, s in enumerate(seqs):
        ids[b, n - len(s):], mask[b, n - len(s):] = s, 1
    return ids, mask


def test_deep_copy_records_its_own_padding_mask():
    """A deep copy of a patched model routes its own batch's padding, not the original's (issue 12, defect 8)."""
    model = tiny_model("llama")
    mk.apply_mindskip(model, granularity="sequence", backend="reference")
    randomize_routers(model)
    twin = copy.deepcopy(model)
    seqs = [torch.randint(0, 97, (n,)) for n in (9, 4)]
    ids, mask = _padded_batch(seqs, 9)
    with torch.no_grad():
        batched = twin(ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp_min(0)).logits
        for b, s in enumerate(seqs):
            torch.testing.assert_close(batched[b][mask[b].bool()], twin(s.unsqueeze(0)).logits[0], atol=2e-5,
                                       rtol=1e-5)
    assert model.model._mindskip_state.padding_mask is None, "the original never ran: its state is untouched"
    assert twin._prepare_cache_for_generation.__self__ is twin


def test_padding_mask_of_another_batch_raises():
    """A 2-D attention_mask whose batch (or length) does not match is an error, not silently dropped (defect 9)."""
    model = mk.apply_mindskip(tiny_model("llama"), backend="reference")
    ids = torch.randint(0, 97, (2, 7))
    for bad in (torch.ones(3, 7, dtype=torch.long), torch.ones(1, 7, dtype=torch.long)):
        with torch.no_grad(), pytest.raises(ValueError, match=r"attention_mask must have shape \[2, >= 7\]"):
            model(ids, attention_mask=bad, use_cache=False)


def test_load_routers_of_another_hidden_size_leaves_the_model_unchanged(tmp_path):
    """Defect 6: validate everything before patching; on error the model is exactly as before."""
    other = tiny_model("llama")
    other.model.layers[1].input_layernorm.weight = torch.nn.Parameter(torch.ones(40))  # a hidden size of 40
    mk.apply_mindskip(other, threshold=0.6)
    other.model.layers[1].router = torch.nn.Linear(40, 1, bias=False)
    mk.save_routers(other, tmp_path / "r")
    model = tiny_model("llama")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        before = model(ids).logits
    with pytest.raises(ValueError) as info:
        mk.load_routers(model, tmp_path / "r")
    assert not mindskip_layers(model) and not hasattr(model.model, "_mindskip_state")
    assert "router of layer 1 has shape (1, 40)" in str(info.value)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


def test_per_layer_threshold_and_granularity_survive_save_load(tmp_path):
    """Defect 10: each layer's threshold and granularity are stored and loaded."""
    model = tiny_model("llama", layers=5)
    mk.apply_mindskip(model, layers=[1], threshold=0.3, granularity="token")
    mk.apply_mindskip(model, layers=[2, 3], threshold=0.7, granularity="sequence")
    mindskip_layers(model)[3].mindskip.threshold = 0.55
    randomize_routers(model)
    mk.save_routers(model, tmp_path / "r")
    fresh = tiny_model("llama", layers=5)
    mk.load_routers(fresh, tmp_path / "r")
    got = {i: (layer.mindskip.threshold, layer.mindskip.granularity) for i, layer in mindskip_layers(fresh).items()}
    assert got == {1: (0.3, "token"), 2: (0.7, "sequence"), 3: (0.55, "sequence")}
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits)


def test_paper_format_file_granularity(tmp_path):
    """Defect 11: a bare state-dict file keeps an existing patch's settings, defaults to the paper's sequence
    granularity, and takes an explicit granularity=."""
    from safetensors.torch import save_file

    path = tmp_path / "paper.safetensors"
    save_file({f"model.layers.{i}.router.weight": torch.randn(1, 48) for i in (1, 2)}, path)
    fresh = mk.load_routers(tiny_model("llama"), path)
    assert {layer.mindskip.granularity for layer in mindskip_layers(fresh).values()} == {"sequence"}
    patched = mk.apply_mindskip(tiny_model("llama"), threshold=0.4, granularity="token", backend="reference")
    mk.load_routers(patched, path)
    assert {(layer.mindskip.threshold, layer.mindskip.granularity, layer.mindskip.backend)
            for layer in mindskip_layers(patched).values()} == {(0.4, "token", "reference")}
    explicit = mk.load_routers(tiny_model("llama"), path, granularity="token")
    assert {layer.mindskip.granularity for layer in mindskip_layers(explicit).values()} == {"token"}
    with pytest.raises(ValueError, match="granularity must be one of"):
        mk.load_routers(tiny_model("llama"), path, granularity="layer")
    with pytest.raises(ValueError, match="backend must be one of"):
        mk.apply_mindskip(tiny_model("llama"), backend="cuda")


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_fused_norm_equals_the_models_own_norm(arch, granularity):
    """Inference fuses input_layernorm into the router and the gather; the routing and the logits equal the
    unfused path (the model's own RMSNorm module, then route and gather), padding and cached decode included."""
    model = tiny_model(arch)
    mk.apply_mindskip(model, layers=[0, 1, 2], granularity=granularity)
    randomize_routers(model)
    unfused = copy.deepcopy(model)
    for layer in mindskip_layers(unfused).values():
        layer.mindskip.fuse_norm = False
    ids, mask = _padded_batch([torch.randint(0, 97, (n,)) for n in (13, 6, 9)], 13)
    outs, plans, recs = [], [], []
    with torch.no_grad():
        for m in (model, unfused):
            with record_routing(m) as rec:
                outs.append(m.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True))
            plans.append([e.keep for e in rec.entries])
            recs.append(rec)
    assert torch.equal(outs[0].sequences, outs[1].sequences)
    for a, b in zip(outs[0].logits, outs[1].logits, strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    assert len(plans[0]) == len(plans[1]) and all(torch.equal(a, b) for a, b in zip(*plans, strict=True))
    assert any(0 < r < 1 for r in recs[0].keep_rates().values()) or granularity == "sequence"


@pytest.mark.parametrize("arch", list(ARCHS))
def test_the_test_models_have_random_norm_weights_and_biases(arch):
    """tests/models.py: no RMSNorm weight is all ones and no bias all zeros (transformers' initialisation, under
    which a router reading the wrong norm, or a norm's weight dropped, changes nothing), and a rebuild is equal."""
    model, again = tiny_model(arch), tiny_model(arch)
    norms = {n: p for n, p in model.named_parameters() if n.endswith("norm.weight")}
    biases = {n: p for n, p in model.named_parameters() if n.endswith(".bias")}
    expect = {"llama": 9, "mistral": 9, "qwen2": 9, "qwen3": 17}[arch]  # 2 per layer (+ q/k_norm), final norm
    assert len(norms) == expect and len(biases) == (12 if arch == "qwen2" else 0)
    assert not [n for n, p in norms.items() if torch.all(p == 1)]
    assert not [n for n, p in biases.items() if torch.all(p == 0)]
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values(),
                                                 strict=True))
