"""The retrofit against Hugging Face's own forward, and its training-readiness."""

import copy

import pytest
import torch

from infini_core import InfiniConfig, convert_to_infini, gate_parameters, memory_parameters
from infini_core.attention import InfiniAttention
from infini_core.stream import forward, new_layer_states
from tests.tiny_models import ARCHS, VOCAB, tiny_model

CONFIGS = {"default": InfiniConfig(segment_len=32), "paper": InfiniConfig.paper(segment_len=32, rule="linear")}


def ids(batch, length, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("variant", CONFIGS)
def test_closed_gate_within_one_segment_equals_hugging_face(arch, variant):
    base = tiny_model(arch)
    x = ids(2, 30)  # longer than gemma3's sliding window of 6
    with torch.no_grad():
        expected = base(x).logits
        got = convert_to_infini(copy.deepcopy(base), CONFIGS[variant])(x).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_local_attention_per_segment_equals_hugging_face_on_that_window(arch):
    """Gate closed: segment s sees itself (paper) or also segment s-1 and the document's
    first tokens (xl_window, attention sinks), exactly what Hugging Face computes on that
    window alone. One layer, because in a deeper model the previous segment's keys carry
    its own predecessor's context."""
    base = tiny_model(arch, num_hidden_layers=1)
    n, x = 8, ids(1, 40)
    with torch.no_grad():
        paper = convert_to_infini(copy.deepcopy(base), InfiniConfig.paper(segment_len=n, gate_init=-30))(x).logits
        xl = convert_to_infini(copy.deepcopy(base), InfiniConfig(segment_len=n, gate_init=-30))(x).logits
        for s in range(0, 40, n):
            torch.testing.assert_close(paper[:, s:s + n], base(x[:, s:s + n]).logits, atol=1e-5, rtol=0)
            start = max(0, s - n)
            sinks = x[:, :InfiniConfig.sink_tokens] if start > 0 else x[:, :0]
            window = torch.cat([sinks, x[:, start:s + n]], 1)
            torch.testing.assert_close(xl[:, s:s + n], base(window).logits[:, -n:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_hugging_face_builds_no_attention_mask_for_our_layers(arch):
    """Our layers mask for themselves. A mask Hugging Face built for them would be wasted:
    under CUDA-graph capture it materialised a [T, T] mask in every replayed block."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    base, built = tiny_model(arch), []
    converted = convert_to_infini(copy.deepcopy(base))
    spied = {name: ALL_MASK_ATTENTION_FUNCTIONS[name] for name in ("sdpa", "eager")}
    for name, make in spied.items():  # (a local override of the registry, deleted after)
        ALL_MASK_ATTENTION_FUNCTIONS[name] = lambda *a, _make=make, **k: built.append(1) or _make(*a, **k)
    try:
        with torch.no_grad():
            base(ids(1, 30))
            assert built, "the spy sees the masks of an unconverted model"
            built.clear()
            converted(ids(1, 30))
    finally:
        for name in spied:
            del ALL_MASK_ATTENTION_FUNCTIONS[name]
    assert built == []


def randomize_adapter(model, seed=0):
    """Trained-looking memory parameters: open gates, non-zero low-rank deltas."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in memory_parameters(model).values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_two_segments_read_exactly_as_hugging_face_whatever_the_adapter(arch):
    """With the XL window the memory only takes a segment once it leaves the window, so a
    text of two segments never reads the memory: the base model's logits, gates open.
    The third segment does read it (so this test can tell the difference)."""
    base = tiny_model(arch)
    n = 8
    model = convert_to_infini(copy.deepcopy(base), InfiniConfig(segment_len=n))
    randomize_adapter(model)
    x = ids(2, 3 * n)
    with torch.no_grad():
        torch.testing.assert_close(model(x[:, :2 * n]).logits, base(x[:, :2 * n]).logits, atol=1e-5, rtol=0)
        third = model(x).logits[:, 2 * n:]
        alone = convert_to_infini(copy.deepcopy(base), InfiniConfig(segment_len=n, gate_init=-30))(x).logits[:, 2 * n:]
    assert (third - alone).abs().max() > 1e-2


@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_memory_takes_a_segment_when_it_leaves_the_window(rule):
    """After k segments the memory read next holds segments 0..k-2; the newest waits in
    (M_next, z_next): the same op applied one segment later, in the piece path and the
    whole-segments path alike."""
    n = 8
    model = convert_to_infini(tiny_model("llama"), InfiniConfig(segment_len=n, rule=rule))
    randomize_adapter(model)
    x = ids(1, 5 * n)
    with torch.no_grad():
        states = {}
        for k in (1, 2, 5):
            states[k] = new_layer_states(model)
            forward(model, x[:, :k * n], states[k])
        pieces = new_layer_states(model)
        for k in range(5):
            forward(model, x[:, k * n:(k + 1) * n], pieces)
    for one, two, five, one_by_one in zip(states[1], states[2], states[5], pieces):
        assert one.M.abs().max() == 0 and one.M_next.abs().max() > 0
        torch.testing.assert_close(two.M, one.M_next, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(two.z, one.z_next, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(five.M, one_by_one.M, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(five.M_next, one_by_one.M_next, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rule", ["linear", "delta"])
def test_a_documents_first_two_segments_at_once_read_as_one_by_one(arch, rule):
    """A document's first two segments read in one piece (plain causal attention, then both
    written) give what reading them one at a time gives: outputs and every tensor of the state."""
    from infini_core.state import LAYER_TENSORS

    n = 8
    model = convert_to_infini(tiny_model(arch), InfiniConfig(segment_len=n, rule=rule))
    randomize_adapter(model)
    x = ids(2, 2 * n + 3)
    with torch.no_grad():
        together, apart = new_layer_states(model), new_layer_states(model)
        whole = forward(model, x, together)
        pieces = torch.cat([forward(model, x[:, a:b], apart) for a, b in [(0, n), (n, 2 * n), (2 * n, 2 * n + 3)]], 1)
    torch.testing.assert_close(whole, pieces, atol=1e-5, rtol=0)
    for a, b in zip(together, apart):
        assert a.segments == b.segments == (2 if b.M is not None else 0)  # (gemma3's sliding layers count none)
        for name in LAYER_TENSORS:
            if getattr(b, name) is not None:
                torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("rule", ["linear", "delta"])
@pytest.mark.parametrize("xl_window", [True, False])
def test_streaming_in_pieces_equals_one_pass(arch, rule, xl_window):
    """One pass (whole segments at once through the dispatch op), uneven pieces and
    token-by-token decoding (segment by segment through naive.py's primitives) agree."""
    model = convert_to_infini(tiny_model(arch), InfiniConfig(segment_len=8, rule=rule, xl_window=xl_window, gate_init=0.0))
    x = ids(2, 61)
    with torch.no_grad():
        whole = model(x).logits
        pieces_state, tokens_state = new_layer_states(model), new_layer_states(model)
        pieces = [forward(model, x[:, a:b], pieces_state) for a, b in [(0, 5), (5, 13), (13, 14), (14, 40), (40, 61)]]
        tokens = [forward(model, x[:, i:i + 1], tokens_state) for i in range(61)]
    torch.testing.assert_close(torch.cat(pieces, 1), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(tokens, 1), whole, atol=1e-5, rtol=0)
    for a, b in zip(pieces_state, tokens_state):
        if a.M is not None:
            torch.testing.assert_close(a.M, b.M, atol=1e-4, rtol=1e-5)
            torch.testing.assert_close(a.z, b.z, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("variant", CONFIGS)
def test_open_gate_backpropagates_through_time(variant):
    """A loss on the last segment reaches the first segment's keys through the memory."""
    cfg = CONFIGS[variant]
    model = convert_to_infini(tiny_model("llama"), InfiniConfig(**{**cfg.__dict__, "segment_len": 8, "gate_init": 0.0}))
    x = ids(1, 32)
    embeds = model.get_input_embeddings()(x).detach().requires_grad_()
    key_outputs = []

    def keep_keys(module, inputs, out):
        out.retain_grad()
        key_outputs.append(out)

    # the memory's keys are k_proj's output (plus a low-rank delta when it has its own)
    hook = model.model.layers[0].self_attn.k_proj.register_forward_hook(keep_keys)
    logits = model(inputs_embeds=embeds).logits
    hook.remove()
    logits[:, 24:].logsumexp(-1).sum().backward()  # the 4th segment only
    first_keys_grad = key_outputs[0].grad[:, :8]
    assert first_keys_grad.abs().sum() > 0
    # segment 0 lies beyond what two layers of xl windows reach: only the memory carries it
    assert embeds.grad[:, :8].abs().sum() > 0
    for gate in gate_parameters(model):
        assert gate.grad is not None and gate.grad.abs().sum() > 0


def test_memory_parameters_are_separately_addressable():
    model = convert_to_infini(tiny_model("llama"), InfiniConfig())
    names = set(memory_parameters(model))
    owner = lambda name: next(part for part in name.split(".") if part.startswith("memory_"))
    assert {owner(n) for n in names} == {"memory_gate", "memory_tau", "memory_q_lora", "memory_k_lora"}
    # low rank: the memory's Q/K deltas are far smaller than the projections they adjust
    lora = sum(p.numel() for n, p in memory_parameters(model).items() if "_lora" in n)
    qk = sum(l.self_attn.q_proj.weight.numel() + l.self_attn.k_proj.weight.numel() for l in model.model.layers)
    assert lora == 2 * 32 * (96 + 96 + 96 + 32) and lora < qk * 2
    assert len(gate_parameters(model)) == 2
    paper = convert_to_infini(tiny_model("llama"), InfiniConfig.paper())
    assert {n.rsplit(".", 1)[-1] for n in memory_parameters(paper)} == {"memory_gate"}


def test_gemma3_memory_only_on_global_layers():
    model = convert_to_infini(tiny_model("gemma3"), InfiniConfig())
    kinds = [(attn.has_memory, attn.sliding_window) for attn in (l.self_attn for l in model.model.layers)]
    assert kinds == [(False, 6), (True, None), (False, 6), (True, None)]


def test_no_nan_or_inf_over_1000_segments_of_extreme_inputs():
    model = convert_to_infini(tiny_model("llama"), InfiniConfig(segment_len=2, gate_init=3.0))
    x = ids(1, 2000)
    embeds = (model.get_input_embeddings()(x) * 1e4).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    logits[:, -2:].sum().backward()
    assert torch.isfinite(logits).all() and torch.isfinite(embeds.grad).all()


def test_refuses_what_it_cannot_do():
    model = convert_to_infini(tiny_model("llama"), InfiniConfig())
    with pytest.raises(ValueError, match="already converted"):
        convert_to_infini(model)
    with pytest.raises(RuntimeError, match="keeps its own state"):
        model(ids(1, 4), use_cache=True)
    with pytest.raises(ValueError, match="rule"):
        InfiniConfig(rule="quadratic")
    assert all(isinstance(l.self_attn, InfiniAttention) for l in model.model.layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_first_segment_is_the_base_model_whatever_the_gate(arch):
    """Default: an empty memory takes no share of the output, so a text within the first
    segment is read as the base model reads it even with a trained (open) gate; the
    paper's formulation scales it by 1 - gate."""
    base = tiny_model(arch)
    x = ids(1, 30)
    with torch.no_grad():
        expected = base(x).logits
        ours = convert_to_infini(copy.deepcopy(base), InfiniConfig(segment_len=32, gate_init=2.0))(x).logits
        paper = convert_to_infini(copy.deepcopy(base), InfiniConfig.paper(segment_len=32, gate_init=2.0))(x).logits
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)
    assert (paper - expected).abs().max() > 1e-2
