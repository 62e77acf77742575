"""One Triton kernel for a memory layer's whole segments while a document is read (no
gradients): each segment's local attention over its window (the sinks, the previous
segment, itself up to each query), RoPE on the queries as they are loaded (the keys come
rotated), the memory read and the gate, written straight in the layout o_proj takes.

Its reference is the torch path of `attention.whole_segments` (local_attention,
read_memory, gate_mix). Why a kernel: that path pads each segment's queries to the whole
window so that cuDNN's causal kernel takes it (a quarter of its work thrown away), and
RoPE, the pads, the memory read and the gate are kernels of their own around it, each a
pass over the block (docs/benchmarks.md, fourteenth session).

Layout of the work: one program per (segment, block of BM queries, batch and query head).
It walks the window's keys in blocks of BN with an online softmax (the sinks, then the
previous segment, then its own segment up to its last query), then reads the memory the
segment reads (M, z given per segment: `memory.scan_kernel.scan_states` computes them)
and mixes the two by the head's gate.
"""

from __future__ import annotations

import logging
import math

import torch
import triton
import triton.language as tl

from .memory.naive import EPS
from .memory.scan_kernel import fp32_dot_precision, scan_states

log = logging.getLogger(__name__)

# the fastest of those bench/window_kernel.py timed on an H200 for segments of 512 and
# head_dim 64 (docs/benchmarks.md, fourteenth session)
TILES = {"BM": 64, "BN": 64, "num_warps": 4, "num_stages": 3}


def tiles_text(tiles: dict = TILES) -> str:
    """Tiles as benchmarks name them, their values in order: TILES as BM x BN x warps x
    stages, "64x64x4x3" (and the memory scan's SCAN_TILES)."""
    return "x".join(map(str, tiles.values()))


def set_tiles(text: str, tiles: dict = TILES) -> None:
    """Tiles from `tiles_text`'s form (benchmarks try others)."""
    tiles.update(zip(tiles, map(int, text.split("x"))))


@triton.jit
def _halves(base, rows, ok, stride_t, D: tl.constexpr):
    """`rows` of one head (x) and the same rows with their halves swapped (the partner of
    each element in RoPE's half-split layout), in fp32. The partner half is loaded a
    second time (it is in cache) rather than split, so that tl.dot gets the whole head_dim
    as one operand."""
    d = tl.arange(0, D)
    at = base + rows[:, None] * stride_t
    x = tl.load(at + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    xp = tl.load(at + ((d + D // 2) % D)[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return x, xp


@triton.jit
def _rotated(x, xp, ok, cos, sin, pos, D: tl.constexpr):
    """RoPE (x * cos + [-x2, x1] * sin) of `_halves`' rows at window positions `pos`."""
    d = tl.arange(0, D)
    sign = tl.where(d < D // 2, -1.0, 1.0)
    c = tl.load(cos + pos[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    s = tl.load(sin + pos[:, None] * D + d[None, :], mask=ok[:, None], other=0.0).to(tl.float32)
    return x * c + sign[None, :] * xp * s


@triton.jit
def _attend(q, k_at, v_at, stride_t, cols, ok, visible, m_i, l_i, acc, qk_scale,
            D: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr):
    """Keys `cols` (rows of k_at, v_at) into the online softmax (scores in base 2, m_i of
    the scaled scores). Without MASKED every key is there and visible to every query (no
    masks to compute)."""
    d = tl.arange(0, D)
    at = cols[:, None] * stride_t + d[None, :]
    if MASKED:
        k = tl.load(k_at + at, mask=ok[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_at + at, mask=ok[:, None], other=0.0).to(q.dtype)
    else:
        k = tl.load(k_at + at).to(q.dtype)
        v = tl.load(v_at + at).to(q.dtype)
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32)
    if MASKED:
        scores = tl.where(visible, scores, float("-inf"))
    # the scale applied in the exponent's multiply-add, not as a pass of its own
    m_new = tl.maximum(m_i, tl.max(scores, 1) * qk_scale)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores * qk_scale - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # (the product accumulates into acc: no second accumulator)
    acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _segments_kernel(
    q, k, v, mq, sink_k, sink_v, cos, sin, M, z, gate, out,
    q_sb, q_sh, q_st, mq_sb, mq_sh, mq_st, k_sb, k_sh, k_st, p_sb, p_sh, p_st,
    N, S, P, HQ, G, qk_scale, EPS: tl.constexpr,
    D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BP: tl.constexpr, XL: tl.constexpr,
    EVEN: tl.constexpr, PRECISION: tl.constexpr, MEMORY_PRECISION: tl.constexpr, DOT_F32: tl.constexpr,
    OPENS: tl.constexpr,
):
    blocks = tl.cdiv(N, BM)
    s = tl.program_id(0) // blocks
    m = tl.program_id(0) % blocks
    b = (tl.program_id(1) // HQ).to(tl.int64)  # int64: offsets of long inputs pass 2**31
    h = tl.program_id(1) % HQ
    kv = h // G
    d = tl.arange(0, D)
    rows = m * BM + tl.arange(0, BM)
    row_ok = rows < N
    own = P + N if XL else P  # window position of the segment's first token
    start = s.to(tl.int64) * N  # the segment's first token in the block

    # the dots' operands: the inputs' 16 bits on a GPU; fp32 under the interpreter (its
    # bf16 dots are wrong)
    if DOT_F32:
        dtype = tl.float32
    else:
        dtype = q.dtype.element_ty
    qk_scale = tl.cast(qk_scale, tl.float32)  # (compiled by torch.compile, it may come in as fp64)
    x, xp = _halves(q + b * q_sb + h * q_sh + start * q_st, rows, row_ok, q_st, D)
    qr = _rotated(x, xp, row_ok, cos, sin, own + rows, D).to(dtype)
    m_i = tl.full([BM], -1e30, tl.float32)  # finite: a block with no visible key adds nothing
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    # a block that OPENS a document: its first segment sees only itself, its second also the
    # first (whose first tokens are the sinks: not twice); neither reads a memory yet
    if OPENS:
        sinks_seen = tl.where(s > 1, P, 0)
        prev_keys = tl.where(s > 0, N, 0)
    else:
        sinks_seen = P
        prev_keys = N

    if P > 0:  # the sinks, rotated at window positions 0..P-1
        sinks = tl.arange(0, BP)
        is_sink = sinks < sinks_seen  # (a name of its own: a loop below re-assigning one of another shape fails)
        at = b * p_sb + kv * p_sh
        m_i, l_i, acc = _attend(qr, sink_k + at, sink_v + at, p_st, sinks, is_sink, is_sink[None, :], m_i, l_i, acc,
                                qk_scale, D, PRECISION, True)
    # Keys come rotated at their place in their own segment's window (own + j); with
    # xl_window, k and v start with the segment before the block's first (the window
    # carried in), so segment s's own keys are one segment further on
    own_k = k + b * k_sb + kv * k_sh + (start + N if XL else start) * k_st
    own_v = v + b * k_sb + kv * k_sh + (start + N if XL else start) * k_st
    if XL:
        # the previous segment's keys sit N positions before where they were rotated:
        # RoPE sees only differences, so the queries are rotated N positions further instead
        q_prev = _rotated(x, xp, row_ok, cos, sin, own + N + rows, D).to(dtype)
        for j0 in range(0, prev_keys, BN):
            cols = j0 + tl.arange(0, BN)
            ok = cols < N
            m_i, l_i, acc = _attend(q_prev, own_k - N * k_st, own_v - N * k_st, k_st, cols, ok, ok[None, :],
                                    m_i, l_i, acc, qk_scale, D, PRECISION, not EVEN)
    # the segment itself, causal: blocks before the queries' own are all visible (and all
    # there: they end before the last query), then the diagonal ones, masked
    for j0 in range(0, m * BM, BN):
        cols = j0 + tl.arange(0, BN)
        m_i, l_i, acc = _attend(qr, own_k, own_v, k_st, cols, cols < N, cols[None, :] < N, m_i, l_i, acc,
                                qk_scale, D, PRECISION, False)
    for j0 in range(m * BM, tl.minimum((m + 1) * BM, N), BN):
        cols = j0 + tl.arange(0, BN)
        ok = cols < N
        visible = (cols[None, :] <= rows[:, None]) & ok[None, :]
        m_i, l_i, acc = _attend(qr, own_k, own_v, k_st, cols, ok, visible, m_i, l_i, acc, qk_scale, D, PRECISION,
                                True)
    local = acc / l_i[:, None]

    # the memory read: sigma(mq) M / sigma(mq) z, sigma = elu + 1 in fp32 as naive.py has it
    x = tl.load(mq + b * mq_sb + h * mq_sh + (start + rows[:, None]) * mq_st + d[None, :],
                mask=row_ok[:, None], other=0.0).to(tl.float32)
    ex = tl.exp(tl.minimum(x, 0.0))
    sq = tl.where(x > 0, x + 1.0, (ex - 1.0) + 1.0)
    state = (b * (HQ // G) + kv) * S + s
    Ms = tl.load(M + state * D * D + d[:, None] * D + d[None, :])
    zs = tl.load(z + state * D + d)
    mem = tl.dot(sq, Ms, input_precision=MEMORY_PRECISION) / tl.maximum(tl.sum(sq * zs[None, :], 1), EPS)[:, None]

    g = tl.sigmoid(tl.load(gate + h).to(tl.float32))
    mixed = g * mem + (1.0 - g) * local
    if OPENS:
        mixed = tl.where(s > 1, mixed, local)
    t = start + rows  # out: [B, S*N, HQ, D]
    tl.store(out + ((b * S * N + t[:, None]) * HQ + h) * D + d[None, :], mixed.to(out.dtype.element_ty),
             mask=row_ok[:, None])


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel takes one set of strides for a pair of keys and values, and unit stride
    along head_dim."""
    if a.stride() == b.stride() and a.stride(-1) == 1:
        return a, b
    return a.contiguous(), b.contiguous()


def fused_whole_segments(q, k, v, mq, sink_k, sink_v, cos, sin, M, z, gate,
                         scaling: float, segment_len: int, xl_window: bool, opens: bool = False) -> torch.Tensor:
    """Local attention, memory read and gate of S whole segments at once; with `opens`
    (xl_window only), a document's first S: the sinks are the first segment's first
    tokens, and the first two segments read no memory, as `InfiniAttention` reads them.

    q, mq [B, Hq, S*N, D], before RoPE. k, v [B, Hkv, (S+1)*N, D] with xl_window (the
    segment before the first, then the S segments), else [B, Hkv, S*N, D]: each key rotated
    at its place in its own segment's window (P + N + j with xl_window, else P + j, for
    P sinks). sink_k, sink_v [B, Hkv, P, D], the sink keys rotated at 0..P-1. cos, sin of
    the window's positions, and with xl_window N more (the queries' for the segment
    before). M [B, Hkv, S, D, D], z [B, Hkv, S, D]: the memory each segment reads.
    Returns [B, Hq, S*N, D], a view of a [B, S*N, Hq, D] tensor (o_proj's layout).
    """
    b, hq, t, d = q.shape
    hkv, n, p = k.shape[1], segment_len, sink_k.shape[2]
    s = t // n
    if (t != s * n or (opens and not xl_window) or d & (d - 1) or d < 16 or hq % hkv
            or k.shape[2] != t + (n if xl_window else 0) or cos.shape[0] < p + (3 if xl_window else 1) * n):
        raise ValueError(f"whole segments of {n} tokens (keys: one more with xl_window, which a document's "
                         f"first block needs), RoPE of the window and "
                         f"one segment more, a power-of-two head_dim >= 16 and grouped heads are needed (got "
                         f"{t} queries, {k.shape[2]} keys, {cos.shape[0]} positions, head_dim {d}, {hq}/{hkv} heads)")
    q = q if q.stride(-1) == 1 else q.contiguous()
    mq = mq if mq.stride(-1) == 1 else mq.contiguous()
    k, v = _same_layout(k, v)
    sink_k, sink_v = _same_layout(sink_k, sink_v)
    cos, sin, M, z = (x.contiguous() for x in (cos, sin, M.float(), z.float()))
    out = torch.empty(b, t, hq, d, dtype=q.dtype, device=q.device)
    # small segments (tests) take small tiles; tl.dot wants every side >= 16
    bm = min(TILES["BM"], max(16, triton.next_power_of_2(n) // 2))
    bn = min(TILES["BN"], bm)
    fp32 = q.dtype == torch.float32
    grid = (s * triton.cdiv(n, bm), b * hq)
    _segments_kernel[grid](
        q, k, v, mq, sink_k, sink_v, cos, sin, M, z, gate, out,
        q.stride(0), q.stride(1), q.stride(2), mq.stride(0), mq.stride(1), mq.stride(2),
        k.stride(0), k.stride(1), k.stride(2), sink_k.stride(0), sink_k.stride(1), sink_k.stride(2),
        n, s, p, hq, hq // hkv, scaling * math.log2(math.e), EPS,
        D=d, BM=bm, BN=bn, BP=max(16, triton.next_power_of_2(p)), XL=xl_window, EVEN=n % bn == 0,
        PRECISION="ieee" if fp32 else "tf32", MEMORY_PRECISION=fp32_dot_precision(q), DOT_F32=not q.is_cuda,
        OPENS=opens,
        num_warps=TILES["num_warps"], num_stages=TILES["num_stages"],
    )
    return out.transpose(1, 2)


_works: dict[tuple, bool] = {}  # what `kernel_works` found, per device and shape


def kernel_works(device: torch.device, dtype: torch.dtype, head_dim: int, segment_len: int, xl_window: bool,
                 may_try: bool = True) -> bool:
    """Whether the kernel (and the memory scan beside it, `scan_states`) builds and runs
    here for these shapes, tried once per process on a block of two segments: on a GPU
    that Triton cannot build them for (too little shared memory for its tiles, say),
    documents read through the torch path rather than fail.
    Without `may_try` (while a CUDA graph is captured) an untried kernel counts as not working."""
    key = (str(device), dtype, head_dim, segment_len, xl_window)
    if key not in _works:
        if not may_try:
            return False
        n, p = segment_len, 4
        rand = lambda *shape: torch.randn(*shape, device=device).to(dtype)
        keys = 3 * n if xl_window else 2 * n
        memory = (torch.rand(1, 1, head_dim, head_dim, device=device), torch.rand(1, 1, head_dim, device=device) + 1)
        try:
            out = fused_whole_segments(
                rand(1, 1, 2 * n, head_dim), rand(1, 1, keys, head_dim), rand(1, 1, keys, head_dim),
                rand(1, 1, 2 * n, head_dim), rand(1, 1, p, head_dim), rand(1, 1, p, head_dim),
                rand(p + 3 * n, head_dim), rand(p + 3 * n, head_dim),
                torch.rand(1, 1, 2, head_dim, head_dim, device=device), torch.rand(1, 1, 2, head_dim, device=device) + 1,
                rand(1), head_dim ** -0.5, n, xl_window)
            reads_M, _, after_M, _ = scan_states(rand(1, 1, 2 * n, head_dim), rand(1, 1, 2 * n, head_dim), n, "delta",
                                                 memory, lead=memory)
            _works[key] = bool(torch.isfinite(out).all() and torch.isfinite(reads_M).all()
                               and torch.isfinite(after_M).all())
        except Exception as error:  # (triton's compiler and driver raise many kinds)
            log.warning("the Triton window kernel does not run here (%s: %s); reading with the torch path",
                        type(error).__name__, error)
            _works[key] = False
    return _works[key]
