"""What the machine computes fast: one answer for every engine and trainer.

bf16 is the right default on GPUs and on CPUs with native bf16 units (AVX512-BF16 or AMX), but on
AVX2-only CPUs torch emulates it: on this project's 2-core AMD EPYC, bf16 matmuls ran ~9x slower
than fp32 and some backward GEMMs ~100x. So "auto" means bf16 only where the hardware has it.
"""

from __future__ import annotations

import functools


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AVX512-BF16 or AMX)."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def auto_bf16() -> bool:
    """bf16 for "auto" precision: on a CUDA GPU that supports it, or on a CPU with native bf16."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    return cpu_has_fast_bf16()
