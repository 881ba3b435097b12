"""Defects found by trying bad inputs and random shapes against the public API (issue 12), one test each, on
every backend: the same error for the same bad input, zero-size inputs, and NaN in memory an op must not read."""

from __future__ import annotations

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.attention import MindSkipAttention
from mindskip_kernels.backends import compiled
from tests.harness import backend_params

BACKENDS = backend_params()

# ---- varlen_attention: one shared check of cu_seqlens / max_seqlen ------------------------------------------

# (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) on q/k/v of 6 rows, and the expected message
BAD_OFFSETS = {
    "q ends past the rows": ([0, 3, 8], [0, 3, 6], 5, 3, "cu_seqlens_q must end at 6 (rows of the packed tensor), "
                                                          "got 8"),
    "q ends short": ([0, 3, 5], [0, 3, 6], 3, 3, "cu_seqlens_q must end at 6 (rows of the packed tensor), got 5"),
    "k ends past the rows": ([0, 3, 6], [0, 3, 7], 3, 4, "cu_seqlens_k must end at most 6 (rows of the packed "
                                                          "tensor), got 7"),
    "negative": ([0, -1, 6], [0, 3, 6], 7, 3, "cu_seqlens_q must be non-decreasing from 0, got cu_seqlens_q[1] = -1"),
    "unsorted": ([0, 3, 6], [0, 4, 2], 3, 4, "cu_seqlens_k must be non-decreasing from 0, got cu_seqlens_k[2] = 2"),
    "nonzero start": ([1, 3, 6], [0, 3, 6], 3, 3,
                      "cu_seqlens_q must be non-decreasing from 0, got cu_seqlens_q[0] = 1"),
    "max_seqlen_q short": ([0, 3, 6], [0, 3, 6], 2, 3, "max_seqlen_q must be at least the longest sequence in "
                                                       "cu_seqlens_q (3), got 2"),
    "max_seqlen_k short": ([0, 1, 6], [0, 1, 6], 5, 4, "max_seqlen_k must be at least the longest sequence in "
                                                       "cu_seqlens_k (5), got 4"),
    "max_seqlen negative": ([0, 6], [0, 6], -1, 6, "max_seqlen_q must be a non-negative int, got -1"),
    "entries differ": ([0, 6], [0, 3, 6], 6, 3, "cu_seqlens_q and cu_seqlens_k must both have B + 1 >= 1 entries"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(BAD_OFFSETS))
def test_varlen_bad_offsets_raise_the_same_error(backend, case):
    cu_q, cu_k, max_q, max_k, message = BAD_OFFSETS[case]
    q = k = v = torch.randn(6, 2, 8)
    with pytest.raises(ValueError) as info:
        mk.varlen_attention(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k), max_q, max_k, backend=backend)
    assert message in str(info.value)


@pytest.mark.skipif(not compiled.available(), reason="mindskip_kernels._C not built")
@pytest.mark.parametrize("case", [c for c in BAD_OFFSETS if "max_seqlen" not in c])
def test_varlen_offsets_message_is_the_compiled_checks(case):
    """Called directly, the C++ op (which has no max_seqlen) says the same as the shared Python check."""
    cu_q, cu_k, _, _, message = BAD_OFFSETS[case]
    q = k = v = torch.randn(6, 2, 8)
    with pytest.raises(ValueError) as info:
        torch.ops.mindskip.varlen_attention(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k), True, 1.0,
                                            torch.empty_like(q))
    assert message in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_varlen_unused_key_rows_are_never_read(backend, causal):
    """Key/value rows past cu_seqlens_k[-1] are unused: NaN there must not reach the output."""
    lengths_q, lengths_k, spare = [3, 0, 5], [4, 2, 7], 5
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).int()
    q = torch.randn(sum(lengths_q), 4, 16)
    k, v = (torch.randn(sum(lengths_k) + spare, 2, 16) for _ in range(2))
    expect = mk.varlen_attention(q, k[:-spare], v[:-spare], cu_q, cu_k, 5, 7, causal=causal, backend="reference")
    k[-spare:], v[-spare:] = float("nan"), float("nan")
    out = mk.varlen_attention(q, k, v, cu_q, cu_k, 5, 7, causal=causal, backend=backend)
    torch.testing.assert_close(out, expect)


# ---- degenerate heads ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,message", [((2, 0, 8), r"key/value heads \(0\)"), ((2, 2, 0), "head dim >= 1")])
def test_varlen_degenerate_heads_raise(backend, heads, message):
    hq, hkv, dh = heads
    cu = torch.tensor([0, 4])
    with pytest.raises(ValueError, match=message):
        mk.varlen_attention(torch.randn(4, hq, dh), torch.randn(4, hkv, dh), torch.randn(4, hkv, dh), cu, cu, 4, 4,
                            backend=backend)


@pytest.mark.parametrize("args,kwargs,message", [
    ((32, 0), {}, "num_heads must be a positive int"),
    ((0, 4), {}, "hidden_size must be a positive int"),
    ((32, 4, 0), {}, "num_kv_heads must be a positive int"),
    ((21, 3), {}, "head_dim must be a positive even int"),  # head dim 7: RoPE rotates channel pairs
    ((30, 4), {}, "hidden_size \\(30\\) must be a multiple of num_heads"),
    ((32, 4), {"head_dim": -2}, "head_dim must be a positive even int"),
])
def test_mindskip_attention_bad_heads_raise_at_construction(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        MindSkipAttention(*args, **kwargs)


def test_functional_odd_head_dim_raises():
    x, w = torch.randn(1, 3, 21), torch.randn(21, 21)
    with pytest.raises(ValueError, match="head_dim must be a positive even int"):
        mk.mindskip_attention(x, torch.zeros(21), w, w, w, w, num_heads=3, num_kv_heads=3)


# ---- the sequence router excludes padding by selection --------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_sequence_router_ignores_non_finite_padding(backend, poison):
    z, w = torch.randn(2, 5, 8), torch.randn(8)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    expect = torch.sigmoid(torch.stack([z[0, 1:].mean(0), z[1, :3].mean(0)]) @ w)
    z[0, 0, 0] = z[1, 4, 3] = poison
    plan = mk.route(z, w, granularity="sequence", attention_mask=mask, backend=backend)
    torch.testing.assert_close(plan.scores, expect.unsqueeze(1).expand(2, 5))


# ---- zero-size inputs -----------------------------------------------------------------------------------------

ZERO_SHAPES = [(0, 5, 8), (2, 0, 8), (2, 5, 0), (0, 0, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", ZERO_SHAPES)
def test_zero_size_routing(backend, shape):
    b, n, d = shape
    x = torch.randn(shape)
    plan = mk.route(x, torch.randn(d), threshold=0.0, position_ids=torch.zeros(b, n, dtype=torch.long),
                    backend=backend)
    assert plan.scores.shape == (b, n) and plan.cu_seqlens.tolist() == [n * i for i in range(b + 1)]
    torch.testing.assert_close(plan.scores, torch.full((b, n), 0.5))  # sigmoid of an empty dot product
    packed = mk.gather(x, plan, backend=backend)
    assert packed.shape == (b * n, d)
    out = mk.scatter_add(x, torch.randn(b * n, d), plan, torch.rand(b * n), backend=backend)
    assert out.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths_q,lengths_k", [([], []), ([0, 0], [0, 0]), ([3, 1], [0, 0])])
def test_zero_size_varlen_attention(backend, lengths_q, lengths_k):
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).int()
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).int()
    q = torch.randn(sum(lengths_q), 4, 16)
    k = v = torch.randn(sum(lengths_k), 2, 16)
    out = mk.varlen_attention(q, k, v, cu_q, cu_k, max(lengths_q, default=0), 0, backend=backend)
    assert torch.equal(out, torch.zeros_like(q)), "a query that sees no key gets zeros"


# ---- `mindskip tune --model DIR` where DIR has no tokenizer -----------------------------------------------------

def _word_tokenizer():
    """A small real tokenizer (word level, built here: no download)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<unk>", "the", "fox", "dog"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                                unk_token="<unk>")


def test_model_folder_without_tokenizer(tmp_path, capsys):
    """The error names DIR and says how to give a tokenizer; --tokenizer DIR loads one from elsewhere."""
    import transformers

    from mindskip_kernels.cli import main
    from mindskip_kernels.tuning import load_model

    config = transformers.LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    data = tmp_path / "d.txt"
    data.write_text("the fox the dog " * 8)
    args = ["tune", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "out"),
            "--steps", "1", "--layers", "1", "--backend", "reference"]
    with pytest.raises(ValueError, match=f"{tmp_path / 'model'} has no tokenizer .*--tokenizer"):
        main(args)
    _word_tokenizer().save_pretrained(tmp_path / "tok")
    model, tok = load_model(tmp_path / "model", tokenizer=tmp_path / "tok")
    assert tok("the fox")["input_ids"] == [3, 4] and model.config.vocab_size == 6
    main(args + ["--tokenizer", str(tmp_path / "tok")])
    assert (tmp_path / "out" / "mindskip.json").is_file()
