"""Hugging Face transformers integration: MindSkip routers on the decoder layers of Llama, Mistral, Qwen2 and
Qwen3 causal LMs.

`apply_mindskip` patches chosen decoder layer *instances* (two models in one process don't interfere): each
gets a zero-initialised `router` (`nn.Linear(hidden, 1, bias=False)`, state-dict key
`model.layers.{i}.router.weight`, the paper's naming) and a forward whose routed target (the attention
sub-block by default, or the MLP, or the whole block) runs only on kept tokens. A forward pre-hook on the
base model records the 2-D padding mask, which the decoder layers themselves never see.

One file per concern: patching.py (apply_mindskip, record_routing, thresholds), checkpoints.py (save_routers /
load_routers), generation.py (new_cache and the generate hooks), cache.py (MindSkipCache: kept-only paged K/V
and each routed layer's decode state), model.py (supported architectures, base model, layer choice),
loading.py (load_model), sublayers.py (one object per routed target), kv_rules.py (one object per K/V rule,
held by the attention and block targets), layer_call.py (a layer call's metadata and the row helpers),
forward.py (the layer forward) and observe.py (hooks on the dense model's sub-layers).
"""

from mindskip_kernels._checks import KV_RULES, TARGETS
from mindskip_kernels.integrations.hf.cache import MindSkipCache, RoutedKVLayer, RoutingState
from mindskip_kernels.integrations.hf.checkpoints import META_FILE, ROUTERS_FILE, load_routers, save_routers
from mindskip_kernels.integrations.hf.forward import RULES
from mindskip_kernels.integrations.hf.generation import new_cache
from mindskip_kernels.integrations.hf.loading import load_model
from mindskip_kernels.integrations.hf.model import (
    SUPPORTED,
    base_model,
    check_supported,
    choose_layers,
    mindskip_layers,
    model_type,
    paper_layers,
)
from mindskip_kernels.integrations.hf.observe import dense_forward, observe_sublayers
from mindskip_kernels.integrations.hf.patching import apply_mindskip, record_routing, set_thresholds
from mindskip_kernels.integrations.hf.state import LayerState, ModelState, RoutingEntry, RoutingRecord
from mindskip_kernels.integrations.hf.sublayers import dense_attention

__all__ = [
    "META_FILE",
    "ROUTERS_FILE",
    "RULES",
    "KV_RULES",
    "SUPPORTED",
    "TARGETS",
    "LayerState",
    "MindSkipCache",
    "ModelState",
    "RoutedKVLayer",
    "RoutingEntry",
    "RoutingRecord",
    "RoutingState",
    "apply_mindskip",
    "base_model",
    "check_supported",
    "choose_layers",
    "dense_attention",
    "dense_forward",
    "load_model",
    "load_routers",
    "mindskip_layers",
    "model_type",
    "new_cache",
    "observe_sublayers",
    "paper_layers",
    "record_routing",
    "save_routers",
    "set_thresholds",
]
