"""A routed decode step captured in a CUDA graph: one routed decoder layer of a patched tiny Llama (router flag,
paged append, paged decode attention, predicated add, MLP) is captured once with a fixed-size pool, replayed
for several tokens with new inputs copied into its static buffers, and compared with the same steps run
eagerly on a twin cache (outputs and cache state). The Triton cases run when `pytest tests/gpu` runs on
its own (see cuda_harness).

(The whole model's step is not captured here: transformers' DynamicLayer of the unrouted layers grows by
concatenation; a static cache for those layers is what `benchmarks/gpu_check.sh` uses.)"""

from __future__ import annotations

import copy

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.integrations.hf import new_cache, record_routing
from tests.gpu.cuda_harness import (
    DEV,
    cuda_backends,
    kernels,
    needs_cuda,
)
from tests.models import randomize_routers, tiny_model

pytestmark = [pytest.mark.gpu, needs_cuda]
BACKENDS = cuda_backends()
STEPS = 6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("granularity", "kv"), [("token", "kept"), ("sequence", "kept"), ("token", "all")])
@pytest.mark.parametrize("target", ["attention", "block"])  # (the MLP target's attention uses a DynamicLayer)
@pytest.mark.parametrize("batch", [4, 1])  # batch 1: the projections (and the block's MLP) as predicated GEMVs
def test_routed_decode_layer_graph_replay_equals_eager(backend, granularity, kv, target, batch):
    """kv="all": every row appends its K/V in the captured step, only kept rows attend (skipped rows' q/o
    projections predicated off at batch 1)."""
    kernels(backend, "paged_decode_attention", torch.float32)
    model = tiny_model("llama").to(DEV)
    mk.apply_mindskip(model, layers=[0, 1, 2], granularity=granularity, target=target, kv=kv)  # prefill: "auto"
    torch.manual_seed(4)
    randomize_routers(model, std=4.0)
    ids = torch.randint(1, 97, (batch, 11), device=DEV)
    cache = new_cache(model, block_size=4, num_blocks=64, max_length=64)  # fixed pool: no reallocation
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)
    layer = model.model.layers[1]
    layer.mindskip.backend = backend  # the decode steps run the backend under test
    model.model._mindskip_state.padding_mask = None  # no padding in this batch
    eager_cache, warm_cache = copy.deepcopy(cache), copy.deepcopy(cache)

    h = torch.randn(batch, 1, 48, device=DEV)
    pos = torch.full((batch, 1), 11, device=DEV)
    cos, sin = model.model.rotary_emb(h, pos)

    def step(c):
        return layer(h, position_ids=pos, cache=c, use_cache=True, position_embeddings=(cos, sin))

    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(warm_cache)  # warm-up (kernel compilation, cuBLAS handles) on a throwaway cache
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step(cache)
        kept_any = False
        for t in range(STEPS):
            h.copy_(torch.randn(batch, 1, 48, device=DEV))
            pos.fill_(11 + t)
            new_cos, new_sin = model.model.rotary_emb(h, pos)
            cos.copy_(new_cos)
            sin.copy_(new_sin)
            graph.replay()
            with record_routing(model) as rec:
                expect = step(eager_cache)
            torch.testing.assert_close(out, expect, msg=f"step {t}")
            kept_any |= bool(rec.entries[0].keep.any())
    routed, twin = cache.layers[1], eager_cache.layers[1]
    assert torch.equal(routed.lengths, twin.lengths) and torch.equal(routed.block_table, twin.block_table)
    assert torch.equal(routed.pool.next_block, twin.pool.next_block)
    assert kept_any or granularity == "sequence", "token routing should keep some decode rows"
