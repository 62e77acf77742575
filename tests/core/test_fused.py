"""The Triton kernels (fused.py) against naive.py: outputs, final state, gradients.

Without a GPU the kernels run on CPU under TRITON_INTERPRET=1 (slow: shapes stay small).
With one, the same comparisons run compiled on cuda, plus one longer input.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and "triton" not in sys.modules:
    # read whenever @triton.jit decorates a function, triton's own helpers included:
    # it must be set before triton is first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from infini_core import memory  # noqa: E402
from infini_core.memory import RULES, chunk_infini_memory, infini_memory, naive_infini_memory  # noqa: E402
from infini_core.memory.fused import fused_infini_memory  # noqa: E402


def _interpreter_ready() -> bool:
    """False when another test module imported triton without the interpreter first."""
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.zeros, InterpretedFunction)


IN_PROCESS = CUDA or _interpreter_ready()
kernels = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported without the interpreter: ran in a subprocess")


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_a_fresh_process():
    """Run this file again where TRITON_INTERPRET=1 is set before triton is imported."""
    assert "_FUSED_TEST_CHILD" not in os.environ, "the interpreter is not usable even in a fresh process"
    env = dict(os.environ, TRITON_INTERPRET="1", _FUSED_TEST_CHILD="1")
    root = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-20000:] + proc.stderr[-5000:]


DEVICE = "cuda" if CUDA else "cpu"


def inputs(b, hq, hkv, t, dk, dv, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_()
    return make(b, hq, t, dk), make(b, hkv, t, dk), make(b, hkv, t, dv)


def initial_state(b, hkv, dk, dv, seed=1):
    g = torch.Generator().manual_seed(seed)
    M0 = torch.rand(b, hkv, dk, dv, generator=g).to(DEVICE).requires_grad_()
    z0 = torch.rand(b, hkv, dk, generator=g).to(DEVICE).requires_grad_()
    return M0, z0


def run(fn, q, k, v, n, rule, state):
    """Output, final state and the gradients of a loss that uses all three."""
    out, (M, z) = fn(q, k, v, n, rule, state)
    dk, dv = M.shape[-2:]
    wM = torch.linspace(-1, 1, dk * dv, device=DEVICE).view(dk, dv)
    wz = torch.linspace(0, 2, dk, device=DEVICE)
    loss = out.float().square().sum() + (M * wM).sum() + (z * wz).sum()
    leaves = (q, k, v) + (tuple(state) if state is not None else ())
    return out, M, z, torch.autograd.grad(loss, leaves)


CASES = [  # (batch, q heads, kv heads, tokens, Dk, Dv, segment length, initial state)
    (2, 6, 2, 37, 48, 48, 7, True),      # GQA 3:1, partial last segment
    (1, 3, 3, 200, 64, 64, 100, False),  # two whole segments, empty memory
    (1, 4, 2, 13, 80, 80, 1, True),      # one token per segment, Dk padded to 128
    (2, 3, 1, 250, 64, 64, 100, True),   # partial last segment of 50
    (1, 2, 1, 45, 48, 80, 16, False),    # Dk != Dv
]


@kernels
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_naive_fp32(rule, case):
    b, hq, hkv, t, dk, dv, n, with_state = case
    q, k, v = inputs(b, hq, hkv, t, dk, dv)
    state = initial_state(b, hkv, dk, dv) if with_state else None
    o1, M1, z1, g1 = run(naive_infini_memory, q, k, v, n, rule, state)
    o2, M2, z2, g2 = run(fused_infini_memory, q, k, v, n, rule, state)
    assert o2.dtype == torch.float32 and M2.dtype == z2.dtype == torch.float32
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(M2, M1, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(z2, z1, atol=1e-4, rtol=1e-5)
    for name, a, b_ in zip("q k v M0 z0".split(), g1, g2):
        torch.testing.assert_close(b_, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


@kernels
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_matches_naive_16_bit(dtype, rule):
    q, k, v = inputs(2, 6, 2, 61, 64, 64, dtype=dtype)
    state = initial_state(2, 2, 64, 64)
    o1, M1, z1, g1 = run(naive_infini_memory, q, k, v, 16, rule, state)
    o2, M2, z2, g2 = run(fused_infini_memory, q, k, v, 16, rule, state)
    assert o2.dtype == dtype and M2.dtype == torch.float32  # fp32 accumulation
    torch.testing.assert_close(o2.float(), o1.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(M2, M1, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(z2, z1, atol=1e-3, rtol=1e-4)
    for name, a, b_ in zip("q k v M0 z0".split(), g1, g2):
        assert b_.dtype == a.dtype
        torch.testing.assert_close(b_.float(), a.float(), atol=5e-2, rtol=2e-2, msg=lambda m: f"grad {name}: {m}")


@kernels
def test_inference_path_and_streaming():
    """No grad: no per-segment states are kept; pieces with a carried state equal one pass."""
    q, k, v = (x.detach() for x in inputs(1, 4, 2, 70, 32, 32))
    for rule in RULES:
        whole, (M, z) = fused_infini_memory(q, k, v, 10, rule)
        ref, (M_ref, z_ref) = chunk_infini_memory(q, k, v, 10, rule)
        torch.testing.assert_close(whole, ref, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(M, M_ref, atol=1e-4, rtol=1e-5)
        a, state = fused_infini_memory(q[:, :, :30], k[:, :, :30], v[:, :, :30], 10, rule)
        b, (M2, z2) = fused_infini_memory(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], 10, rule, state)
        torch.testing.assert_close(torch.cat([a, b], 2), whole, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(M2, M, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(z2, z)


@kernels
def test_non_contiguous_inputs_and_long_segments():
    """[B, T, H, D] views transposed to [B, H, T, D]; a segment longer than the input."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 20, 4, 16, generator=g).to(DEVICE).transpose(1, 2)
    k, v = (torch.randn(1, 20, 2, 16, generator=g).to(DEVICE).transpose(1, 2) for _ in range(2))
    state = initial_state(1, 2, 16, 16)
    state = tuple(x.detach() for x in state)
    for rule in RULES:
        for n in (6, 10**9):
            out, (M, z) = fused_infini_memory(q, k, v, n, rule, state)
            ref, (M_ref, z_ref) = naive_infini_memory(q, k, v, n, rule, state)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(M, M_ref, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(z, z_ref)


def test_empty_input_returns_the_initial_state():
    q, k, v = inputs(1, 2, 1, 0, 16, 8)
    out, (M, z) = fused_infini_memory(q, k, v, 4, "delta")
    assert out.shape == (1, 2, 0, 8) and not M.any() and not z.any()


@kernels
@pytest.mark.parametrize("kind", ["zeros", "huge", "very_negative", "mixed"])
def test_extreme_inputs(kind):
    """Finite everywhere; where naive.py's sigma is exactly 0, so is everything here."""
    g = torch.Generator().manual_seed(1)

    def make(*shape):
        x = torch.randn(*shape, generator=g)
        x = {
            "zeros": torch.zeros(shape),
            "huge": x * 1e4,
            "very_negative": -20 - 1e4 * x.abs(),  # elu(x) + 1 rounds to exactly 0 in fp32
            "mixed": torch.where(x > 0, x * 1e5, -1e5 * x.abs()),
        }[kind]
        return x.to(DEVICE).requires_grad_()

    q, k = make(1, 2, 64, 16), make(1, 1, 64, 16)
    v = (torch.randn(1, 1, 64, 16, generator=g) * 100).to(DEVICE).requires_grad_()
    for rule in RULES:
        out, (M, z) = fused_infini_memory(q, k, v, 2, rule)
        grads = torch.autograd.grad(out.sum() + M.sum() + z.sum(), (q, k, v))
        for x in (out, M, z, *grads):
            assert torch.isfinite(x).all()
        if kind == "very_negative":
            assert not out.any() and not M.any() and not z.any()
        if kind == "zeros":  # sigma = 1 everywhere: nothing extreme, compare
            ref, (M_ref, _) = naive_infini_memory(q, k, v, 2, rule)
            torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-4)
            torch.testing.assert_close(M, M_ref, atol=1e-2, rtol=1e-5)


@kernels
def test_dispatch(monkeypatch):
    q, k, v = (x.detach() for x in inputs(1, 2, 1, 9, 16, 16))
    out, _ = infini_memory(q, k, v, 4, "linear", impl="fused")
    torch.testing.assert_close(out, naive_infini_memory(q, k, v, 4, "linear")[0], atol=1e-5, rtol=1e-4)
    called = []
    for name in ("chunk", "fused"):
        monkeypatch.setitem(memory.IMPLEMENTATIONS, name, lambda *a, name=name: called.append(name))
    infini_memory(q, k, v, 4)
    with memory.use_impl("fused"):  # what benchmarks use to pick a path through the model
        infini_memory(q, k, v, 4)
    assert called == ["chunk", "fused"]


def test_rejects_bad_arguments():
    q, k, v = inputs(1, 3, 2, 4, 16, 16)
    with pytest.raises(ValueError, match="KV heads"):
        fused_infini_memory(q, k, v, 2)
    with pytest.raises(ValueError, match="rule"):
        fused_infini_memory(q[:, :2], k, v, 2, rule="quadratic")


@kernels
@pytest.mark.skipif(not CUDA, reason="a longer input is too slow for the interpreter")
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dk", [64, 128])
def test_long_input_on_gpu(rule, dk):
    q, k, v = inputs(2, 9, 3, 4096 + 77, dk, dk, dtype=torch.bfloat16)
    state = initial_state(2, 3, dk, dk)
    o1, M1, z1, g1 = run(chunk_infini_memory, q, k, v, 512, rule, state)
    o2, M2, z2, g2 = run(fused_infini_memory, q, k, v, 512, rule, state)
    torch.testing.assert_close(o2.float(), o1.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(M2, M1, atol=1e-2, rtol=1e-4)
    torch.testing.assert_close(z2, z1, atol=1e-2, rtol=1e-5)
    for name, a, b_ in zip("q k v M0 z0".split(), g1, g2):
        torch.testing.assert_close(b_.float(), a.float(), atol=5e-2, rtol=2e-2, msg=lambda m: f"grad {name}: {m}")
