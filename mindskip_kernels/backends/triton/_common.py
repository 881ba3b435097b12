"""Helpers shared by the Triton kernels: interpreter detection, autotuning, bf16-exact rounding."""

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = not INTERPRET and os.environ.get("MINDSKIP_TRITON_AUTOTUNE", "1") != "0"


def fix_bf16(dtype: torch.dtype) -> bool:
    """Whether kernels must keep bf16 data in fp32 and round it by hand: the interpreter's bf16 arithmetic
    and fp32->bf16 conversion (it truncates) are wrong; loads and stores of bf16 bits are fine."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs need IEEE dots to meet the fp32 tolerance; tf32 would lose 13 mantissa bits."""
    return "ieee" if dtype == torch.float32 else "tf32"


def autotune(configs: list[triton.Config], key: list[str]):
    """triton.autotune over `configs` on a GPU; over the first one only in the interpreter (where timing
    several configs fails) or with MINDSKIP_TRITON_AUTOTUNE=0 (quick checks: no compile-and-time of every
    config per new key). The first config is the default: keep it a good general choice."""
    return triton.autotune(configs=configs if AUTOTUNE else configs[:1], key=key)


def pow2(n: int, minimum: int = 16) -> int:
    """Block size covering n (tl.dot needs >= 16)."""
    return max(triton.next_power_of_2(n), minimum)


@triton.jit
def rounded(x, dtype: tl.constexpr, FIX_BF16: tl.constexpr):
    """x (fp32) converted to `dtype` with round-to-nearest-even. Under FIX_BF16 the rounding is done on the
    bits first, so the interpreter's truncating conversion only drops zero bits."""
    if FIX_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
