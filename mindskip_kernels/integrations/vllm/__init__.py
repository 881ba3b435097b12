"""vLLM integration: an out-of-tree model plugin serving MindSkip-routed Llama, Mistral, Qwen2 and Qwen3 models.

`mindskip export-vllm --model M --routers R --out DIR` writes a model folder whose config.json names the routed
architecture (`MindSkip<Base>ForCausalLM`) and whose `mindskip/` subfolder holds the routers as `mindskip tune`
wrote them; `vllm serve DIR` (or `LLM(DIR)`) then runs it, the classes registered by the `vllm.general_plugins`
entry point `register` (installed with this package). Supported: token granularity, kv="all", the attention and
block targets, with or without the skipped-token adapter. Everything else is refused before the engine starts.

Only model.py imports vLLM (and only when vLLM loads the plugin); routers.py and export.py run without it.
"""

from mindskip_kernels.integrations.vllm.routers import ARCHITECTURES, CONFIG_KEY, RoutedLayerSpec, read_routers


def register() -> None:
    """The `vllm.general_plugins` entry point: register the routed architectures with vLLM's ModelRegistry
    (lazily, by "module:Class" name, so vLLM imports model.py only when such a model is served)."""
    from vllm import ModelRegistry

    for arch in ARCHITECTURES.values():
        if arch not in ModelRegistry.get_supported_archs():
            ModelRegistry.register_model(arch, f"mindskip_kernels.integrations.vllm.model:{arch}")


__all__ = ["ARCHITECTURES", "CONFIG_KEY", "RoutedLayerSpec", "read_routers", "register"]
