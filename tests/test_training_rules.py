"""Router-Tuning's training forwards on a tiny Llama, against independent recomputations with the model's own
HF attention module: the "every_token" rule (every token attends to the kept earlier tokens and itself, every
row gated) and the "paper" rule (only kept tokens attend and carry the LM gradient); the recording context."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.integrations.hf import mindskip_layers, record_routing
from tests.models import randomize_routers, tiny_model

ROUTED = 1


def independent_loss(model, ids: torch.Tensor, router_weight: torch.Tensor, rule: str) -> torch.Tensor:
    """The LM loss of one unpadded sequence with layer ROUTED routed by `router_weight` (token granularity,
    threshold 0.5) under `rule`, built from the dense model's modules: attention runs on explicit token subsets
    (the kept tokens for "paper"; for "every_token", each token i with the kept tokens before it)."""
    base = model.model
    h = base.embed_tokens(ids)
    n = ids.shape[1]
    pos = torch.arange(n).unsqueeze(0)
    for i, layer in enumerate(base.layers):
        if i != ROUTED:
            h = layer(h, attention_mask=None, position_ids=pos, position_embeddings=base.rotary_emb(h, pos))
            continue
        z = layer.input_layernorm(h)
        score = torch.sigmoid(z[0] @ router_weight[0]).float()  # computed in fp64 here, stored as fp32 (contract)
        keep = score >= 0.5
        gate = keep.float() + (score - score.detach())

        def attend(subset: list[int], z=z, layer=layer) -> torch.Tensor:
            idx = torch.tensor(subset)
            out, _ = layer.self_attn(z[:, idx], position_embeddings=base.rotary_emb(z, idx.unsqueeze(0)),
                                     attention_mask=None)
            return out[0]

        rows = []
        kept = [t for t in range(n) if keep[t]]
        kept_out = attend(kept) if kept else None
        for t in range(n):
            if rule == "paper":
                rows.append(gate[t] * kept_out[kept.index(t)] if keep[t] else torch.zeros_like(h[0, t]))
            else:
                rows.append(gate[t] * attend([j for j in kept if j < t] + [t])[-1])
        h = h + torch.stack(rows).unsqueeze(0)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    logits = model.lm_head(base.norm(h)).float()
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])


@pytest.mark.parametrize("rule", ["every_token", "paper"])
def test_training_forward_and_router_gradient_match_independent_recompute(rule):
    model = tiny_model("llama", seed=3).double()
    mk.apply_mindskip(model, layers=[ROUTED], backend="reference")
    randomize_routers(model, std=1.0)
    layer = mindskip_layers(model)[ROUTED]
    layer.mindskip.rule = rule
    layer.mindskip.fuse_norm = False  # the model's own RMSNorm module, as in the recomputation (fp64-exact)
    for name, p in model.named_parameters():
        p.requires_grad_(".router." in name)
    ids = torch.randint(0, 97, (1, 13))
    model.train()
    loss = model(ids, labels=ids).loss
    (grad,) = torch.autograd.grad(loss, layer.router.weight)
    weight = layer.router.weight.detach().clone().requires_grad_(True)
    expected = independent_loss(model, ids, weight, rule)
    (expected_grad,) = torch.autograd.grad(expected, weight)
    keep = torch.sigmoid(model.model.layers[ROUTED].input_layernorm(model.model.embed_tokens(ids))[0] @ weight[0])
    assert 0 < int((keep >= 0.5).sum()) < ids.shape[1], "the test needs mixed routing"
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-8, atol=1e-10)


def test_rules_differ_only_in_the_gradient_and_every_token_equals_inference():
    """Both rules give the inference forward's value; only "every_token" sends gradient to skipped tokens."""
    model = tiny_model("llama", seed=1).double()
    mk.apply_mindskip(model, backend="reference")
    randomize_routers(model, std=1.0)
    for layer in mindskip_layers(model).values():
        layer.mindskip.fuse_norm = False  # compare the two paths with one RMSNorm implementation
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    with torch.no_grad():
        inference = model(ids, attention_mask=mask, use_cache=False).logits
    grads = {}
    for rule in ("every_token", "paper"):
        for layer in mindskip_layers(model).values():
            layer.mindskip.rule = rule
            layer.router.weight.requires_grad_(True)
        model.train()
        out = model(ids, attention_mask=mask, labels=ids)
        real = mask.bool()
        torch.testing.assert_close(out.logits[real], inference[real], rtol=1e-10, atol=1e-10)
        grads[rule] = torch.autograd.grad(out.loss, [layer.router.weight for layer in mindskip_layers(model).values()])
        model.eval()
    assert any(not torch.allclose(a, b) for a, b in zip(grads["every_token"], grads["paper"], strict=True))


def test_record_routing_collects_decisions_and_differentiable_rates():
    model = tiny_model("llama")
    mk.apply_mindskip(model, backend="reference")
    randomize_routers(model)
    ids = torch.randint(0, 97, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    with record_routing(model) as outer:
        model(ids, attention_mask=mask, use_cache=False)
        with record_routing(model) as inner:
            model(ids[:1], use_cache=False)
    assert len(outer.entries) == 2 * len(inner.entries) == 4
    for e in outer.entries[:2]:
        assert torch.equal(e.real, mask.bool()) and not (e.keep & ~e.real).any() and e.keep_rate is None
    rates = outer.keep_rates()
    first = {e.layer_idx: e for e in outer.entries[:2]}
    second = {e.layer_idx: e for e in outer.entries[2:]}
    for i, rate in rates.items():
        kept = int(first[i].keep.sum()) + int(second[i].keep.sum())
        assert rate == pytest.approx(kept / (int(mask.sum()) + 9))
    assert outer.real_scores().numel() == 2 * (int(mask.sum()) + 9)
    model.train()
    with record_routing(model) as rec:
        model(ids, attention_mask=mask, labels=ids)
    assert rec.training_keep_rates().requires_grad and len(rec.training_keep_rates()) == 2
    model(ids, use_cache=False)  # outside any context: nothing recorded, nothing kept alive
    assert len(rec.entries) == 2
    with pytest.raises(ValueError, match="apply_mindskip"), record_routing(tiny_model("llama")):
        pass
