"""Helpers shared by the Triton kernels of this package."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def interpreting(kernel) -> bool:
    """True when ``kernel`` was built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel, InterpretedFunction)


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``: exact fp32 products for fp32 operands (never tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def mma(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """``tl.dot(a, b)`` with fp32 accumulation.

    ``UPCAST`` multiplies in fp32 (exact for bf16/fp8 operands). The kernels set it under the CPU
    interpreter only: triton 3.8's interpreter stores bf16 as uint16 and multiplies those integers.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)
