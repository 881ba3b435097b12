"""The decode kernel as a torch.library custom op (namespace `mindskip_triton`, with a fake implementation for
torch.compile). Every other Triton op ends its own kernel file with its custom op, fake and autograd.Function
(router_kernels, compaction, gather_scatter, attention_fwd/attention_bwd)."""

import torch

from mindskip_kernels.backends.triton import decode

Tensor = torch.Tensor


@torch.library.custom_op("mindskip_triton::decode_attention", mutates_args=())
def decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, softmax_scale: float) -> Tensor:
    return decode.decode_attention(q, k_cache, v_cache, cache_seqlens, softmax_scale)


@decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, softmax_scale):
    return torch.empty_like(q)
