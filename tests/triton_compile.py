"""Build every Triton kernel for a GPU architecture without a GPU (a CI check).

Two halves, because `@triton.jit` picks the interpreter or the compiler when the module is imported:
`record_launches()` (under TRITON_INTERPRET=1) records each kernel launch's argument types and constexprs
while ordinary calls run; `python -m tests.triton_compile SPEC.json` (under
TRITON_INTERPRET=0) compiles each recorded kernel with `triton.compile(ASTSource(...),
target=GPUTarget("cuda", capability, 32))` and prints one JSON result per kernel (including whether the
PTX uses tensor-core `mma`/`wgmma` instructions).
"""

import contextlib
import importlib
import inspect
import json
import sys
from collections.abc import Iterator

import torch

POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64",
                 torch.int32: "*i32", torch.int64: "*i64", torch.bool: "*i1", torch.int8: "*i8", torch.uint8: "*u8"}
OPTIONS = ("num_warps", "num_stages")
# constexprs that exist only for the interpreter: compile what a GPU runs
GPU_CONSTEXPRS = {"FIX_BF16": False}


def _describe(fn, args: tuple, kwargs: dict) -> dict:
    """One launch as {kernel: module.name, signature, constexprs, options} (JSON-able)."""
    params = inspect.signature(fn).parameters
    values = dict(zip(params, args, strict=False)) | {k: v for k, v in kwargs.items() if k in params}
    signature, constexprs = {}, {}
    for name, param in params.items():
        value = values[name]
        if "constexpr" in str(param.annotation):
            signature[name] = "constexpr"
            constexprs[name] = GPU_CONSTEXPRS.get(name, value)
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    options = {k: kwargs[k] for k in OPTIONS if kwargs.get(k) is not None}
    return {"kernel": f"{fn.__module__}.{fn.__name__}", "signature": signature, "constexprs": constexprs,
            "options": options}


@contextlib.contextmanager
def record_launches() -> Iterator[list[dict]]:
    """Collect the distinct kernel launches made inside the block (Triton interpreter only)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    original = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        launch = _describe(self.fn, args, kwargs)
        if launch not in launches:
            launches.append(launch)
        return original(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    try:
        yield launches
    finally:
        InterpretedFunction.run = original


def _variants(launch: dict) -> Iterator[tuple[object, dict, dict, str]]:
    """(jit function, constexprs, options, label) for the launch, once per autotune config."""
    module, name = launch["kernel"].rsplit(".", 1)
    fn = getattr(importlib.import_module(module), name)
    configs = getattr(fn, "configs", None)
    if configs is None:
        yield fn, launch["constexprs"], launch["options"], launch["kernel"]
        return
    for config in configs:  # an Autotuner: every config must build, not only the one that ran
        options = {k: getattr(config, k) for k in OPTIONS if getattr(config, k) is not None}
        yield fn.fn, launch["constexprs"] | config.kwargs, options, f"{launch['kernel']}[{config}]"


def compile_launch(launch: dict, capability: int) -> list[dict]:
    """Compile one recorded launch (every autotune config) for sm_<capability>; report success, tensor-core
    use and shared memory per program."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = []
    for fn, constexprs, options, label in _variants(launch):
        try:
            kernel = triton.compile(ASTSource(fn, launch["signature"], constexprs),
                                    target=GPUTarget("cuda", capability, 32), options=options)
        except Exception as err:  # reported, not raised: the check lists every failing kernel
            results.append({"kernel": label, "ok": False, "error": f"{type(err).__name__}: {err}"[:2000]})
            continue
        ptx = kernel.asm["ptx"]
        results.append({"kernel": label, "ok": True, "mma": "mma" in ptx, "wgmma": "wgmma" in ptx,
                        "shared": kernel.metadata.shared})
    return results


def main(argv: list[str]) -> None:
    """argv: SPEC.json [capability]; prints a JSON list of results."""
    with open(argv[0]) as f:
        launches = json.load(f)
    capability = int(argv[1]) if len(argv) > 1 else 90
    print(json.dumps([result for launch in launches for result in compile_launch(launch, capability)]))


if __name__ == "__main__":
    main(sys.argv[1:])
