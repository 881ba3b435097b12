"""The reference backend against naive per-token loops written independently here, in fp64."""

from __future__ import annotations

import math

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.attention import MindSkipAttention


def naive_attention(q, k, v, lengths_q, lengths_k, causal, scale):
    """One query at a time: softmax over the visible keys of its own sequence."""
    out = torch.zeros_like(q)
    group = q.shape[1] // k.shape[1]
    sq = sk = 0
    for lq, lk in zip(lengths_q, lengths_k, strict=True):
        for i in range(lq):
            last = i + lk - lq if causal else lk - 1
            for h in range(q.shape[1]):
                keys = [sk + j for j in range(lk) if j <= last]
                if not keys:
                    continue
                logits = torch.stack([q[sq + i, h] @ k[j, h // group] * scale for j in keys])
                p = torch.softmax(logits, 0)
                out[sq + i, h] = sum(p[n] * v[j, h // group] for n, j in enumerate(keys))
        sq, sk = sq + lq, sk + lk
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_attention_matches_loop(causal):
    lengths_q, lengths_k = [3, 0, 7, 1], [3, 0, 7, 4]
    q = torch.randn(sum(lengths_q), 6, 8, dtype=torch.float64)
    k = torch.randn(sum(lengths_k), 2, 8, dtype=torch.float64)
    v = torch.randn(sum(lengths_k), 2, 8, dtype=torch.float64)
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).int()
    out = mk.varlen_attention(q, k, v, cu_q, cu_k, 7, 7, causal=causal, softmax_scale=0.3, backend="reference")
    torch.testing.assert_close(out, naive_attention(q, k, v, lengths_q, lengths_k, causal, 0.3))


def naive_mindskip(layer: MindSkipAttention, x, mask, positions, granularity, threshold):
    """MindSkip self-attention token by token: route, then attend among kept tokens at original positions."""
    b, n, d = x.shape
    hq, hkv, dh = layer.num_heads, layer.num_kv_heads, layer.head_dim
    w = layer.router.weight[0]
    out = torch.zeros_like(x)
    for s in range(b):
        real = [t for t in range(n) if mask[s, t]]
        if granularity == "token":
            score = {t: torch.sigmoid(x[s, t] @ w) for t in real}
        else:
            mean = sum(x[s, t] for t in real) / max(len(real), 1)
            score = {t: torch.sigmoid(mean @ w) for t in real}
        kept = [t for t in real if score[t] >= threshold]

        def rot(vec, pos):
            half = dh // 2
            res = vec.clone()
            for i in range(half):
                angle = pos * 10000.0 ** (-2 * i / dh)
                c, sn = math.cos(angle), math.sin(angle)
                res[i] = vec[i] * c - vec[i + half] * sn
                res[i + half] = vec[i + half] * c + vec[i] * sn
            return res

        qs = {t: layer.q_proj(x[s, t]).view(hq, dh) for t in kept}
        ks = {t: layer.k_proj(x[s, t]).view(hkv, dh) for t in kept}
        vs = {t: layer.v_proj(x[s, t]).view(hkv, dh) for t in kept}
        for t in kept:
            heads = []
            for h in range(hq):
                qv = rot(qs[t][h], int(positions[s, t]))
                visible = [u for u in kept if u <= t]
                logits = torch.stack([qv @ rot(ks[u][h // (hq // hkv)], int(positions[s, u])) for u in visible])
                p = torch.softmax(logits / math.sqrt(dh), 0)
                heads.append(sum(p[i] * vs[u][h // (hq // hkv)] for i, u in enumerate(visible)))
            out[s, t] = layer.o_proj(torch.cat(heads))
    return out


@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_mindskip_attention_matches_loop(granularity):
    layer = MindSkipAttention(24, num_heads=6, num_kv_heads=2, granularity=granularity,
                              backend="reference").double().eval()
    torch.nn.init.normal_(layer.router.weight, std=0.5)
    x = torch.randn(3, 9, 24, dtype=torch.float64)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    positions = (mask.cumsum(1) - 1).clamp_min(0)
    with torch.no_grad():
        out = layer(x, position_ids=positions, attention_mask=mask)
        expect = naive_mindskip(layer, x, mask, positions, granularity, threshold=0.5)
        residual = torch.randn_like(x)
        fused = layer(x, residual=residual, position_ids=positions, attention_mask=mask)
    keep = out.abs().sum(-1) > 0
    assert 0 < keep.sum() < mask.sum(), "the router should keep some tokens and skip others"
    torch.testing.assert_close(out, expect)
    assert torch.equal(fused[~keep], residual[~keep]), "skipped rows must be bit-identical to the residual"
    torch.testing.assert_close(fused, residual + out)
