"""The Triton kernels against their references: the memory op (fused.py) against naive.py
(outputs, final state, gradients), the window kernel (window_kernel.py) against the torch
path of a memory layer's whole segments, and the memory scan beside it (scan_kernel.py)
against naive.py's update, segment by segment.

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


# -- the window kernel: local attention, memory read and gate of whole segments -------------

from infini_core.attention import BlockSpec, use_window_kernel, whole_segments  # noqa: E402

WINDOW_CASES = [  # (batch, q heads, kv heads, segment length, segments, head_dim, sinks, xl window)
    (2, 6, 2, 24, 3, 16, 4, True),   # GQA 3:1; 24 queries: a whole and a partial tile of 16
    (2, 6, 2, 24, 3, 16, 4, False),  # the paper's window: the segment alone (with sinks)
    (1, 4, 4, 40, 2, 32, 0, True),   # no grouping, no sinks
    (1, 3, 1, 8, 4, 16, 3, True),    # segments shorter than one tile
    (1, 6, 2, 32, 3, 16, 4, True),   # segments of whole tiles (no masks but the diagonal's)
]


def window_inputs(b, hq, hkv, n, s, d, p, xl, dtype, seed=0):
    """whole_segments' arguments after the spec: projections in their [B, T, H, D] layout
    viewed as heads, a memory that is not empty, RoPE of the window's positions (and a
    segment more, as the kernel asks), open gates."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)
    t = n * s
    q, mq = (rand(b, t, hq, d, scale=c).transpose(1, 2) for c in (1.0, 0.5))
    k, v, mk = (rand(b, t, hkv, d, scale=c).transpose(1, 2) for c in (1.0, 1.0, 0.5))
    angles = torch.arange(p + (3 if xl else 1) * n)[:, None] / 100 ** (torch.arange(d // 2) / (d // 2))
    angles = torch.cat([angles, angles], -1)
    memory = [torch.rand(*shape, generator=g).to(DEVICE) + c for shape, c in
              (((b, hkv, d, d), 0), ((b, hkv, d), 1), ((b, hkv, d, d), 0), ((b, hkv, d), 1))]
    return (rand(hq, scale=2.0), angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype), q, k, v, mq, mk,
            rand(b, hkv, p, d), rand(b, hkv, p, d), rand(b, hkv, n, d), rand(b, hkv, n, d), *memory)


@kernels
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_window_kernel_matches_the_torch_path(case, dtype, rule):
    """Outputs (local attention with RoPE over sinks, previous segment and causal segment;
    the memory read; the gate) and the memory after the block."""
    b, hq, hkv, n, s, d, p, xl = case
    args = window_inputs(b, hq, hkv, n, s, d, p, xl, dtype)
    results = []
    for kernel in (False, True):
        spec = BlockSpec(n, rule, xl, xl, d ** -0.5, hkv, "chunk", kernel)
        with torch.no_grad():
            results.append(whole_segments(spec, *args))
    (ref, ref_memory), (got, got_memory) = results
    assert got.shape == ref.shape == (b, hq, n * s, d) and got.dtype == dtype
    # o_proj's layout without a copy
    assert got.transpose(1, 2).is_contiguous()
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, ref, **tol)
    for a, b_ in zip(got_memory, ref_memory):
        torch.testing.assert_close(a, b_, atol=1e-5, rtol=1e-5)


@kernels
def test_a_block_that_opens_a_document_reads_no_window_or_sinks():
    """A document's first block is given stand-ins for the window and the sinks that are
    never filled (`InfiniAttention._block_state`): with NaN in them its output and memory
    are those it gives with zeros there."""
    b, hq, hkv, n, s, d, p, _ = WINDOW_CASES[0]
    args = list(window_inputs(b, hq, hkv, n, s, d, p, True, torch.float32))
    args[12:16] = [torch.zeros_like(x) for x in args[12:16]]  # (an empty memory)
    spec = BlockSpec(n, "delta", True, True, d ** -0.5, hkv, "chunk", True, True)
    results = []
    for fill in (0.0, float("nan")):
        args[8:12] = [torch.full_like(x, fill) for x in args[8:12]]
        with torch.no_grad():
            results.append(whole_segments(spec, *args))
    (ref, ref_memory), (got, got_memory) = results
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    for a, b_ in zip(got_memory, ref_memory):
        torch.testing.assert_close(a, b_, atol=0, rtol=0)


SCAN_CASES = [  # (batch, kv heads, segment length, segments, Dk, Dv, dtype)
    (2, 3, 24, 5, 16, 32, torch.float32),  # a segment of a whole and a partial row tile; Dk != Dv
    (1, 1, 8, 1, 16, 16, torch.float32),  # one segment, shorter than a tile
    (1, 2, 64, 4, 64, 64, torch.bfloat16),  # the model's head size, 16-bit keys and values
]


@kernels
@pytest.mark.parametrize("tiles", ["16x64x4", "32x16x4"], ids=["default", "short-rows"])  # (rows: a segment in steps)
@pytest.mark.parametrize("lead", [False, True], ids=["unlagged", "lagged"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("case", SCAN_CASES, ids=str)
def test_scan_states_are_the_states_segment_by_segment(case, rule, lead, tiles, monkeypatch):
    """The scan beside the window kernel against naive.py's update, one segment at a time:
    the states the segments read (with a lead, the lagged memory's: the lead, then what the
    segments before the last wrote) and the memory after the block; a segment's rows
    read in one tile or in several."""
    from infini_core.memory import scan_kernel
    from infini_core.memory.naive import feature_map, memory_update
    from infini_core.memory.scan_kernel import scan_states
    from infini_core.window_kernel import set_tiles

    monkeypatch.setattr(scan_kernel, "SCAN_TILES", dict(scan_kernel.SCAN_TILES))
    set_tiles(tiles, scan_kernel.SCAN_TILES)

    b, h, n, s, dk, dv, dtype = case
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(b, h, n * s, d, generator=g).to(DEVICE, dtype) for d in (dk, dv))
    start, other = ((torch.rand(b, h, dk, dv, generator=g).to(DEVICE), torch.rand(b, h, dk, generator=g).to(DEVICE) + 1)
                    for _ in range(2))
    states = [other] if lead else []
    M, z = start
    states.append((M, z))
    for i in range(s):
        seg = slice(i * n, (i + 1) * n)
        M, z = memory_update(M, z, feature_map(k[:, :, seg]), v[:, :, seg], rule)
        states.append((M, z))
    with torch.no_grad():
        reads_M, reads_z, after_M, after_z = scan_states(k, v, n, rule, start, other if lead else None)
    assert reads_M.shape == (b, h, s, dk, dv) and after_M.shape == (b, h, 1 + lead, dk, dv)
    want_M = torch.stack([M for M, _ in states], 2)
    want_z = torch.stack([z for _, z in states], 2)
    torch.testing.assert_close(torch.cat([reads_M, after_M], 2), want_M, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(torch.cat([reads_z, after_z], 2), want_z, atol=1e-4, rtol=1e-5)


def test_scan_states_reject_what_they_cannot_scan():
    from infini_core.memory.scan_kernel import scan_states

    x, memory = torch.zeros(1, 1, 32, 16), (torch.zeros(1, 1, 16, 16), torch.zeros(1, 1, 16))
    for k, n, rule in ((x, 12, "delta"), (x, 64, "delta"), (x, 16, "sum"), (torch.zeros(1, 1, 32, 24), 16, "delta")):
        with pytest.raises(ValueError):
            scan_states(k, x, n, rule, memory)


@kernels
@pytest.mark.parametrize("extra", [0, 5], ids=["whole-segments", "and-a-piece"])
@pytest.mark.parametrize("segments", [2, 7])
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_window_kernel_reads_a_document_as_the_torch_path_does(arch, segments, extra):
    """A converted model with open gates reads a document to the same logits and state with
    the kernel as without: the kernel reads its whole segments as one block from the start
    (the first two masked as the torch path reads them, `_first_segments`), then the rest
    (`extra` tokens: whole segments go from the layer's input to its output in one
    function, `attend_block`); a second piece continues it."""
    from infini_core import InfiniConfig, convert_to_infini
    from infini_core.state import LAYER_TENSORS
    from infini_core.stream import forward, new_layer_states
    from tests.tiny_models import VOCAB, tiny_model

    model = convert_to_infini(tiny_model(arch), InfiniConfig(segment_len=16, gate_init=0.0)).to(DEVICE)
    g = torch.Generator().manual_seed(0)
    pieces = [torch.randint(0, VOCAB, (1, 16 * segments + extra), generator=g).to(DEVICE),
              torch.randint(0, VOCAB, (1, 16 * 3 - 5), generator=g).to(DEVICE)]
    read = []
    for kernel in (False, True):
        states = new_layer_states(model)
        with torch.no_grad(), use_window_kernel(kernel):
            read.append(([forward(model, x, states) for x in pieces], states))
    (ref, ref_states), (got, got_states) = read
    for a, b_ in zip(got, ref):
        torch.testing.assert_close(a, b_, atol=1e-4, rtol=1e-4)
    for a, b_ in zip(got_states, ref_states):
        assert a.segments == b_.segments
        for name in LAYER_TENSORS:
            x, y = getattr(a, name), getattr(b_, name)
            assert (x is None) == (y is None), name
            if y is not None:
                torch.testing.assert_close(x, y, atol=1e-4, rtol=1e-5, msg=name)


def test_window_kernel_only_where_it_applies():
    """Not with gradients (it has no backward), not for head sizes it cannot tile, and by
    default only for 16-bit tensors on CUDA."""
    from infini_core import InfiniConfig
    from infini_core.attention import window_kernel_applies

    x = torch.zeros(1, device=DEVICE, dtype=torch.bfloat16)
    cfg = InfiniConfig()
    with torch.no_grad():
        assert window_kernel_applies(x, 64, cfg) == CUDA
        assert not window_kernel_applies(x.float(), 64, cfg)
        assert not window_kernel_applies(x, 80, cfg) and not window_kernel_applies(x, 256, cfg)
        with use_window_kernel(True):
            assert window_kernel_applies(x.float(), 16, cfg)
        with use_window_kernel(False):
            assert not window_kernel_applies(x, 64, cfg)
    with use_window_kernel(True):
        assert not window_kernel_applies(x, 64, cfg)  # (gradients on)


@kernels
@pytest.mark.parametrize("failing", ["window", "scan"])
def test_a_kernel_that_does_not_build_leaves_the_torch_path(failing, monkeypatch, caplog):
    """Tried once per device and shape: where the window kernel and the scan beside it run
    they are taken, where triton fails to build or launch either the reads go on through
    the torch path, with a warning."""
    from infini_core import window_kernel
    from infini_core.memory import scan_kernel

    monkeypatch.setattr(window_kernel, "_works", {})
    assert window_kernel.kernel_works(torch.device(DEVICE), torch.float32, 16, 16, True)
    assert not window_kernel.kernel_works(torch.device(DEVICE), torch.float32, 32, 16, True, may_try=False)

    def fails(*args, **kwargs):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(window_kernel._segments_kernel if failing == "window" else scan_kernel._scan_kernel, "run", fails)
    assert not window_kernel.kernel_works(torch.device(DEVICE), torch.float32, 32, 16, True)
    assert "does not run here" in caplog.text and "shared memory" in caplog.text
    assert window_kernel.kernel_works(torch.device(DEVICE), torch.float32, 16, 16, True)  # (kept from before)


@pytest.mark.skipif(not CUDA, reason="ingest's CUDA graphs need a GPU")
def test_window_kernel_in_ingest_graphs_reads_as_the_torch_path(tmp_path, monkeypatch):
    """In bf16 on CUDA, ingest (compiled blocks replayed from CUDA graphs) takes the window
    kernel by default; a document read so ends in the state, and gives the next-token
    logits, that the torch path's read gives, to bf16's precision. A worker's graphs read
    a document's start in one graph of its length, as later blocks."""
    from infini_core import InfiniConfig
    from infini_core.attention import window_kernel_applies
    from infini_core.ingest import BlockGraph, capture_ingest_graphs, ingest, start_segments
    from infini_core.loading import load_model
    from infini_core.stream import continue_stream
    from tests.tiny_models import save_tiny_checkpoint

    def next_logits(state):
        with torch.no_grad():
            return continue_stream(model, state.clone(), [5, 6, 7])[0, -1].float()

    def assert_reads_alike(got, ref):
        for a, b_ in zip(got.layers, ref.layers):
            if b_.M is not None:
                for name in ("M", "z", "M_next", "z_next"):
                    x, y = getattr(a, name), getattr(b_, name)
                    assert (x - y).abs().max() <= 2e-2 * y.abs().max(), name
        torch.testing.assert_close(next_logits(got), next_logits(ref), atol=0.1, rtol=0.05)

    model = load_model(save_tiny_checkpoint(tmp_path), infini=InfiniConfig(segment_len=16, gate_init=0.0),
                       device="cuda", dtype=torch.bfloat16)
    blocks = 4
    ids = torch.randint(0, 100, ((2 + 3 * blocks) * 16 + 5,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        assert window_kernel_applies(torch.zeros(1, device="cuda", dtype=torch.bfloat16), 16, model.config)
    assert start_segments(model) == 0
    with use_window_kernel(False):
        ref = ingest(model, ids, block_segments=blocks, cuda_graphs=True)
    assert_reads_alike(ingest(model, ids, block_segments=blocks, cuda_graphs=True), ref)

    replays = []
    replay = BlockGraph.replay
    monkeypatch.setattr(BlockGraph, "replay",
                        lambda self, ids, layers: replays.append((self.first, self.segments)) or replay(self, ids, layers))
    assert capture_ingest_graphs(model, block_segments=blocks)
    for segments, through in ((3, [(True, 3)]), (2 + 3 * blocks, [(True, 4), (False, 4), (False, 4), (False, 2)])):
        replays.clear()
        doc = ids[:segments * 16 + 5]
        with use_window_kernel(False):
            ref = ingest(model, doc, block_segments=blocks, cuda_graphs=False)
        assert_reads_alike(ingest(model, doc, block_segments=blocks), ref)
        assert replays == through
