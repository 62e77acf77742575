"""Triton kernels for the compressive memory, forward and backward, both rules.

Same contract and results as `naive.naive_infini_memory`.

Layout of the work: one program per (batch, KV head, block of BV value columns).
Columns of M are independent for both rules (a read sigma(x) M[:, j] / sigma(x) z needs
only column j and z), so a program keeps its slice M[:, cols] [Dk, BV] and z [Dk] in fp32
registers and walks the sequence segment by segment, in sub-chunks of BT tokens. In each
sub-chunk it reads for the G query heads of its KV head and accumulates the segment's
write; the write is added to M and z when the segment ends (read before write).

Backward: the forward saves the memory at every segment start ([S, Dk, Dv] per head,
small at training lengths), and the backward walks the segments in reverse, carrying
dM and dz. Two quantities sum over *all* columns of M: the gradient of a read's
denominator (sum_j dout_j * out_j) and everything built from it (dq, dk, dz). They are
linear in the per-column terms, so each column block writes its own partial dq/dk/dz0
and the wrapper sums them; dv and dM0 are column-local and written whole.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .naive import EPS, RULES, MemoryTensors, empty_memory

# fp32 dots everywhere (naive.py computes in fp32). On NVIDIA, tf32x3 keeps ~fp32
# accuracy on tensor cores; AMD has no tf32x3, so it gets plain fp32.
_PRECISION = "ieee" if torch.version.hip else "tf32x3"


def _precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact fp32 products (they are the accuracy reference); 16-bit
    inputs already carry more error than tf32x3 adds."""
    return "ieee" if dtype == torch.float32 else _PRECISION

# sigma(x) = elu(x) + 1 is written out inline in the kernels (a @triton.jit helper costs
# milliseconds a call under the interpreter), with ex = exp(min(x, 0)):
#     sigma = where(x > 0, x + 1, (ex - 1) + 1),  sigma' = where(x > 0, 1, ex)
# (ex - 1) + 1 is F.elu's fp32 rounding: for x below about -17 it is exactly 0, as in
# naive.py, not a tiny exp(x). The min keeps exp of the unused branch finite.


@triton.jit
def _fwd_kernel(
    q, k, v, m0, z0,  # inputs
    out, m_out, z_out, m_states, z_states,  # outputs (states: memory at each segment start)
    T, N, S, NC, G, DK: tl.constexpr, DV: tl.constexpr,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DELTA: tl.constexpr, SAVE_STATES: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)  # b * Hkv + kv head; int64: T * D can pass 2**31
    i_v = tl.program_id(1)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < DK
    mask_v = o_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    kv_off = o_k[:, None] * DV + o_v[None, :]

    M = tl.load(m0 + i_bh * DK * DV + kv_off, mask=mask_kv, other=0.0)
    z = tl.load(z0 + i_bh * DK + o_k, mask=mask_k, other=0.0)
    k_base = k + i_bh * T * DK
    v_base = v + i_bh * T * DV
    for s in range(S):
        if SAVE_STATES:
            tl.store(m_states + (i_bh * S + s) * DK * DV + kv_off, M, mask=mask_kv)
            if i_v == 0:  # z is the same in every column block
                tl.store(z_states + (i_bh * S + s) * DK + o_k, z, mask=mask_k)
        dM = tl.zeros([BK, BV], dtype=tl.float32)
        dz = tl.zeros([BK], dtype=tl.float32)
        for c in range(NC):
            t = s * N + c * BT + o_t
            mask_t = (t < s * N + N) & (t < T)
            mask_tk = mask_t[:, None] & mask_k[None, :]
            mask_tv = mask_t[:, None] & mask_v[None, :]
            for g in range(G):
                i_h = i_bh * G + g  # query head reading this memory
                x = tl.load(q + i_h * T * DK + t[:, None] * DK + o_k[None, :], mask=mask_tk, other=0.0)
                x = x.to(tl.float32)
                ex = tl.exp(tl.minimum(x, 0.0))
                sq = tl.where(mask_tk, tl.where(x > 0, x + 1.0, (ex - 1.0) + 1.0), 0.0)
                num = tl.dot(sq, M, input_precision=PRECISION)
                den = tl.sum(sq * z[None, :], 1)
                o = num / tl.maximum(den, EPS)[:, None]
                tl.store(out + i_h * T * DV + t[:, None] * DV + o_v[None, :],
                         o.to(out.dtype.element_ty), mask=mask_tv)
            x = tl.load(k_base + t[:, None] * DK + o_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
            ex = tl.exp(tl.minimum(x, 0.0))
            sk = tl.where(mask_tk, tl.where(x > 0, x + 1.0, (ex - 1.0) + 1.0), 0.0)
            val = tl.load(v_base + t[:, None] * DV + o_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)
            if DELTA:
                # write only what the memory does not already return for these keys
                den = tl.maximum(tl.sum(sk * z[None, :], 1), EPS)
                val -= tl.dot(sk, M, input_precision=PRECISION) / den[:, None]
            dM += tl.dot(tl.trans(sk), val, input_precision=PRECISION)
            dz += tl.sum(sk, 0)
        M += dM
        z += dz
    tl.store(m_out + i_bh * DK * DV + kv_off, M, mask=mask_kv)
    if i_v == 0:
        tl.store(z_out + i_bh * DK + o_k, z, mask=mask_k)


@triton.jit
def _bwd_kernel(
    q, k, v, m_states, z_states, d_out, d_m, d_z,  # inputs
    dq, dk, dv, dm0, dz0,  # outputs; dq, dk, dz0 are partial sums per column block
    T, N, S, NC, G, DK: tl.constexpr, DV: tl.constexpr, NBH,
    BT: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
    DELTA: tl.constexpr, EPS: tl.constexpr, PRECISION: tl.constexpr,
):
    i_bh = tl.program_id(0).to(tl.int64)
    i_v = tl.program_id(1)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    mask_k = o_k < DK
    mask_v = o_v < DV
    mask_kv = mask_k[:, None] & mask_v[None, :]
    kv_off = o_k[:, None] * DV + o_v[None, :]

    # gradient w.r.t. the state after the current segment; the dz of the final state
    # goes to column block 0 only, so that the partial sums add up to it once
    dM = tl.load(d_m + i_bh * DK * DV + kv_off, mask=mask_kv, other=0.0)
    dz = tl.load(d_z + i_bh * DK + o_k, mask=mask_k, other=0.0)
    dz = tl.where(i_v == 0, dz, 0.0)
    k_base = k + i_bh * T * DK
    v_base = v + i_bh * T * DV
    dk_base = dk + (i_v * NBH + i_bh) * T * DK
    dv_base = dv + i_bh * T * DV
    for i in range(S):
        s = S - 1 - i
        M = tl.load(m_states + (i_bh * S + s) * DK * DV + kv_off, mask=mask_kv, other=0.0)
        z = tl.load(z_states + (i_bh * S + s) * DK + o_k, mask=mask_k, other=0.0)
        dM_seg = tl.zeros([BK, BV], dtype=tl.float32)
        dz_seg = tl.zeros([BK], dtype=tl.float32)
        for c in range(NC):
            t = s * N + c * BT + o_t
            mask_t = (t < s * N + N) & (t < T)
            mask_tk = mask_t[:, None] & mask_k[None, :]
            mask_tv = mask_t[:, None] & mask_v[None, :]
            # reads: out = num / den, num = sq M, den = max(sq z, EPS)
            for g in range(G):
                i_h = i_bh * G + g
                x = tl.load(q + i_h * T * DK + t[:, None] * DK + o_k[None, :], mask=mask_tk, other=0.0)
                x = x.to(tl.float32)
                ex = tl.exp(tl.minimum(x, 0.0))
                sq = tl.where(mask_tk, tl.where(x > 0, x + 1.0, (ex - 1.0) + 1.0), 0.0)
                do = tl.load(d_out + i_h * T * DV + t[:, None] * DV + o_v[None, :],
                             mask=mask_tv, other=0.0).to(tl.float32)
                den_raw = tl.sum(sq * z[None, :], 1)
                den = tl.maximum(den_raw, EPS)
                o = tl.dot(sq, M, input_precision=PRECISION) / den[:, None]
                dnum = do / den[:, None]
                # clamp_min passes the gradient where den_raw >= EPS, as torch's does
                dden = tl.where(den_raw >= EPS, -tl.sum(do * o, 1) / den, 0.0)
                dsq = tl.dot(dnum, tl.trans(M), input_precision=PRECISION) + dden[:, None] * z[None, :]
                tl.store(dq + (i_v * NBH * G + i_h) * T * DK + t[:, None] * DK + o_k[None, :],
                         dsq * tl.where(x > 0, 1.0, ex), mask=mask_tk)
                dM_seg += tl.dot(tl.trans(sq), dnum, input_precision=PRECISION)
                dz_seg += tl.sum(dden[:, None] * sq, 0)
            # write: M' = M + sk^T u (u = v, or v - r for delta), z' = z + sum sk
            x = tl.load(k_base + t[:, None] * DK + o_k[None, :], mask=mask_tk, other=0.0).to(tl.float32)
            ex = tl.exp(tl.minimum(x, 0.0))
            sk = tl.where(mask_tk, tl.where(x > 0, x + 1.0, (ex - 1.0) + 1.0), 0.0)
            val = tl.load(v_base + t[:, None] * DV + o_v[None, :], mask=mask_tv, other=0.0).to(tl.float32)
            du = tl.dot(sk, dM, input_precision=PRECISION)
            tl.store(dv_base + t[:, None] * DV + o_v[None, :], du, mask=mask_tv)
            if DELTA:
                # r = sk M / e, e = max(sk z, EPS); dr = -du
                e_raw = tl.sum(sk * z[None, :], 1)
                e = tl.maximum(e_raw, EPS)
                r = tl.dot(sk, M, input_precision=PRECISION) / e[:, None]
                dnum = -du / e[:, None]
                de = tl.where(e_raw >= EPS, tl.sum(du * r, 1) / e, 0.0)
                dsk = tl.dot(val - r, tl.trans(dM), input_precision=PRECISION)
                dsk += tl.dot(dnum, tl.trans(M), input_precision=PRECISION) + de[:, None] * z[None, :]
                dM_seg += tl.dot(tl.trans(sk), dnum, input_precision=PRECISION)
                dz_seg += tl.sum(de[:, None] * sk, 0)
            else:
                dsk = tl.dot(val, tl.trans(dM), input_precision=PRECISION)
            dsk += dz[None, :]  # every key of the segment was added to z
            tl.store(dk_base + t[:, None] * DK + o_k[None, :], dsk * tl.where(x > 0, 1.0, ex), mask=mask_tk)
        dM += dM_seg
        dz += dz_seg
    tl.store(dm0 + i_bh * DK * DV + kv_off, dM, mask=mask_kv)
    tl.store(dz0 + (i_v * NBH + i_bh) * DK + o_k, dz, mask=mask_k)


def _tiles(dk: int, dv: int, backward: bool) -> tuple[int, int, int]:
    """(BT, BK, BV): tl.dot wants every side >= 16. Chosen so that sm_90 builds do not
    spill registers (checked with ptxas, bf16 and fp32, Dk 64 and 128); not timed."""
    bk = max(16, triton.next_power_of_2(dk))
    bt = 16 if backward else 32
    bv = 32 if bk <= 64 else 16
    return bt, bk, max(16, min(bv, triton.next_power_of_2(dv)))


_NUM_WARPS = 8


def _chunks(segment_len: int, t: int, bt: int) -> int:
    # sub-chunks per segment; a segment longer than the input has only t tokens
    return triton.cdiv(min(segment_len, t), bt)


def _on_device(x: torch.Tensor):
    """Launch on x's GPU, not whichever is current (a no-op on CPU / the interpreter)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _forward(q, k, v, M0, z0, segment_len, rule, save_states):
    b, hq, t, dk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    bt, bk, bv = _tiles(dk, dv, backward=False)
    s = triton.cdiv(t, segment_len)
    out = torch.empty(b, hq, t, dv, dtype=q.dtype, device=q.device)
    M = torch.empty(b, hkv, dk, dv, dtype=torch.float32, device=q.device)
    z = torch.empty(b, hkv, dk, dtype=torch.float32, device=q.device)
    if save_states:
        m_states = torch.empty(b, hkv, s, dk, dv, dtype=torch.float32, device=q.device)
        z_states = torch.empty(b, hkv, s, dk, dtype=torch.float32, device=q.device)
    else:  # never touched: SAVE_STATES is a constexpr
        m_states = z_states = M
    grid = (b * hkv, triton.cdiv(dv, bv))
    _fwd_kernel[grid](
        q, k, v, M0, z0, out, M, z, m_states, z_states,
        t, segment_len, s, _chunks(segment_len, t, bt), hq // hkv, dk, dv,
        BT=bt, BK=bk, BV=bv, DELTA=rule == "delta", SAVE_STATES=save_states, EPS=EPS, PRECISION=_precision(q.dtype),
        num_warps=_NUM_WARPS,
    )
    return out, M, z, m_states, z_states


class _FusedInfiniMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, M0, z0, segment_len, rule):
        out, M, z, m_states, z_states = _forward(q, k, v, M0, z0, segment_len, rule, save_states=True)
        ctx.save_for_backward(q, k, v, m_states, z_states)
        ctx.segment_len, ctx.rule = segment_len, rule
        return out, M, z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_out, d_M, d_z):
        q, k, v, m_states, z_states = ctx.saved_tensors
        b, hq, t, dk = q.shape
        hkv, dv = k.shape[1], v.shape[-1]
        n = ctx.segment_len
        bt, bk, bv = _tiles(dk, dv, backward=True)
        nv = triton.cdiv(dv, bv)
        f32 = dict(dtype=torch.float32, device=q.device)
        # dq, dk, dz0: one partial sum per column block (see the module docstring)
        grad_q = torch.empty(nv, b, hq, t, dk, **f32)
        grad_k = torch.empty(nv, b, hkv, t, dk, **f32)
        grad_v = torch.empty(b, hkv, t, dv, **f32)
        grad_M0 = torch.empty(b, hkv, dk, dv, **f32)
        grad_z0 = torch.empty(nv, b, hkv, dk, **f32)
        with _on_device(q):
            _bwd_kernel[(b * hkv, nv)](
                q, k, v, m_states, z_states,
                d_out.contiguous(), d_M.float().contiguous(), d_z.float().contiguous(),
                grad_q, grad_k, grad_v, grad_M0, grad_z0,
                t, n, m_states.shape[2], _chunks(n, t, bt), hq // hkv, dk, dv, b * hkv,
                BT=bt, BK=bk, BV=bv, DELTA=ctx.rule == "delta", EPS=EPS, PRECISION=_precision(q.dtype),
                num_warps=_NUM_WARPS,
            )
        return (
            grad_q.sum(0).to(q.dtype), grad_k.sum(0).to(k.dtype), grad_v.to(v.dtype),
            grad_M0, grad_z0.sum(0), None, None,
        )


def fused_infini_memory(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    segment_len: int,
    rule: str = "linear",
    initial_state: MemoryTensors | None = None,
) -> tuple[torch.Tensor, MemoryTensors]:
    """Memory read of every token and the final (M, z), with Triton kernels."""
    if rule not in RULES:
        raise ValueError(f"unknown memory rule {rule!r}; expected one of {RULES}")
    if segment_len < 1:
        raise ValueError(f"segment_len must be >= 1, got {segment_len}")
    b, hq, t, dk = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads cannot share {hkv} KV heads")
    if initial_state is None:
        initial_state = empty_memory(k, dv)
    # casts outside the autograd.Function, so autograd hands back grads in the caller's dtype
    M0, z0 = (x.float().contiguous() for x in initial_state)
    if t == 0:
        return q.new_zeros(b, hq, 0, dv), (M0, z0)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    with _on_device(q):
        if torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v, M0, z0)):
            out, M, z = _FusedInfiniMemory.apply(q, k, v, M0, z0, segment_len, rule)
        else:  # inference / ingest: no per-segment states to keep
            out, M, z, _, _ = _forward(q, k, v, M0, z0, segment_len, rule, save_states=False)
    return out, (M, z)
