"""Model introspection: which transformers models MindSkip supports, their decoder layers, and which layers
route (the paper's choice or the user's)."""

from __future__ import annotations

from torch import nn

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")


def base_model(model: nn.Module) -> nn.Module:
    """The base model (the module with `.layers`) of a causal LM, or the model itself if it is one."""
    base = getattr(model, "model", model)
    if not hasattr(base, "layers"):
        raise TypeError(f"model must be a transformers causal LM or base model with `.layers`, got "
                        f"{type(model).__name__}")
    return base


def model_type(model: nn.Module) -> str:
    """config.model_type (the class name for a model without a config)."""
    return getattr(getattr(model, "config", None), "model_type", type(model).__name__)


def check_supported(model: nn.Module) -> None:
    """Refuse architectures whose decoder-layer layout MindSkip does not know (ValueError naming them)."""
    kind = model_type(model)
    if kind not in SUPPORTED:
        raise ValueError(f"model must be one of {SUPPORTED} (config.model_type), got {kind!r}")


def paper_layers(num_layers: int, n: int | None = None) -> list[int]:
    """The paper's choice: the last n layers before the final one (default n = half the layers)."""
    n = num_layers // 2 if n is None else n
    if not 0 <= n <= num_layers - 1:
        raise ValueError(f"layers must be between 0 and {num_layers - 1} (the final layer never routes), got {n}")
    return list(range(num_layers - 1 - n, num_layers - 1))


def choose_layers(num_layers: int, layers: int | list[int] | None) -> list[int]:
    """Sorted layer indices from `layers`: None = the paper's choice, an int n = the last n before the final
    layer, or a list of indices (the final layer never routes)."""
    if layers is None or isinstance(layers, int):
        return paper_layers(num_layers, layers)
    chosen = sorted(set(int(i) for i in layers))
    bad = [i for i in chosen if not 0 <= i < num_layers - 1]
    if bad:
        raise ValueError(f"layers must be indices in [0, {num_layers - 2}] (the final layer never routes), "
                         f"got {bad}")
    return chosen


def mindskip_layers(model: nn.Module) -> dict[int, nn.Module]:
    """The patched decoder layers of `model`, by layer index."""
    return {i: layer for i, layer in enumerate(base_model(model).layers) if hasattr(layer, "mindskip")}
