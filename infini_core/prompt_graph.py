"""A prompt's forward replayed from CUDA graphs, so that the first answer token does not
wait on the CPU. A question runs through 30 layers as about 2,200 small kernels, each
launched from Python: that, not the GPU, set the time to the first token (docs/benchmarks.md).

The shapes a CUDA graph needs are made fixed by padding: a prompt is read in pieces that
each stay inside one segment, a piece's length is rounded up to a bucket (1, 4, 16, ... up
to the segment), and every memory layer reads its window from slots of a fixed count
(`PaddedSegment`). One graph per bucket, all over the same buffers. A completed segment is
written into the memory eagerly, between pieces (at most once per segment of prompt).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from .attention import PaddedSegment, PieceIndex
from .convert import infini_layers
from .loading import InfiniModel
from .state import MemoryState
from .stream import bound, continue_stream

log = logging.getLogger(__name__)

# what a replay reads from a stream's layer; the segment's tokens go into the slots
LOADED = ("M", "z", "sink_k", "sink_v", "win_k", "win_v")
SEGMENT = ("seg_k", "seg_v", "seg_mk")


def prompt_logits(model: InfiniModel, state: MemoryState, ids: list[int]) -> torch.Tensor:
    """`continue_stream(model, state, ids)`'s logits [1, 1, V], from CUDA graphs where the
    model and state allow (on CUDA, memory layers only, the state past its first segments),
    else eagerly."""
    graphs = _graphs_of(model)
    logits = graphs.read(state, ids) if ids and graphs and graphs.fits(state) else None
    return logits if logits is not None else continue_stream(model, state, ids)


def capture_prompt_graphs(model: InfiniModel) -> bool:
    """Capture the graphs of every bucket now, as a worker does when it loads its model, so
    that no question waits for one (all six: 1.8 s on an H200). False where answers run eagerly."""
    graphs = _graphs_of(model)
    return graphs is not None and graphs.ready(set(graphs.buckets()))


def _graphs_of(model: InfiniModel) -> "PromptGraphs | None":
    if model.prompt_graphs is None and model.device.type == "cuda":
        model.prompt_graphs = PromptGraphs(model) if PromptGraphs.supports(model) else False
    return model.prompt_graphs or None


def bucket(tokens: int, segment_len: int) -> int:
    """The padded length a piece of `tokens` is read at: a power of 4, at most a segment."""
    size = 1
    while size < tokens:
        size *= 4
    return min(size, segment_len)


class PromptGraphs:
    """A model's captured graphs, one per bucket, and the buffers they all read."""

    def __init__(self, model: InfiniModel, cuda_graphs: bool = True):
        cfg, lm = model.config, model.lm
        self.model, self.cuda_graphs, self.n = model, cuda_graphs, cfg.segment_len
        sinks, window = min(cfg.sink_tokens, self.n), self.n if cfg.xl_window else 0
        self.before_segment = sinks + window  # window keys in front of the segment's
        dtype, device = next(lm.parameters()).dtype, model.device
        self.buffers = []
        for attn in infini_layers(lm):
            h, d = attn.n_kv_heads, attn.head_dim
            fp32 = dict(dtype=torch.float32, device=device)
            keys = [torch.zeros(1, h, size, d, dtype=dtype, device=device)
                    for size in (sinks, sinks, window, window, 2 * self.n, 2 * self.n, 2 * self.n)]
            self.buffers.append(PaddedSegment(torch.zeros(1, h, d, d, **fp32), torch.zeros(1, h, d, **fp32), *keys))
        # what each buffer was last loaded from: a state's tensor is replaced, never written
        # into (MemoryState.fork), so the same tensor means the same contents
        self.sources: list[dict] = [{} for _ in self.buffers]
        self.key_positions = torch.arange(self.before_segment + 2 * self.n, device=device)
        self.graphs: dict[int, _Captured] = {}

    @staticmethod
    def supports(model: InfiniModel) -> bool:
        return all(attn.has_memory for attn in infini_layers(model.lm))

    def fits(self, state: MemoryState) -> bool:
        """Whether this state's layers have the buffers' shapes: every layer past the
        segments that read an empty memory, with its sinks, a full window and less than a
        segment of tokens since."""
        lag = self.model.config.memory_lag

        def fit(tensor, buffer, name) -> bool:
            if tensor is None:  # (a loaded snapshot stores no empty tensors: segment, or no window)
                return name in SEGMENT or buffer.shape[2] == 0
            if tensor.dtype != buffer.dtype:
                return False
            if name in SEGMENT:
                return tensor.shape[2] < self.n and tensor.shape[:2] + tensor.shape[3:] == buffer.shape[:2] + buffer.shape[3:]
            return tensor.shape == buffer.shape

        return len(state.layers) == len(self.buffers) and all(
            layer.segments > lag and all(fit(getattr(layer, name), getattr(buffers, name), name) for name in LOADED + SEGMENT)
            for layer, buffers in zip(state.layers, self.buffers))

    def read(self, state: MemoryState, ids: list[int]) -> torch.Tensor | None:
        """continue_stream through the graphs: the logits after the state's pending tokens
        and `ids`, or None, the state untouched, if a graph they need failed to capture."""
        pieces = self._pieces(state, ids)
        if not self.ready({bucket(len(piece), self.n) for piece in pieces}):
            return None
        for piece in pieces:
            logits = self._piece(state, piece)
        state.pending = []
        state.tokens += len(ids)
        return logits

    def _pieces(self, state: MemoryState, ids: list[int]) -> list[list[int]]:
        """The state's pending tokens and `ids`, cut where segments end."""
        run, room, pieces = state.pending + list(ids), self.n - state.layers[0].segment_tokens, []
        while run:
            pieces.append(run[:room])
            run, room = run[room:], self.n
        return pieces

    def buckets(self) -> list[int]:
        return sorted({bucket(4 ** i, self.n) for i in range(self.n.bit_length())})

    def ready(self, sizes: set[int]) -> bool:
        """Capture the graphs of these buckets that are missing (before a read changes its
        state). A failed capture (no memory left, an operation CUDA graphs cannot take)
        turns this model's graphs off: it answers eagerly from then on."""
        missing = sizes - self.graphs.keys()
        if not missing:
            return True
        for sources in self.sources:  # (a capture's warm-up writes into the segment slots)
            for name in SEGMENT:
                sources.pop(name, None)
        try:
            for size in missing:
                self.graphs[size] = _Captured(self, size)
        except RuntimeError as error:
            log.warning("prompt CUDA graphs failed (%s); answering without them", error)
            self.model.prompt_graphs = False
            return False
        return True

    def _piece(self, state: MemoryState, ids: list[int]) -> torch.Tensor:
        before = state.layers[0].segment_tokens
        graph = self.graphs[bucket(len(ids), self.n)]
        self._load(state)
        graph.ids.copy_(torch.tensor([ids + [0] * (graph.size - len(ids))]))
        graph.start.fill_(before)
        graph.last.fill_(len(ids) - 1)
        graph.run()
        after = before + len(ids)
        for layer, buffers, sources in zip(state.layers, self.buffers, self.sources):
            for name in SEGMENT:
                setattr(layer, name, getattr(buffers, name)[:, :, :after].clone())
                sources[name] = getattr(layer, name)
        if after == self.n:  # the segment is complete: into the memory, eagerly
            for attn, layer in zip(infini_layers(self.model.lm), state.layers):
                attn.complete_segment(layer)
        return graph.logits.clone()  # (the next replay overwrites the graph's)

    def _load(self, state: MemoryState) -> None:
        """Copy into the buffers what of the state they do not hold already."""
        for layer, buffers, sources in zip(state.layers, self.buffers, self.sources):
            for name in LOADED + SEGMENT:
                tensor = getattr(layer, name)
                if sources.get(name) is not tensor and tensor is not None:
                    target = getattr(buffers, name)
                    (target[:, :, :tensor.shape[2]] if name in SEGMENT else target).copy_(tensor)
                    sources[name] = tensor

    def forward(self, graph: "_Captured") -> torch.Tensor:
        """The padded piece's forward, which a graph captures: the logits after its last token."""
        slots = graph.start + torch.arange(graph.size, device=graph.start.device)
        positions = slots + self.before_segment
        where = PieceIndex(slots, positions, self.key_positions[None] <= positions[:, None])
        with bound(self.model.lm, [replace(buffers, where=where) for buffers in self.buffers]):
            return self.model.lm(input_ids=graph.ids, use_cache=False, logits_to_keep=graph.last).logits


class _Captured:
    """One bucket's inputs, graph and output."""

    def __init__(self, graphs: PromptGraphs, size: int):
        device = graphs.model.device
        self.graphs, self.size = graphs, size
        self.ids = torch.zeros(1, size, dtype=torch.long, device=device)
        self.start = torch.zeros(1, dtype=torch.long, device=device)  # the segment's tokens before the piece
        self.last = torch.zeros(1, dtype=torch.long, device=device)  # the piece's last token
        self.graph = None
        if graphs.cuda_graphs:
            with torch.cuda.device(device), torch.no_grad():
                with graphs.model.warming_up():  # (a warm-up first, as capture needs)
                    graphs.forward(self)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = graphs.forward(self)

    def run(self) -> None:
        if self.graph is not None:
            with torch.cuda.device(self.ids.device):
                self.graph.replay()
        else:  # without CUDA, the same padded forward (as the CPU tests check it)
            with torch.no_grad():
                self.logits = self.graphs.forward(self)
