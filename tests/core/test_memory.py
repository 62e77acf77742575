"""Every implementation of the memory op against naive.py, and naive.py against the equations."""

import pytest
import torch

from infini_core.memory import RULES, chunk_infini_memory, infini_memory, naive_infini_memory

IMPLS = {"chunk": chunk_infini_memory}


def inputs(b, hq, hkv, t, dk, dv, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: (torch.randn(*shape, generator=g) * scale).to(dtype).requires_grad_()
    return make(b, hq, t, dk), make(b, hkv, t, dk), make(b, hkv, t, dv)


def test_naive_matches_the_equations_written_out():
    """Two segments of one head, computed with plain loops over tokens."""
    q, k, v = (x.detach() for x in inputs(1, 1, 1, 5, 3, 2))
    for rule in RULES:
        out, (M, z) = naive_infini_memory(q, k, v, segment_len=3, rule=rule)
        s = lambda x: torch.where(x > 0, x + 1, torch.exp(x))  # elu(x) + 1
        Mr, zr = torch.zeros(3, 2), torch.zeros(3)
        expect = []
        for seg in (range(0, 3), range(3, 5)):
            for t in seg:
                sq = s(q[0, 0, t])
                den = sq @ zr
                expect.append(torch.zeros(2) if den == 0 else (sq @ Mr) / den)
            dM, dz = torch.zeros(3, 2), torch.zeros(3)
            for t in seg:
                sk = s(k[0, 0, t])
                val = v[0, 0, t] - ((sk @ Mr) / (sk @ zr) if rule == "delta" and (sk @ zr) > 0 else 0)
                dM += torch.outer(sk, val)
                dz += sk
            Mr, zr = Mr + dM, zr + dz
        torch.testing.assert_close(out[0, 0], torch.stack(expect), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(M[0, 0], Mr, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(z[0, 0], zr)
        # the first segment reads an empty memory: exactly 0
        assert torch.equal(out[0, 0, :3], torch.zeros(3, 2))


SHAPES = [  # (batch, q heads, kv heads, tokens, head dim, segment length)
    (2, 6, 2, 37, 48, 7),     # GQA 3:1, partial last segment
    (1, 3, 3, 200, 64, 100),  # two whole segments
    (1, 4, 2, 13, 80, 1),     # one token per segment
    (2, 3, 1, 250, 64, 100),  # partial last segment of 50
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_naive_fp32_outputs_state_and_gradients(impl, rule, shape):
    b, hq, hkv, t, d, n = shape
    q, k, v = inputs(b, hq, hkv, t, d, d)
    M0 = torch.rand(b, hkv, d, d, requires_grad=True)
    z0 = torch.rand(b, hkv, d, requires_grad=True)
    results = []
    for fn in (naive_infini_memory, IMPLS[impl]):
        out, (M, z) = fn(q, k, v, n, rule, (M0, z0))
        loss = out.square().sum() + (M * torch.linspace(-1, 1, d)).sum() + z.sum()
        grads = torch.autograd.grad(loss, (q, k, v, M0, z0))
        results.append((out, M, z, grads))
    (o1, M1, z1, g1), (o2, M2, z2, g2) = results
    close = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o2, o1, **close)
    # M sums hundreds of terms: the reference's own fp32 error against float64 is ~1.5e-4 here
    torch.testing.assert_close(M2, M1, atol=3e-4, rtol=1e-5)
    torch.testing.assert_close(z2, z1, atol=1e-4, rtol=1e-5)
    for name, a, b_ in zip("q k v M0 z0".split(), g1, g2):
        torch.testing.assert_close(b_, a, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", RULES)
def test_matches_naive_bf16(impl, rule):
    q, k, v = inputs(2, 6, 2, 61, 64, 64, dtype=torch.bfloat16)
    outs = []
    for fn in (naive_infini_memory, IMPLS[impl]):
        out, (M, z) = fn(q, k, v, 16, rule)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        assert out.dtype == torch.bfloat16 and M.dtype == torch.float32  # fp32 accumulation
        outs.append((out.float(), M, z, grads))
    (o1, M1, z1, g1), (o2, M2, z2, g2) = outs
    torch.testing.assert_close(o2, o1, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(M2, M1, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(z2, z1, atol=1e-3, rtol=1e-4)
    for a, b_ in zip(g1, g2):
        torch.testing.assert_close(b_.float(), a.float(), atol=5e-2, rtol=2e-2)


@pytest.mark.parametrize("rule", RULES)
def test_chunk_matches_naive_over_many_segments(rule):
    """The delta rule's scan runs in log2(segments) doubling steps: 131 segments (not a power
    of two) from a non-empty state agree with the segment-by-segment reference."""
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(1, 4, 131 * 8 + 5, 32, generator=g) * 2 for _ in range(2))
    v = torch.randn(1, 2, 131 * 8 + 5, 32, generator=g)
    k = k[:, :2]
    start = naive_infini_memory(q[:, :, :16], k[:, :, :16], v[:, :, :16], 8, rule)[1]
    o1, (M1, z1) = naive_infini_memory(q, k, v, 8, rule, start)
    o2, (M2, z2) = chunk_infini_memory(q, k, v, 8, rule, start)
    torch.testing.assert_close(o2, o1, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(M2, M1, atol=1e-3, rtol=1e-4)  # M sums a thousand terms
    torch.testing.assert_close(z2, z1)


def test_continuing_from_a_state_equals_one_pass():
    q, k, v = (x.detach() for x in inputs(1, 4, 2, 70, 32, 32))
    for rule in RULES:
        whole, (M, z) = chunk_infini_memory(q, k, v, 10, rule)
        a, state = naive_infini_memory(q[:, :, :30], k[:, :, :30], v[:, :, :30], 10, rule)
        b, (M2, z2) = chunk_infini_memory(q[:, :, 30:], k[:, :, 30:], v[:, :, 30:], 10, rule, state)
        torch.testing.assert_close(torch.cat([a, b], 2), whole)
        torch.testing.assert_close(M2, M, atol=1e-4, rtol=1e-5)


def extreme(kind, shape, g):
    x = torch.randn(*shape, generator=g)
    return {
        "zeros": torch.zeros(shape),
        "huge": x * 1e4,
        "tiny": x * 1e-30,
        "very_negative": -1e6 - x.abs(),  # sigma underflows to exactly 0
        "mixed": torch.where(x > 0, x * 1e5, -1e5 * x.abs()),
    }[kind]


@pytest.mark.parametrize("kind", ["zeros", "huge", "tiny", "very_negative", "mixed"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("impl", ["naive", "chunk"])
def test_no_nan_or_inf_over_1000_segments(kind, rule, impl):
    g = torch.Generator().manual_seed(1)
    shape_q, shape_kv = (1, 2, 2000, 16), (1, 1, 2000, 16)
    q, k = extreme(kind, shape_q, g), extreme(kind, shape_kv, g)
    v = torch.randn(shape_kv, generator=g) * 100
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    out, (M, z) = infini_memory(q, k, v, segment_len=2, rule=rule, impl=impl)
    out.sum().backward()
    for t in (out, M, z, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()


def test_dispatch_rejects_bad_arguments():
    q, k, v = inputs(1, 2, 2, 4, 8, 8)
    with pytest.raises(ValueError, match="rule"):
        infini_memory(q, k, v, 2, rule="quadratic")
    with pytest.raises(ValueError, match="segment_len"):
        infini_memory(q, k, v, 0)
    with pytest.raises(ValueError, match="KV heads"):
        naive_infini_memory(inputs(1, 3, 2, 4, 8, 8)[0], k, v, 2)
