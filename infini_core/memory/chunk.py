"""Chunk-parallel memory: every segment of a long input at once.

Linear rule: the memory each segment reads is a prefix sum of per-segment writes
sigma(K)^T V, so all states come from one cumsum and all reads from one batched matmul.
Delta rule: M_s = M_{s-1} + sigma(K)^T (V - D sigma(K) M_{s-1}) with D the reciprocal
read denominators, which depend only on z (itself a prefix sum). So M_s = A_s M_{s-1} + B_s
with A_s = I - sigma(K)^T D sigma(K) and B_s = sigma(K)^T V, all built at once; the
recurrence is an associative scan over (A, B) pairs in log2(segments) batched steps
instead of one small sequential update per segment.
Same contract and results as `naive.naive_infini_memory`. `chunk_states` is the states
alone; for the window kernel's blocks (ingest, no gradients) the Triton scan of
`scan_kernel.py` computes the same states faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .naive import EPS, MemoryTensors, dot_z, empty_memory, feature_map, memory_read


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
    if t == 0:
        M0, z0 = initial_state if initial_state is not None else empty_memory(k, dv)
        return q.new_zeros(b, hq, 0, dv), (M0, z0)
    n = segment_len
    s = -(-t // n)
    M_before, z_before, final = chunk_states(k, v, n, rule, initial_state)
    sq = F.pad(feature_map(q), (0, 0, 0, s * n - t)).view(b, hkv, hq // hkv, s, n, dk)
    out = memory_read(sq, M_before.unsqueeze(2), z_before.unsqueeze(2))
    return out.reshape(b, hq, s * n, dv)[:, :, :t].to(q.dtype), final


def chunk_states(
    k: torch.Tensor,
    v: torch.Tensor,
    segment_len: int,
    rule: str = "linear",
    initial_state: MemoryTensors | None = None,
) -> tuple[torch.Tensor, torch.Tensor, MemoryTensors]:
    """The memory each segment of k, v reads, before its own write (M [B, H, S, Dk, Dv],
    z [B, H, S, Dk]), and the final state (t >= 1 tokens)."""
    b, hkv, t, dk = k.shape
    dv = v.shape[-1]
    M0, z0 = initial_state if initial_state is not None else empty_memory(k, dv)
    n = segment_len
    s = -(-t // n)
    pad = s * n - t
    # padding after the feature map: padded keys are 0 and write nothing
    sk = F.pad(feature_map(k), (0, 0, 0, pad)).view(b, hkv, s, n, dk)
    vf = F.pad(v.float(), (0, 0, 0, pad)).view(b, hkv, s, n, dv)

    writes = sk.transpose(-1, -2) @ vf  # B_s = sigma(K)^T V, [b, h, s, dk, dv]
    z_after = z0.unsqueeze(2) + sk.sum(-2).cumsum(2)
    z_before = torch.cat([z0.unsqueeze(2), z_after[:, :, :-1]], 2)  # what segment i reads
    if rule == "linear":
        M_after = M0.unsqueeze(2) + writes.cumsum(2)
    elif rule == "delta":
        den = dot_z(sk, z_before)  # [b, h, s, n, 1]
        # an empty memory reads 0 (0 / EPS in naive.py): such rows write their V whole
        inv = torch.where(den > 0, 1.0 / den.clamp_min(EPS), torch.zeros_like(den))
        eye = torch.eye(dk, dtype=sk.dtype, device=sk.device)
        decay = eye - sk.transpose(-1, -2) @ (inv * sk)  # A_s, [b, h, s, dk, dk]
        first = decay[:, :, :1] @ M0.unsqueeze(2) + writes[:, :, :1]  # fold the initial state in
        M_after = _scan(decay, torch.cat([first, writes[:, :, 1:]], 2))
    else:
        raise ValueError(f"unknown memory rule {rule!r}")

    # segment i reads the state after segment i - 1
    M_before = torch.cat([M0.unsqueeze(2), M_after[:, :, :-1]], 2)
    return M_before, z_before, (M_after[:, :, -1], z_after[:, :, -1])


def _scan(decay: torch.Tensor, writes: torch.Tensor) -> torch.Tensor:
    """M_s = A_s M_{s-1} + B_s from M_0 = 0 for every s (dim 2), by doubling: after the step
    of width d each pair holds the composition of up to 2d segments, where
    (A2, B2) after (A1, B1) = (A2 A1, A2 B1 + B2)."""
    a, m = decay, writes
    d = 1
    while d < m.shape[2]:
        m = torch.cat([m[:, :, :d], a[:, :, d:] @ m[:, :, :-d] + m[:, :, d:]], 2)
        a = torch.cat([a[:, :, :d], a[:, :, d:] @ a[:, :, :-d]], 2)
        d *= 2
    return m
