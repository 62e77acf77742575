"""Triton kernels for the memory states of a block of whole segments, read without
gradients (ingest): the memory each segment reads, and the memory after the block.

Reference: `chunk.chunk_states` (the torch path). Why kernels: on an H200 that path's
doubling scan, its cats and its elementwise steps took 0.23 of the 0.63 ms a memory layer
spent on a 64-segment block (docs/benchmarks.md, fourteenth session): many small kernels.

The states: X_0 the memory before the block, then per segment s
    linear: X_{s+1} = X_s + W_s
    delta:  X_{s+1} = X_s + W_s - G_s X_s
with W_s = sigma(K_s)^T V_s and G_s = sigma(K_s)^T D_s sigma(K_s), D_s the reciprocals of
the read denominators sigma(K_s) z_s (chunk.py's A_s = I - G_s). z is a prefix sum.
- `_transitions_kernel`, one program per (segment, batch and head), all at once: W_s, G_s.
- `_scan_kernel`, one program per (batch and head, block of value columns): the
  recurrence, a [Dk, Dk] x [Dk, BV] product per segment (columns of M are independent).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .naive import EPS, RULES, MemoryTensors, feature_map

# columns: value columns per scan program (more programs for the sequential part); rows:
# a transition program's rows at a time; warps: of a transition program. The fastest of
# those bench/window_kernel.py timed on an H200 (docs/benchmarks.md, fifteenth session;
# splitting a segment's rows over more programs was slower). In this order in benchmarks'
# text form (window_kernel.tiles_text): "16x64x4"
SCAN_TILES = {"columns": 16, "rows": 64, "warps": 4}


def fp32_dot_precision(like: torch.Tensor) -> str:
    """tl.dot's precision for fp32 operands, as torch runs its fp32 matmuls: TF32 where it
    allows them (ingest's memory matmuls, `ingest.TF32_MEMORY`), else IEEE (also on AMD,
    which has no TF32 here, and on the CPU)."""
    tf32 = like.is_cuda and not torch.version.hip and torch.get_float32_matmul_precision() != "highest"
    return "tf32" if tf32 else "ieee"


@triton.jit
def _transitions_kernel(
    k, v, z, writes, grams,
    k_sb, k_sh, k_st, v_sb, v_sh, v_st, z_sbh,
    H, N, S, LEAD, EPS: tl.constexpr,
    DK: tl.constexpr, DV: tl.constexpr, BT: tl.constexpr, DELTA: tl.constexpr, PRECISION: tl.constexpr,
):
    s = tl.program_id(0)
    bh = tl.program_id(1).to(tl.int64)  # int64: offsets of long inputs pass 2**31
    b, h = bh // H, bh % H
    dk = tl.arange(0, DK)
    dv = tl.arange(0, DV)
    zs = tl.load(z + bh * z_sbh + (LEAD + s) * DK + dk)  # z before segment s
    w = tl.zeros([DK, DV], tl.float32)
    gram = tl.zeros([DK, DK], tl.float32)
    k_at = k + b * k_sb + h * k_sh
    v_at = v + b * v_sb + h * v_sh
    for c in range(0, N, BT):
        rows = c + tl.arange(0, BT)
        ok = rows < N
        t = s.to(tl.int64) * N + rows
        x = tl.load(k_at + t[:, None] * k_st + dk[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        # sigma = elu + 1 as naive.py rounds it; rows past the segment are 0 and write nothing
        ex = tl.exp(tl.minimum(x, 0.0))
        sk = tl.where(ok[:, None], tl.where(x > 0, x + 1.0, (ex - 1.0) + 1.0), 0.0)
        val = tl.load(v_at + t[:, None] * v_st + dv[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
        w += tl.dot(tl.trans(sk), val, input_precision=PRECISION)
        if DELTA:
            den = tl.sum(sk * zs[None, :], 1)
            # an empty memory reads 0: such rows write their value whole
            inv = tl.where(den > 0, 1.0 / tl.maximum(den, EPS), 0.0)
            gram += tl.dot(tl.trans(sk), sk * inv[:, None], input_precision=PRECISION)
    step = bh * S + s
    tl.store(writes + step * DK * DV + dk[:, None] * DV + dv[None, :], w)
    if DELTA:
        tl.store(grams + step * DK * DK + dk[:, None] * DK + dk[None, :], gram)


@triton.jit
def _scan_kernel(
    m0, lead, writes, grams, reads, after, S,
    LEAD: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BV: tl.constexpr,
    DELTA: tl.constexpr, PRECISION: tl.constexpr,
):
    bh = tl.program_id(0).to(tl.int64)
    dk = tl.arange(0, DK)
    at = dk[:, None] * DV + tl.program_id(1) * BV + tl.arange(0, BV)[None, :]
    # the states in order (the lead first, then X_0, X_1, ...): the first S are the reads,
    # the rest the memory after the block
    reads_at = reads + bh * S * DK * DV + at
    after_at = after + bh * (LEAD + 1) * DK * DV + at
    if LEAD:
        tl.store(reads_at, tl.load(lead + bh * DK * DV + at))
    M = tl.load(m0 + bh * DK * DV + at)
    if LEAD < S:
        tl.store(reads_at + LEAD * DK * DV, M)
    else:
        tl.store(after_at + (LEAD - S) * DK * DV, M)
    for s in range(S):
        step = bh * S + s
        w = tl.load(writes + step * DK * DV + at)
        if DELTA:
            gram = tl.load(grams + step * DK * DK + dk[:, None] * DK + dk[None, :])
            M = M - tl.dot(gram, M, input_precision=PRECISION) + w
        else:
            M = M + w
        j = LEAD + s + 1
        if j < S:
            tl.store(reads_at + j * DK * DV, M)
        else:
            tl.store(after_at + (j - S) * DK * DV, M)


def scan_states(
    k: torch.Tensor,
    v: torch.Tensor,
    segment_len: int,
    rule: str,
    initial_state: MemoryTensors,
    lead: MemoryTensors | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The states of S whole segments of keys k [B, H, S*N, Dk] and values v [B, H, S*N, Dv]
    written in turn from `initial_state` (M0, z0), in order: `lead` if given, then the
    state before each segment, then the state after the last. The first S of them are what
    the segments read (the lagged memory: `lead` is what the first reads); the rest, one or
    with `lead` two, the memory after the block. Returns those reads (M [B, H, S, Dk, Dv],
    z [B, H, S, Dk]) and the rest (M [B, H, 1 or 2, Dk, Dv], z [B, H, 1 or 2, Dk]), fp32.
    As `chunk.chunk_states` computes them; fp32 products in TF32 where torch's fp32
    matmuls are."""
    b, h, t, dk = k.shape
    dv, n = v.shape[-1], segment_len
    s = t // n if n > 0 else 0
    if (rule not in RULES or s == 0 or t != s * n or v.shape[:3] != k.shape[:3]
            or any(d & (d - 1) or d < 16 for d in (dk, dv))):
        raise ValueError(f"whole segments of keys and values, power-of-two head sizes >= 16 and a rule of "
                         f"{RULES} are needed (got {t} tokens in segments of {n}, keys {tuple(k.shape)}, "
                         f"values {tuple(v.shape)}, rule {rule!r})")
    M0, z0 = (x.float().contiguous() for x in initial_state)
    with_lead = lead is not None
    # z before each segment and after the last: a prefix sum (a lead's first)
    z = torch.cat([z0.unsqueeze(2), z0.unsqueeze(2) + feature_map(k).unflatten(2, (s, n)).sum(3).cumsum(2)], 2)
    if with_lead:
        z = torch.cat([lead[1].float().unsqueeze(2), z], 2)
    z = z.contiguous()
    delta = rule == "delta"
    writes = torch.empty(b, h, s, dk, dv, dtype=torch.float32, device=k.device)
    grams = torch.empty(b, h, s, dk, dk, dtype=torch.float32, device=k.device) if delta else writes.new_empty(0)
    reads = torch.empty(b, h, s, dk, dv, dtype=torch.float32, device=k.device)
    after = torch.empty(b, h, 1 + with_lead, dk, dv, dtype=torch.float32, device=k.device)
    precision = fp32_dot_precision(k)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    _transitions_kernel[(s, b * h)](
        k, v, z, writes, grams, k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        z.stride(1), h, n, s, int(with_lead), EPS,
        DK=dk, DV=dv, BT=min(SCAN_TILES["rows"], max(16, triton.next_power_of_2(n))), DELTA=delta, PRECISION=precision, num_warps=SCAN_TILES["warps"],
    )
    bv = min(SCAN_TILES["columns"], dv)
    M_lead = lead[0].float().contiguous() if with_lead else M0
    _scan_kernel[(b * h, dv // bv)](
        M0, M_lead, writes, grams, reads, after, s,
        LEAD=int(with_lead), DK=dk, DV=dv, BV=bv, DELTA=delta, PRECISION=precision,
    )
    return reads, z[:, :, :s], after, z[:, :, s:]
