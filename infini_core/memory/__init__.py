"""Infini-attention's compressive memory: reference, chunk-parallel torch, one dispatch.

`naive.py` is the specification; every other implementation is tested against it.
"""

from __future__ import annotations

import contextlib

import torch

from .chunk import chunk_infini_memory
from .naive import RULES, MemoryTensors, feature_map, memory_read, memory_update, naive_infini_memory


def fused_infini_memory(*args, **kwargs):
    """The Triton kernels (`fused.py`); triton is imported on first use, never before."""
    from .fused import fused_infini_memory as fused

    return fused(*args, **kwargs)


IMPLEMENTATIONS = {"naive": naive_infini_memory, "chunk": chunk_infini_memory, "fused": fused_infini_memory}
_forced: str | None = None  # set by use_impl, for benchmarks and tests


@contextlib.contextmanager
def use_impl(name: str):
    """Make impl="auto" mean `name` inside the block (the model always asks for "auto")."""
    global _forced
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown implementation {name!r}; expected one of {sorted(IMPLEMENTATIONS)}")
    before, _forced = _forced, name
    try:
        yield
    finally:
        _forced = before


def infini_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_len: int,
    rule: str = "linear",
    initial_state: MemoryTensors | None = None,
    impl: str = "auto",
) -> tuple[torch.Tensor, MemoryTensors]:
    """Memory read of every token of q/k/v (split into segments) and the final (M, z).

    impl: "auto" picks the fastest measured implementation (chunk); "naive"/"chunk"/"fused"
    force one (fused: the Triton kernels, CUDA or TRITON_INTERPRET=1).
    """
    if rule not in RULES:
        raise ValueError(f"unknown memory rule {rule!r}; expected one of {RULES}")
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    return IMPLEMENTATIONS[chosen_impl(impl)](q, k, v, segment_len, rule, initial_state)


def chosen_impl(impl: str = "auto") -> str:
    """The implementation `impl` stands for: "auto" is the fastest measured one, unless a
    `use_impl` block says otherwise."""
    # measured on an H200 (docs/benchmarks.md): the torch chunk path is faster than the
    # Triton kernels for both rules at every length so far, so it is the default
    return (_forced or "chunk") if impl == "auto" else impl


__all__ = [
    "RULES",
    "chosen_impl",
    "MemoryTensors",
    "feature_map",
    "infini_memory",
    "memory_read",
    "memory_update",
    "naive_infini_memory",
    "chunk_infini_memory",
    "fused_infini_memory",
    "use_impl",
]
