"""mindskip_kernels: dynamic-depth attention (MindSkip, Router-Tuning) with fused kernels.

A router in front of an attention sub-layer decides per token (or per sequence) whether attention runs;
only the kept tokens are gathered, attended among at their original positions, and scattered back into
the residual stream.
"""

from mindskip_kernels.attention import MindSkipAttention, mindskip_attention
from mindskip_kernels.backends import available as available_backends
from mindskip_kernels.ops import decode_attention, keep_masked_attention, paged_varlen_attention, varlen_attention
from mindskip_kernels.routing import RoutingPlan, compact, gather, route, scatter_add, score
from mindskip_kernels.rowwise import predicated_linear, rms_norm

__version__ = "0.1.0"

__all__ = [
    "MindSkipAttention",
    "RoutingPlan",
    "apply_mindskip",
    "available_backends",
    "compact",
    "decode_attention",
    "gather",
    "keep_masked_attention",
    "load_routers",
    "mindskip_attention",
    "paged_varlen_attention",
    "predicated_linear",
    "record_routing",
    "rms_norm",
    "route",
    "save_routers",
    "scatter_add",
    "score",
    "varlen_attention",
]


def __getattr__(name: str):
    """The Hugging Face integration imports transformers, so it loads on first use."""
    if name in ("apply_mindskip", "save_routers", "load_routers", "record_routing"):
        from mindskip_kernels.integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'mindskip_kernels' has no attribute {name!r}")
