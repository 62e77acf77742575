"""Infini-attention's compressive memory: reference, chunk-parallel torch, one dispatch.

`naive.py` is the specification; every other implementation is tested against it.
"""

from __future__ import annotations

import torch

from .chunk import chunk_infini_memory
from .naive import RULES, MemoryTensors, feature_map, memory_read, memory_update, naive_infini_memory

IMPLEMENTATIONS = {"naive": naive_infini_memory, "chunk": chunk_infini_memory}


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

    impl: "auto" picks the fastest implementation for the device; "naive"/"chunk" force one.
    """
    if rule not in RULES:
        raise ValueError(f"unknown memory rule {rule!r}; expected one of {RULES}")
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    if impl == "auto":
        impl = "chunk"
    return IMPLEMENTATIONS[impl](q, k, v, segment_len, rule, initial_state)


__all__ = [
    "RULES",
    "MemoryTensors",
    "feature_map",
    "infini_memory",
    "memory_read",
    "memory_update",
    "naive_infini_memory",
    "chunk_infini_memory",
]
