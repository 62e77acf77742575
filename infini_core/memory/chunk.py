"""Chunk-parallel memory: every segment of a long input at once.

Linear rule: the memory each segment reads is a prefix sum of per-segment writes
sigma(K)^T V, so all states come from one cumsum and all reads from one batched matmul.
Delta rule: a segment's write depends on the memory it is written into, so the states
stay a scan over segments; the reads are still batched over all segments.
Same contract and results as `naive.naive_infini_memory`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import MemoryTensors, empty_memory, feature_map, memory_read, memory_update


def chunk_infini_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_len: int,
    rule: str = "linear",
    initial_state: MemoryTensors | None = None,
) -> tuple[torch.Tensor, MemoryTensors]:
    b, hkv, t, dk = k.shape
    hq, dv = q.shape[1], v.shape[-1]
    M0, z0 = initial_state if initial_state is not None else empty_memory(k, dv)
    if t == 0:
        return q.new_zeros(b, hq, 0, dv), (M0, z0)
    n = segment_len
    s = -(-t // n)
    pad = s * n - t
    # padding after the feature map: padded keys are 0 and write nothing
    sq = F.pad(feature_map(q), (0, 0, 0, pad)).view(b, hkv, hq // hkv, s, n, dk)
    sk = F.pad(feature_map(k), (0, 0, 0, pad)).view(b, hkv, s, n, dk)
    vf = F.pad(v.float(), (0, 0, 0, pad)).view(b, hkv, s, n, dv)

    if rule == "linear":
        M_after = M0.unsqueeze(2) + (sk.transpose(-1, -2) @ vf).cumsum(2)
        z_after = z0.unsqueeze(2) + sk.sum(-2).cumsum(2)
    elif rule == "delta":
        M, z = M0, z0
        after = []
        for i in range(s):
            M, z = memory_update(M, z, sk[:, :, i], vf[:, :, i], rule)
            after.append((M, z))
        M_after = torch.stack([m for m, _ in after], 2)
        z_after = torch.stack([zz for _, zz in after], 2)
    else:
        raise ValueError(f"unknown memory rule {rule!r}")

    # segment i reads the state after segment i - 1
    M_before = torch.cat([M0.unsqueeze(2), M_after[:, :, :-1]], 2)
    z_before = torch.cat([z0.unsqueeze(2), z_after[:, :, :-1]], 2)
    out = memory_read(sq, M_before.unsqueeze(2), z_before.unsqueeze(2))
    out = out.reshape(b, hq, s * n, dv)[:, :, :t]
    return out.to(q.dtype), (M_after[:, :, -1], z_after[:, :, -1])
