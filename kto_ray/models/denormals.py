"""Subnormal ("denormal") floats flushed to zero on the CPU threads that run model math.

A float32 below 1.18e-38 is stored without its leading bit; x86 cores compute with such values in a
slow microcode path (up to ~100x per operation on some parts). KTO makes them: when the sigmoid of a
row saturates (large summed log-ratios, long rows first), the gradient it sends back is tiny, and
products in the backward (attention probabilities times that gradient, above all) land below 1.18e-38.
Measured on the bench's skewed data (`bench/long_rows.py`, BENCHMARKS.md section 20): 1.6% and then 3.8%
of every value the two long-row steps computed was subnormal, none in the short steps; on the CPU the
issue was found on, those two steps took 32 and 68 s where the same padded shape takes 5-7 s.

Flushing (FTZ: results below the range become 0; DAZ: such inputs read as 0) changes only values that
are already below 1.18e-38, far under float32's resolution of anything they are added to: the bench's
8 steps end on bit-identical weights either way (`--subnormals`). GPUs flush in their fast paths anyway.

The x86 control register (MXCSR) is per thread, and a thread copies its creator's when it starts:
`flush_denormals` sets the calling thread's, so each entry point that runs model math calls it first
(the training worker's loop, the reference actor on construction and every batch, `load_causal_lm`),
before the thread starts torch's intra-op (OpenMP) threads on its first parallel op.
"""

from __future__ import annotations

import torch

# Elements per probe: at::parallel_for splits elementwise ops into grains of 32,768, so this spreads
# the probe over up to 32 intra-op threads.
_PROBE_ELEMENTS = 1 << 20


def flush_denormals() -> bool:
    """Flush subnormal floats to zero on this thread (and the intra-op threads it starts from now on).
    False where the CPU cannot (not x86 with SSE3): nothing changes there."""
    return torch.set_flush_denormal(True)


def denormals_flushed() -> bool:
    """Whether every intra-op thread that computes for this thread flushes subnormals: a subnormal
    multiplied by one, across the threads, comes out as zero everywhere."""
    # Made from its bits (2**20 * 2**-149 = 1.5e-39): converting a float would be flushed already.
    probe = torch.full((_PROBE_ELEMENTS,), 1 << 20, dtype=torch.int32).view(torch.float32)
    return not bool(probe.mul(1.0).any())
