"""Generation with MindSkipCache: cached decoding must equal full recomputation (routing and attention are
causal), sequence granularity must reuse the prefill decision, and the cache must hold only kept K/V."""

from __future__ import annotations

import math

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.backends import available
from mindskip_kernels.integrations.hf import TARGETS, new_cache, record_routing
from mindskip_kernels.integrations.hf.cache import MindSkipCache, RoutedKVLayer
from mindskip_kernels.integrations.hf.forward import decode_projection
from mindskip_kernels.kv_pool import PoolFullError
from tests.harness import backend_params
from tests.models import (
    ARCHS,
    NEW,
    greedy,
    left_padded_prompts,
    randomize_routers,
    reference_sequence_generation,
    run_cache,
    tiny_model,
)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_granularity_cached_equals_recompute(arch, seed):
    model = tiny_model(arch)
    mk.apply_mindskip(model, layers=[0, 2])
    torch.manual_seed(seed)
    randomize_routers(model)
    ids, mask = left_padded_prompts([9, 5, 2], seed)
    with torch.no_grad(), record_routing(model) as rec:
        model(ids, attention_mask=mask, use_cache=False)
    assert any(0.0 < r < 1.0 for r in rec.keep_rates().values()), "routing of the prompts should be mixed"
    cached = greedy(model, ids, mask, use_cache=True)
    torch.testing.assert_close(cached, greedy(model, ids, mask, use_cache=False), rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("seed", [0, 1])
def test_sequence_granularity_reuses_prefill_decision(arch, seed):
    model = tiny_model(arch)
    mk.apply_mindskip(model, layers=[0, 1, 2], granularity="sequence")
    torch.manual_seed(seed)
    randomize_routers(model, std=4.0)
    ids, mask = left_padded_prompts([8, 6, 3], seed)
    cached = greedy(model, ids, mask, use_cache=True)
    for b in range(ids.shape[0]):
        expect = reference_sequence_generation(model, ids[b][mask[b].bool()])
        assert torch.equal(cached[b, ids.shape[1] :], expect), f"sequence {b}"


def test_all_kept_routers_give_dense_generations():
    dense = tiny_model("mistral")
    model = tiny_model("mistral")
    mk.apply_mindskip(model, threshold=0.0)
    ids, mask = left_padded_prompts([7, 4, 6])
    torch.testing.assert_close(greedy(model, ids, mask, True), greedy(dense, ids, mask, True), rtol=0, atol=0)


@pytest.mark.parametrize("backend", backend_params("cpu"))
@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("host_compact", [True, False], ids=["cpu-path", "device-path"])
def test_cached_equals_recompute_every_backend(backend, granularity, host_compact, monkeypatch):
    """Both granularities, batch 3 with left padding, through each backend's paged kernels; both decode paths
    (the CPU's host compaction of kept rows, and the fixed-shape device path accelerators run)."""
    if backend == "triton" and host_compact:
        pytest.skip("Triton runs on CUDA, where the device path runs (the interpreter is slow: test that one)")
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[0, 1, 2], granularity=granularity, backend=backend, host_compact=host_compact)
    torch.manual_seed(5)
    randomize_routers(model, std=4.0)
    ids, mask = left_padded_prompts([9, 5, 2], 5)
    cached = greedy(model, ids, mask, use_cache=True)
    if granularity == "token":
        torch.testing.assert_close(cached, greedy(model, ids, mask, use_cache=False), rtol=0, atol=0)
        return
    for b in range(ids.shape[0]):
        expect = reference_sequence_generation(model, ids[b][mask[b].bool()])
        assert torch.equal(cached[b, ids.shape[1] :], expect), f"sequence {b}"


@pytest.mark.parametrize("granularity", ["token", "sequence"])
@pytest.mark.parametrize("target", TARGETS)
def test_batch_one_device_path_projects_through_the_predicated_gemv(granularity, target, monkeypatch):
    """Batch 1 on the device path with Triton: the routed sub-layer's projections of every decode step (q/k/v/o,
    gate/up/down) go through the predicated GEMV (a skipped step reads no weight), and cached generation still
    equals recomputation."""
    if not available()["triton"]:
        pytest.skip("backend 'triton' not available in this install")
    from mindskip_kernels.backends import triton as tri

    calls = []
    real = tri.predicated_linear
    monkeypatch.setattr(tri, "predicated_linear", lambda *a: calls.append(bool(a[3].all())) or real(*a))
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[0, 2], granularity=granularity, backend="triton", target=target,
                      host_compact=False)
    torch.manual_seed(3)
    randomize_routers(model, std=4.0)
    ids = torch.randint(1, 97, (1, 7))
    mask = torch.ones_like(ids)
    cached = greedy(model, ids, mask, use_cache=True)
    per_layer = {"attention": 4, "mlp": 3, "block": 7}[target]
    assert len(calls) == per_layer * 2 * (NEW - 1), "every projection of both routed layers in every decode step"
    if granularity == "token":
        assert any(calls) and not all(calls), "decode steps should both keep and skip"
        torch.testing.assert_close(cached, greedy(model, ids, mask, use_cache=False), rtol=0, atol=0)
    else:
        assert torch.equal(cached[0, 7:], reference_sequence_generation(model, ids[0]))


def test_predicated_projection_runs_a_wrapped_linear_through_its_own_forward():
    """LoRA / quantized linears subclass or wrap nn.Linear: the GEMV (which reads .weight) is for plain ones."""
    if not available()["triton"]:
        pytest.skip("backend 'triton' not available in this install")

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    keep = torch.tensor([True])
    project = decode_projection("triton", keep, torch.zeros(1, 8))
    rows = torch.randn(1, 8)
    plain, wrapped = torch.nn.Linear(8, 4), Doubled(8, 4)
    with torch.no_grad():
        wrapped.load_state_dict(plain.state_dict())
        torch.testing.assert_close(project(wrapped, rows), wrapped(rows))
        torch.testing.assert_close(project(plain, rows), plain(rows))


def test_fixed_pool_decodes_without_reading_the_device_and_skips_take_no_slot():
    """A pool sized up front (num_blocks): decode steps never read lengths back; skipped tokens take no slot,
    so the stored rows are exactly the kept ones; a pool too small for the kept rows raises."""
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[0, 1, 2])
    randomize_routers(model)
    ids, mask = left_padded_prompts([12, 9, 5])
    cache = run_cache(model, ids, mask, cache=new_cache(model, block_size=4, num_blocks=40, max_length=64))
    for i in (0, 1, 2):
        layer = cache.layers[i]
        assert layer.pool.syncs == 0, "a fixed pool with reserved tables needs no host read"
        kept = layer.lengths.tolist()
        assert layer.blocks_used == sum(math.ceil(n / 4) for n in kept)
        assert sum(kept) < mask.sum() + 3 * 6
    with pytest.raises(PoolFullError, match="num_blocks"):
        run_cache(model, ids, mask, cache=new_cache(model, block_size=4, num_blocks=2))


def test_cache_holds_only_kept_tokens_within_block_rounding():
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[0, 1, 2])
    randomize_routers(model)
    ids, mask = left_padded_prompts([12, 9, 5])
    cache = run_cache(model, ids, mask)
    dense_layer = cache.layers[3]
    per_token = 2 * dense_layer.keys.shape[1] * dense_layer.keys.shape[3] * dense_layer.keys.element_size()
    assert dense_layer.keys.shape[2] == cache.routing_state(0).seen == ids.shape[1] + 6
    for i in (0, 1, 2):
        layer = cache.layers[i]
        assert isinstance(layer, RoutedKVLayer)
        kept = layer.lengths.tolist()
        assert 0 < sum(kept) < mask.sum() + 3 * 6, f"layer {i} should have skipped some tokens: {kept}"
        assert layer.nbytes() == sum(math.ceil(n / 4) * 4 for n in kept) * per_token
        assert abs(layer.nbytes() - sum(kept) * per_token) < 3 * 4 * per_token  # within one block per sequence
    assert cache.nbytes() < cache.dense_nbytes()


def test_sequence_skip_never_allocates():
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[0, 1, 2], granularity="sequence", threshold=1.0)  # every sequence skips
    ids, mask = left_padded_prompts([6, 4])
    cache = run_cache(model, ids, mask)
    for i in (0, 1, 2):
        assert cache.layers[i].nbytes() == 0 and cache.layers[i].blocks_used == 0
        assert cache.routing_state(i).decision.tolist() == [False, False]


def test_beam_search_refused_and_sampling_runs():
    model = tiny_model("qwen2")
    mk.apply_mindskip(model)
    ids, mask = left_padded_prompts([5, 3])
    with torch.no_grad(), pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=True, top_k=5, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 4)


def test_plain_dynamic_cache_refused():
    from transformers import DynamicCache

    model = tiny_model("llama")
    mk.apply_mindskip(model)
    with torch.no_grad(), pytest.raises(TypeError, match="MindSkipCache"):
        model(torch.randint(1, 97, (1, 4)), cache=DynamicCache(config=model.config), use_cache=True)
    assert isinstance(new_cache(model), MindSkipCache), "the cache the error asks for is the one new_cache gives"


@pytest.mark.parametrize("target", TARGETS)
def test_static_unrouted_layers_decode_like_dynamic(target, monkeypatch):
    """new_cache(static=True) (what a whole-step CUDA graph needs: static unrouted layers, and the MLP target's
    attention layers, a fixed pool) decodes exactly like the default cache, on the device path."""
    model = tiny_model("llama")
    mk.apply_mindskip(model, layers=[1, 2], target=target, host_compact=False)
    randomize_routers(model)
    ids = torch.randint(1, 97, (2, 7))
    logits = []
    for cache in (new_cache(model), new_cache(model, block_size=4, num_blocks=16, max_length=32, static=True)):
        with torch.no_grad():
            out = model(ids, cache=cache, use_cache=True)
            steps = [out.logits[:, -1]]
            for t in range(5):
                nxt = steps[-1].argmax(-1, keepdim=True)
                out = model(nxt, cache=cache, use_cache=True, position_ids=torch.full((2, 1), 7 + t))
                steps.append(out.logits[:, -1])
        logits.append(torch.stack(steps))
    torch.testing.assert_close(logits[1], logits[0])
