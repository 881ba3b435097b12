"""Observing the dense model: what each target sub-layer does to the residual stream, seen through forward
hooks on the model's own modules (no patch involved). The training-free drops (layer_drop.py) measure the
cosine between the stream before and after; router fitting (fitting.py) regresses the size of the update."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from mindskip_kernels.integrations.hf.model import base_model, mindskip_layers
from mindskip_kernels.integrations.hf.sublayers import SUBLAYERS

Observer = Callable[[int, torch.Tensor, torch.Tensor], None]  # (layer index, stream before [B,N,D], after)


@contextlib.contextmanager
def observe_sublayers(model: nn.Module, targets: dict[int, str], fn: Observer) -> Iterator[None]:
    """While active, each forward calls fn(i, x, y) for every layer i in `targets` ({layer: target}): x the
    residual stream entering that layer's target sub-layer [B, N, D], y the stream after it."""
    layers = base_model(model).layers
    inputs: dict[int, torch.Tensor] = {}

    def pre(i: int):
        def hook(module, args, kwargs):
            inputs[i] = kwargs.get("hidden_states", args[0] if args else None)
        return hook

    def post(i: int, sublayer):
        def hook(module, args, output):
            x = inputs.pop(i)
            fn(i, x, sublayer.stream_after(x, output[0] if isinstance(output, tuple) else output))
        return hook

    handles = []
    try:
        for i, target in targets.items():
            sublayer = SUBLAYERS[target, "kept"]  # what is observed does not depend on the K/V rule
            source, sink = sublayer.observed(layers[i])
            handles.append(source.register_forward_pre_hook(pre(i), with_kwargs=True))
            handles.append(sink.register_forward_hook(post(i, sublayer)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def dense_forward(model: nn.Module) -> Iterator[None]:
    """While active, the routed layers of a patched model run their original (dense) forward: the routers are
    kept but not consulted (e.g. to observe what the dense model does before fitting them)."""
    patched = mindskip_layers(model)
    forwards = {i: layer.__dict__.pop("forward") for i, layer in patched.items() if "forward" in layer.__dict__}
    try:
        yield
    finally:
        for i, forward in forwards.items():
            patched[i].forward = forward
