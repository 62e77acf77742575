"""The compressive memory of Infini-attention, segment by segment: the specification.

Shapes (grouped-query heads: each KV head owns one memory, its G query heads read it):
    q  [B, Hq,  T, Dk]   memory queries, before RoPE (callers fold any sharpness in)
    k  [B, Hkv, T, Dk]   memory keys, before RoPE
    v  [B, Hkv, T, Dv]
    M  [B, Hkv, Dk, Dv]  and  z [B, Hkv, Dk], always fp32

For each segment s of `segment_len` tokens (the last one may be shorter):
    A_mem = sigma(Q) M_{s-1} / (sigma(Q) z_{s-1})          read before write
    linear: M_s = M_{s-1} + sigma(K)^T V
    delta:  M_s = M_{s-1} + sigma(K)^T (V - sigma(K) M_{s-1} / (sigma(K) z_{s-1}))
    z_s = z_{s-1} + sum_t sigma(K_t)
with sigma(x) = elu(x) + 1. The final state has absorbed every token, the partial
last segment included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

RULES = ("linear", "delta")
# sigma(x) > 0 and z >= 0, so the denominator is >= 0; it is 0 only while the memory is
# empty, where the numerator is 0 as well: clamping turns that 0/0 into a read of 0.
EPS = 1e-6

MemoryTensors = tuple[torch.Tensor, torch.Tensor]


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """sigma(x) = elu(x) + 1, in fp32 (M and z accumulate in fp32 whatever the input)."""
    return F.elu(x.float()) + 1.0


def empty_memory(k: torch.Tensor, dv: int) -> MemoryTensors:
    b, h, _, dk = k.shape
    return (
        torch.zeros(b, h, dk, dv, dtype=torch.float32, device=k.device),
        torch.zeros(b, h, dk, dtype=torch.float32, device=k.device),
    )


def group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, Hq, T, D] -> [B, Hkv, G, T, D]: query head h reads the memory of KV head h // G."""
    b, hq, t, d = q.shape
    if hq % kv_heads:
        raise ValueError(f"{hq} query heads cannot share {kv_heads} KV heads")
    return q.reshape(b, kv_heads, hq // kv_heads, t, d)


def memory_read(sq: torch.Tensor, M: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """sigma(Q) M / sigma(Q) z for features sq [..., T, Dk] against M [..., Dk, Dv], z [..., Dk]."""
    return (sq @ M) / dot_z(sq, z).clamp_min(EPS)


def dot_z(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """s z for features s [..., T, Dk] and z [..., Dk]: [..., T, 1]. A product and a sum, not a
    matrix-vector product: compiled, it fuses into the kernel that makes the features (a
    GEMV is a kernel of its own, which reads them all again)."""
    return (s * z.unsqueeze(-2)).sum(-1, keepdim=True)


def memory_update(M: torch.Tensor, z: torch.Tensor, sk: torch.Tensor, v: torch.Tensor, rule: str) -> MemoryTensors:
    """Write one segment's key features sk [B, H, t, Dk] and values v [B, H, t, Dv]."""
    if rule not in RULES:
        raise ValueError(f"unknown memory rule {rule!r}; expected one of {RULES}")
    v = v.float()
    if rule == "delta":
        # only write what the memory does not already return for these keys
        v = v - memory_read(sk, M, z)
    return M + sk.transpose(-1, -2) @ v, z + sk.sum(-2)


def naive_infini_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_len: int,
    rule: str = "linear",
    initial_state: MemoryTensors | None = None,
) -> tuple[torch.Tensor, MemoryTensors]:
    """Memory read of every token and the final (M, z), one segment at a time."""
    kv_heads, t = k.shape[1], k.shape[2]
    M, z = initial_state if initial_state is not None else empty_memory(k, v.shape[-1])
    outputs = []
    for start in range(0, t, segment_len):
        seg = slice(start, start + segment_len)
        sq = group_queries(feature_map(q[:, :, seg]), kv_heads)
        outputs.append(memory_read(sq, M.unsqueeze(2), z.unsqueeze(2)))
        M, z = memory_update(M, z, feature_map(k[:, :, seg]), v[:, :, seg], rule)
    if not outputs:
        return q.new_zeros(*q.shape[:3], v.shape[-1]), (M, z)
    return torch.cat(outputs, dim=3).flatten(1, 2).to(q.dtype), (M, z)
