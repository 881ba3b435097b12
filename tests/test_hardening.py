"""Defects found by trying bad inputs and random shapes against the public API (issue 12), one test each, on
every backend: the same error for the same bad input, zero-size inputs, and NaN in memory an op must not read."""

from __future__ import annotations

import re

import pytest
import torch

import mindskip_kernels as mk
from mindskip_kernels.attention import MindSkipAttention
from mindskip_kernels.backends import compiled
from tests.harness import assert_within_rule, backend_params

BACKENDS = backend_params()

# ---- the backend contract (backends/__init__.py) is what the modules do -----------------------------------------

@pytest.mark.parametrize("name", ["reference", "compiled", "triton"])
def test_backend_contract_table_is_true(name):
    import importlib

    from mindskip_kernels.backends import CONTRACT, available

    if not available()[name]:
        pytest.skip(f"backend {name!r} not available here")
    mod = importlib.import_module(f"mindskip_kernels.backends.{name}")
    listed = {op for op, row in CONTRACT.items() if name in row}
    claimed = {op for op in CONTRACT if mod.supports(op, torch.device("cuda"), torch.float32)
               or mod.supports(op, torch.device("cpu"), torch.float32)}
    if name == "compiled" and not compiled.build_info().get("cuda"):
        listed = {op for op in listed if "cpu" in CONTRACT[op][name][0]}
    assert claimed == listed
    for op in listed:
        devices, backward = CONTRACT[op][name]
        assert (op in getattr(mod, "DIFFERENTIABLE", ())) == backward, op
        assert callable(getattr(mod, op.removeprefix("paged_"))), op
        if name == "compiled":
            assert mod.supports(op, torch.device("cpu"), torch.float16) == ("cpu" in devices), op
        if "any" in devices:
            assert mod.supports(op, torch.device("meta"), torch.float64), op


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


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_head_dim_above_the_kernels_limit(backend):
    """Head dim 264 > 256: the kernel backends say so (the same message), auto and the reference compute it."""
    q, k, v = (torch.randn(5, 2, 264) for _ in range(3))
    cu = torch.tensor([0, 2, 5])
    expect = mk.varlen_attention(q, k, v, cu, cu, 3, 3, backend="reference")
    torch.testing.assert_close(mk.varlen_attention(q, k, v, cu, cu, 3, 3, backend="auto"), expect)
    if backend != "reference":
        with pytest.raises(ValueError, match=f"backend '{backend}' supports head dims up to 256 for "
                                             f"varlen_attention, got 264"):
            mk.varlen_attention(q, k, v, cu, cu, 3, 3, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", ["x", float("nan"), float("inf"), True])
def test_varlen_bad_softmax_scale(backend, scale):
    q = torch.randn(4, 2, 8)
    cu = torch.tensor([0, 4])
    with pytest.raises(ValueError, match="softmax_scale must be a finite number"):
        mk.varlen_attention(q, q, q, cu, cu, 4, 4, softmax_scale=scale, backend=backend)


def test_functional_weight_shapes_and_plan_type():
    x, w = torch.randn(1, 3, 16), torch.randn(16, 16)
    with pytest.raises(ValueError, match=r"k_weight must have shape \(8, 16\)"):
        mk.mindskip_attention(x, torch.zeros(16), w, torch.randn(5, 16), w, w, num_heads=4, num_kv_heads=2)
    with pytest.raises(ValueError, match=r"o_weight must have shape \(16, 16\)"):
        mk.mindskip_attention(x, torch.zeros(16), w, w, w, torch.randn(16, 8), num_heads=4, num_kv_heads=4)
    with pytest.raises(ValueError, match="backend must be one of"):
        MindSkipAttention(16, 4, backend="gpu")
    with pytest.raises(TypeError, match="plan must be a RoutingPlan"):
        mk.gather(x, "plan")


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
@pytest.mark.parametrize("fused_norm", [False, True])
def test_zero_size_routing(backend, shape, fused_norm):
    b, n, d = shape
    x = torch.randn(shape)
    norm = (torch.rand(d), 1e-6) if fused_norm else None
    plan = mk.route(x, torch.randn(d), threshold=0.0, position_ids=torch.zeros(b, n, dtype=torch.long), norm=norm,
                    backend=backend)
    assert plan.scores.shape == (b, n) and plan.cu_seqlens.tolist() == [n * i for i in range(b + 1)]
    torch.testing.assert_close(plan.scores, torch.full((b, n), 0.5))  # sigmoid of an empty dot product
    packed = mk.gather(x, plan, norm=norm, backend=backend)
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


# ---- RMSNorm fused into the router and the gather (route(norm=), gather(norm=)) --------------------------------

def test_reference_rms_norm_is_transformers():
    """The reference norm is bit-identical to the RMSNorm of the models the HF integration patches."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from mindskip_kernels.backends.reference import rms_norm

    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        ln = LlamaRMSNorm(40, eps=1e-5).to(dtype)
        torch.nn.init.normal_(ln.weight, 1.0, 0.2)
        x = (3 * torch.randn(2, 7, 40)).to(dtype)
        assert torch.equal(rms_norm(x, ln.weight, ln.variance_epsilon), ln(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1, 8), (3, 97, 40)])
@pytest.mark.parametrize("granularity", ["token", "sequence"])
def test_fused_norm_route_and_gather(backend, dtype, shape, granularity):
    """route/gather with norm= against RMSNorm then route/gather, in fp64 (the tolerance rule), with NaN in the
    padding rows of x (never read into a score or a packed row)."""
    from mindskip_kernels.backends.reference import rms_norm

    b, n, d = shape
    x = (3 * torch.randn(shape)).to(dtype)
    gamma, w = (1 + 0.1 * torch.randn(d)).to(dtype), (torch.randn(d) / d**0.5).to(dtype)
    mask = torch.ones(b, n, dtype=torch.long)
    if n > 1:
        mask[0, : n // 3] = 0
        x[0, 0] = float("nan")
    kwargs = dict(granularity=granularity, attention_mask=mask)
    plan = mk.route(x, w, norm=(gamma, 1e-5), backend=backend, **kwargs)
    low = mk.route(rms_norm(x, gamma, 1e-5), w, backend="reference", **kwargs)
    z64 = rms_norm(x.double(), gamma.double(), 1e-5)
    truth = mk.route(z64, w.double(), backend="reference", **kwargs)
    real = mask.bool()
    assert_within_rule(plan.scores[real], low.scores[real], truth.scores[real], "scores")
    clear = (truth.scores - 0.5).abs() > 1e-2
    assert torch.equal(plan.keep[clear], truth.keep[clear])
    packed = mk.gather(x, truth, norm=(gamma, 1e-5), backend=backend)
    assert packed.dtype == dtype
    assert_within_rule(packed, mk.gather(rms_norm(x, gamma, 1e-5), truth, backend="reference"),
                       mk.gather(z64, truth, backend="reference"), "gather_norm")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_norm_bad_input(backend):
    x, w, plan = torch.randn(1, 4, 8), torch.randn(8), None
    with pytest.raises(ValueError, match=r"norm weight must have shape \(8,\)"):
        mk.route(x, w, norm=(torch.ones(7), 1e-6), backend=backend)
    with pytest.raises(ValueError, match="norm eps must be a number >= 0"):
        mk.route(x, w, norm=(torch.ones(8), -1.0), backend=backend)
    with pytest.raises(TypeError, match="norm must be a \\(weight, eps\\) tuple"):
        mk.route(x, w, norm=torch.ones(8), backend=backend)
    plan = mk.route(x, w, backend=backend)
    with pytest.raises(TypeError, match="norm weight must have dtype"):
        mk.gather(x, plan, norm=(torch.ones(8, dtype=torch.int32), 1e-6), backend=backend)


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
    from mindskip_kernels.integrations.hf import load_model

    config = transformers.LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "model")
    data = tmp_path / "d.txt"
    data.write_text("the fox the dog " * 8)
    args = ["tune", "--model", str(tmp_path / "model"), "--data", str(data), "--out", str(tmp_path / "out"),
            "--steps", "1", "--layers", "1", "--backend", "reference"]
    with pytest.raises(SystemExit, match="2"):  # a usage error: one line on stderr (tests/test_cli_errors.py)
        main(args)
    assert re.search(f"mindskip tune: error: {re.escape(str(tmp_path / 'model'))} has no tokenizer .*--tokenizer",
                     capsys.readouterr().err)
    _word_tokenizer().save_pretrained(tmp_path / "tok")
    model, tok = load_model(tmp_path / "model", tokenizer=tmp_path / "tok")
    assert tok("the fox")["input_ids"] == [3, 4] and model.config.vocab_size == 6
    main(args + ["--tokenizer", str(tmp_path / "tok")])
    assert (tmp_path / "out" / "mindskip.json").is_file()


@pytest.mark.parametrize("call", [
    lambda: mk.decode_attention(torch.randn(1, 2, 0), torch.randn(1, 3, 1, 0), torch.randn(1, 3, 1, 0),
                                torch.tensor([2])),
    lambda: mk.keep_masked_attention(torch.randn(1, 2, 3, 0), torch.randn(1, 1, 3, 0), torch.randn(1, 1, 3, 0),
                                     torch.ones(1, 3, dtype=torch.bool)),
], ids=["decode", "keep_masked"])
def test_cache_and_training_attention_reject_head_dim_zero(call):
    with pytest.raises(ValueError, match="head dim >= 1"):
        call()


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), "0.1", True])
def test_cache_and_training_attention_check_softmax_scale(scale):
    q, kv = torch.randn(1, 2, 8), torch.randn(1, 3, 1, 8)
    with pytest.raises(ValueError, match="softmax_scale must be"):
        mk.decode_attention(q, kv, kv, torch.tensor([2]), softmax_scale=scale)
    qb, kb = torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="softmax_scale must be"):
        mk.keep_masked_attention(qb, kb, kb, torch.ones(1, 3, dtype=torch.bool), softmax_scale=scale)


@pytest.mark.parametrize("backend", backend_params("cpu"))
def test_compact_checks_its_arguments_and_matches_route(backend):
    keep = torch.tensor([[True, False, True], [False, False, True]])
    positions = torch.arange(3).expand(2, 3)
    indices, cu, kept_positions, max_seqlen = mk.compact(keep, positions, backend=backend)
    assert indices.tolist() == [0, 2, 5] and cu.tolist() == [0, 2, 3] and kept_positions.tolist() == [0, 2, 2]
    assert max_seqlen == 2
    with pytest.raises(TypeError, match="keep must have dtype"):
        mk.compact(keep.int(), positions, backend=backend)
    with pytest.raises(ValueError, match="positions must have shape"):
        mk.compact(keep, positions[:, :2], backend=backend)


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_sliding_window_longer_than_the_window_is_refused(arch):
    """Mistral's attention reads its window from the config, Qwen2's holds its layer's: either way a routed layer
    refuses a sequence longer than the window (kept-only attention does not apply it) and runs one that fits."""
    import transformers

    from tests.models import ARCHS

    config_cls, model_cls = ARCHS[arch]
    extra = {"use_sliding_window": True, "max_window_layers": 0} if arch == "qwen2" else {}
    config = config_cls(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=6, num_key_value_heads=2, head_dim=8, sliding_window=8,
                        attn_implementation="sdpa", **extra)
    model = mk.apply_mindskip(model_cls(config).eval(), layers=[0])
    assert isinstance(model, transformers.PreTrainedModel)
    with torch.no_grad():
        model(torch.randint(0, 97, (1, 8)), use_cache=False)
        with pytest.raises(NotImplementedError, match=r"sliding-window attention \(window 8\)"):
            model(torch.randint(0, 97, (1, 12)), use_cache=False)
