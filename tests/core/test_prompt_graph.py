"""A prompt read in padded pieces (what the CUDA graphs of answers replay) against the eager
stream: the same logits and the same state, piece by piece and across segment ends."""

import pytest
import torch

from infini_core import InfiniConfig
from infini_core.answer import answer
from infini_core.ingest import ingest
from infini_core.loading import load_model
from infini_core.prompt_graph import PromptGraphs, _Captured, bucket, capture_prompt_graphs, prompt_logits
from infini_core.state import MemoryState
from infini_core.stream import continue_stream, settle
from tests.core.test_snapshot import TEXT, assert_same_state
from tests.tiny_models import save_tiny_checkpoint


CONFIGS = {"default": InfiniConfig(segment_len=16, gate_init=0.0),
           "paper": InfiniConfig.paper(segment_len=16, gate_init=0.0)}  # no window before the segment, no sinks


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def model(request, tmp_path_factory):
    return load_model(save_tiny_checkpoint(tmp_path_factory.mktemp("tiny")), infini=CONFIGS[request.param],
                      dtype=torch.float32, device="cpu")


def test_buckets_are_powers_of_four_up_to_a_segment(model):
    assert [bucket(n, 512) for n in (1, 2, 4, 5, 16, 17, 64, 65, 300, 512)] == [1, 4, 4, 16, 16, 64, 64, 256, 512, 512]
    assert bucket(15, 16) == 16 and bucket(16, 16) == 16
    assert PromptGraphs(model, cuda_graphs=False).buckets() == [1, 4, 16]


@pytest.mark.parametrize("start", ["read", "settled", "loaded"])
def test_padded_pieces_read_as_the_eager_stream_does(model, start, tmp_path):
    """Prompts inside the segment, up to its end, across one and several segment ends, then
    one-token steps; each from the same graphs' buffers as the one before it. From a state
    as a read leaves it, settled, or loaded from its file (which stores no empty segment)."""
    state = ingest(model, TEXT)
    assert 0 < len(state.pending) < 16
    if start == "settled":
        settle(model, state)
    if start == "loaded":
        state.save(tmp_path / "doc.infini")
        state = MemoryState.load(tmp_path / "doc.infini", model.fingerprint)
        assert state.layers[0].seg_k is None
    graphs = PromptGraphs(model, cuda_graphs=False)
    for length in (3, 16 - (len(state.pending) + state.layers[0].segment_tokens) % 16, 21, 40):
        prompt = list(range(5, 5 + length))
        padded, eager = state.fork(), state.fork()
        assert graphs.fits(padded)
        with torch.no_grad():
            for ids in [prompt] + [[7]] * 20:  # 20 steps cross another segment end
                torch.testing.assert_close(graphs.read(padded, ids), continue_stream(model, eager, ids), atol=2e-5, rtol=1e-5)
                assert_same_state(padded, eager)
    assert sorted(graphs.graphs) == [1, 4, 16]


def test_states_the_buffers_do_not_fit_are_read_eagerly(model, tmp_path):
    graphs = PromptGraphs(model, cuda_graphs=False)
    short = ingest(model, list(range(5, 15)))
    settle(model, short)  # in its first segment: the memory is still empty
    assert short.layers[0].seg_k.shape[2] == 10 and not graphs.fits(short)
    assert graphs.fits(ingest(model, TEXT))
    gemma = load_model(save_tiny_checkpoint(tmp_path, arch="gemma3"), infini=InfiniConfig(segment_len=16),
                       dtype=torch.float32, device="cpu")
    assert not PromptGraphs.supports(gemma)  # sliding layers keep windows of their own length


def test_without_cuda_answers_take_the_eager_stream(model):
    state = ingest(model, TEXT)
    with torch.no_grad():
        torch.testing.assert_close(prompt_logits(model, state.fork(), [5, 6]), continue_stream(model, state.fork(), [5, 6]))
    assert not capture_prompt_graphs(model) and model.prompt_graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU (run on the device)")
def test_answers_replayed_from_cuda_graphs_equal_eager_answers(tmp_path, monkeypatch):
    """fp32 on the GPU: the captured graphs give the eager stream's logits, state and answer;
    and documents read through ingest's graphs, which share the answer graphs' memory pool,
    read as eager ones do, before and after answers replayed."""
    gpu = load_model(save_tiny_checkpoint(tmp_path), infini=InfiniConfig(segment_len=16, gate_init=0.0),
                     device="cuda", dtype=torch.float32)
    assert capture_prompt_graphs(gpu) and sorted(gpu.prompt_graphs.graphs) == [1, 4, 16]  # (as a worker starts)
    ids = torch.randint(0, 100, (24 * 16 + 5,)).tolist()  # 12 blocks of 2 segments and a rest
    read = lambda doc, graphs: ingest(gpu, doc, block_segments=2, cuda_graphs=graphs)
    first = read(ids, True)
    assert len(gpu.ingest_graphs.graphs) == 1  # (a one-off read: its blocks' graph, its start eager)
    assert_same_state(first, read(ids, False))
    state = ingest(gpu, TEXT)
    state.save(tmp_path / "doc.infini")
    loaded = MemoryState.load(tmp_path / "doc.infini", gpu.fingerprint, device="cuda")
    replays = []
    run = _Captured.run
    monkeypatch.setattr(_Captured, "run", lambda self: replays.append(self.size) or run(self))
    with torch.no_grad():
        for prompt, start in (([5, 6, 7], state), (list(range(5, 45)), state), ([5, 6, 7], loaded), ([5, 6], first)):
            graphed, eager = start.fork(), start.fork()
            torch.testing.assert_close(prompt_logits(gpu, graphed, prompt), continue_stream(gpu, eager, prompt),
                                       atol=2e-5, rtol=1e-5)
            assert_same_state(graphed, eager)
    # every piece replayed (11 tokens pending: 11 + 3 in one piece, 11 + 40 in 16 + 16 + 16 + 3; 5 + 2)
    assert replays == [16, 16, 16, 16, 4, 16, 16]
    assert_same_state(read(ids[::-1], True), read(ids[::-1], False))
    answers = [list(answer(gpu, state, "What did the keeper read?", max_new_tokens=24)) for _ in range(2)]
    gpu.prompt_graphs = False  # eager from here
    assert answers[0] == answers[1] == list(answer(gpu, state, "What did the keeper read?", max_new_tokens=24))
