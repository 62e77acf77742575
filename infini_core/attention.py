"""InfiniAttention: the attention of a Hugging Face decoder layer, retrofitted with memory.

It reuses the layer's own projections (and Gemma 3's q/k norms), so with the gate closed
and the input inside one segment it computes what the base model computes. Two kinds:

- memory layers (every global layer): causal attention inside the current segment (and,
  with `xl_window`, the whole previous one) plus the compressive memory of all earlier
  segments, mixed by a learned gate per query head;
- sliding layers (Gemma 3's local layers): their sliding window, carried across calls.

RoPE only ever sees positions inside the local window (they restart at every window),
because rotary angles at absolute positions in the millions lose fp32 precision.
Keys are cached before RoPE and rotated at their window position when used.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from .memory import RULES, chosen_impl, feature_map, infini_memory, memory_read, memory_update
from .memory.naive import group_queries
from .state import LayerState


@dataclass(frozen=True)
class InfiniConfig:
    """How a model is retrofitted. `InfiniConfig.paper()` is the paper's exact formulation."""

    segment_len: int = 512
    rule: str = "delta"
    # memory Q/K projections of its own: the attention's plus a low-rank delta of this rank,
    # zero at start (so they begin as copies, and the adapter stays a few MB)
    own_memory_qk: bool = True
    memory_qk_rank: int = 32
    # learnable per-KV-head sharpness of the feature map: sigma(exp(tau) * x), tau = 0 at start
    sharpness: bool = True
    # local attention also sees the whole previous segment (Transformer-XL's cache); the
    # memory then takes a segment when it leaves that window, never what attention sees
    xl_window: bool = True
    # the document's first tokens stay at the front of every local window: language models
    # park much of their attention on them ("attention sinks", Xiao et al. 2023), and
    # windows without them read far worse (docs/results.md: perplexity 47.5 -> 27.3, full
    # attention 26.4)
    sink_tokens: int = 4
    # gate = sigmoid(gate_init): closed (the base model's output within one segment), yet
    # its gradient (sigmoid'(-10) ~ 5e-5) is large enough for Adam to open it
    gate_init: float = -10.0
    # the paper mixes with the gate even while the memory is still empty (reading 0), which
    # scales the first segment's attention by 1 - gate; off, a text within the first
    # segment is read exactly as the base model reads it, whatever the gate learned
    mix_empty_memory: bool = False

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown memory rule {self.rule!r}; expected one of {RULES}")
        if self.segment_len < 1:
            raise ValueError(f"segment_len must be >= 1, got {self.segment_len}")
        if self.sink_tokens < 0:  # (at most the first segment's tokens are kept)
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if self.own_memory_qk and self.memory_qk_rank < 1:
            raise ValueError(f"memory_qk_rank must be >= 1, got {self.memory_qk_rank}")

    @property
    def memory_lag(self) -> int:
        """Segments a completed segment waits before it is written: the one in the XL window."""
        return 1 if self.xl_window else 0

    @classmethod
    def paper(cls, **overrides) -> "InfiniConfig":
        """Munkhdalai et al. 2024: shared Q/K, plain ELU + 1, attention inside the segment only."""
        return cls(**{"own_memory_qk": False, "sharpness": False, "xl_window": False, "sink_tokens": 0,
                      "mix_empty_memory": True, **overrides})


class RopeTable:
    """cos/sin of window positions 0..n-1 from the base model's own rotary module, shared by
    all layers (not an nn.Module, so the rotary module is not registered twice)."""

    def __init__(self, rotary: nn.Module):
        self.rotary = rotary
        self.takes_layer_type = "layer_type" in inspect.signature(rotary.forward).parameters
        self.cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.outgrown: list[tuple[torch.Tensor, torch.Tensor]] = []  # a captured CUDA graph may still read these

    def get(self, n: int, like: torch.Tensor, layer_type: str | None) -> tuple[torch.Tensor, torch.Tensor]:
        key = (like.dtype, like.device, layer_type)
        cached = self.cache.get(key)
        if cached is None or cached[0].shape[0] < n:
            size = max(n, 2 * cached[0].shape[0] if cached else 1024)
            positions = torch.arange(size, device=like.device)[None]
            extra = (layer_type,) if self.takes_layer_type else ()
            with torch.no_grad():
                cos, sin = self.rotary(like, positions, *extra)
            if cached is not None:
                self.outgrown.append(cached)
            cached = self.cache[key] = (cos[0], sin[0])
        return cached[0][:n], cached[1][:n]


def low_rank(proj: nn.Linear, rank: int) -> nn.Sequential:
    """A rank-`rank` delta for `proj` that starts at zero."""
    like = proj.weight
    down = nn.Linear(proj.in_features, rank, bias=False, dtype=like.dtype, device=like.device)
    up = nn.Linear(rank, proj.out_features, bias=False, dtype=like.dtype, device=like.device)
    nn.init.zeros_(up.weight)
    return nn.Sequential(down, up)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the half-split layout used by Llama, Qwen2 and Gemma 3."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class InfiniAttention(nn.Module):
    def __init__(self, attn: nn.Module, config: InfiniConfig, n_heads: int, n_kv_heads: int,
                 rope: RopeTable, layer_type: str | None, sliding_window: int | None):
        super().__init__()
        if getattr(attn, "attn_logit_softcapping", None) is not None:
            raise ValueError("attention logit soft-capping is not supported")
        self.config = config
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = attn.q_proj.out_features // n_heads
        self.scaling = attn.scaling
        self.layer_type = layer_type
        self.sliding_window = sliding_window
        self.has_memory = sliding_window is None
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        self.q_norm = getattr(attn, "q_norm", None)
        self.k_norm = getattr(attn, "k_norm", None)
        self._rope = rope
        # the state of the stream this layer reads; bound by infini_core.stream for a document
        self.state: LayerState | None = None
        # where a forward without a bound state starts (a fresh stream, or a copy of this:
        # training after a prefix, `stream.starting_from`)
        self.start: LayerState | None = None
        # the projections side by side, read inside `compiled_blocks` (`join_linears`)
        self.joined: JoinedLinear | None = None
        if self.has_memory:
            like = attn.q_proj.weight
            self.memory_gate = nn.Parameter(torch.full((n_heads,), config.gate_init, dtype=like.dtype, device=like.device))
            if config.own_memory_qk:
                self.memory_q_lora = low_rank(attn.q_proj, config.memory_qk_rank)
                self.memory_k_lora = low_rank(attn.k_proj, config.memory_qk_rank)
            if config.sharpness:
                self.memory_tau = nn.Parameter(torch.zeros(n_kv_heads, dtype=like.dtype, device=like.device))

    # -- projections -------------------------------------------------------------------

    def _heads(self, y: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        """[B, T, H*D] projections -> [B, H, T, D] heads (normed, for Gemma 3's q/k norms)."""
        b, t, _ = y.shape
        y = y.view(b, t, -1, self.head_dim).transpose(1, 2)
        return norm(y) if norm is not None else y

    def _memory_qk(self, x, q, k, q_proj, k_proj, memory_proj=()):
        """Memory queries and keys before RoPE, with the sharpness folded in (`memory_proj`:
        their projections from `joined_weights`, where the sharpness may be in already)."""
        if self.config.own_memory_qk:
            mq_proj, mk_proj = memory_proj or (q_proj + self.memory_q_lora(x), k_proj + self.memory_k_lora(x))
            q, k = self._heads(mq_proj, self.q_norm), self._heads(mk_proj, self.k_norm)
        if self.config.sharpness and not (memory_proj and self._sharpness_in_weights):
            scale = self.memory_tau.exp()[None, :, None, None]
            q = q * scale.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            k = k * scale
        return q, k

    @property
    def _sharpness_in_weights(self) -> bool:
        """Whether `joined_weights` multiplies the sharpness into the memory's projections:
        not where q/k norms come after them (a norm would undo it)."""
        return self.config.sharpness and self.q_norm is None and self.k_norm is None

    def joined_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight, bias) of every projection of the layer's input: q, k, v and, with memory
        Q/K of their own, the memory's (the low-rank delta added, in fp32)."""
        parts = [(p.weight, p.bias) for p in (self.q_proj, self.k_proj, self.v_proj)]
        if not (self.has_memory and self.config.own_memory_qk):
            return parts
        heads = (self.n_heads // self.n_kv_heads, 1)
        for proj, lora, per_kv_head in zip((self.q_proj, self.k_proj), (self.memory_q_lora, self.memory_k_lora), heads):
            weight, bias = proj.weight.float() + lora[1].weight.float() @ lora[0].weight.float(), proj.bias
            if self._sharpness_in_weights:  # exp(tau) of each row's KV head
                scale = self.memory_tau.float().exp().repeat_interleave(per_kv_head * self.head_dim)
                weight, bias = weight * scale[:, None], None if bias is None else bias * scale
            parts.append((weight, bias))
        return parts

    # -- local attention ---------------------------------------------------------------

    def _attend(self, q, k, v, cos, sin) -> torch.Tensor:
        """Local attention of q over the window k, v (cos, sin: of the window's positions)."""
        return local_attention(q, k, v, cos, sin, self.scaling, self.n_heads // self.n_kv_heads,
                               self.config.sink_tokens, self.sliding_window)

    # -- forward -----------------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor, *args, cache=None, past_key_values=None, **kwargs):
        if cache is not None or past_key_values is not None:
            raise RuntimeError(
                "an Infini-attention model keeps its own state: call it with use_cache=False, "
                "or use infini_core.answer / infini_core.model.forward to continue a stream"
            )
        if isinstance(self.state, PaddedSegment):
            return self.o_proj(self._padded_piece(self.state, hidden_states).transpose(1, 2).flatten(2)), None
        state = self.state if self.state is not None else replace(self.start) if self.start is not None else LayerState()
        if self._reads_whole_block(state, hidden_states):
            return self._block(state, hidden_states), None
        q, k, v, mq, mk = self._project(hidden_states)
        state.init(k, v, self.has_memory, self.config.memory_lag)
        if self.has_memory:
            out = self._memory_layer(state, q, k, v, mq, mk)
        else:
            out = self._sliding_layer(state, q, k, v)
        return self.o_proj(out.transpose(1, 2).flatten(2)), None

    def _project(self, x):
        """q, k, v as heads, and the memory's queries and keys (None without memory); inside
        `compiled_blocks` in one matmul."""
        if _joined and self.joined is not None:
            q_proj, k_proj, v_proj, *memory_proj = self.joined(x)
        else:
            q_proj, k_proj, v_proj, memory_proj = self.q_proj(x), self.k_proj(x), self.v_proj(x), ()
        q, k = self._heads(q_proj, self.q_norm), self._heads(k_proj, self.k_norm)
        v = self._heads(v_proj, None)
        mq, mk = self._memory_qk(x, q, k, q_proj, k_proj, memory_proj) if self.has_memory else (None, None)
        return q, k, v, mq, mk

    def _sliding_layer(self, state: LayerState, q, k, v) -> torch.Tensor:
        outs = []
        step = self.config.segment_len  # bounds the mask at step x (window + step)
        for start in range(0, q.shape[2], step):
            piece = slice(start, start + step)
            wk, wv = state.window_with(k[:, :, piece], v[:, :, piece])
            outs.append(self._attend(q[:, :, piece], wk, wv, *self._rope.get(wk.shape[-2], q, self.layer_type)))
            state.keep_window(wk, wv, self.sliding_window - 1)
        return torch.cat(outs, dim=2)

    def _memory_layer(self, state: LayerState, q, k, v, mq, mk) -> torch.Tensor:
        n = self.config.segment_len
        outs, start, t = [], 0, q.shape[2]
        while start < t:
            if t - start >= 2 * n and self._reads_blocks(state, q):
                # several whole segments: all of them at once (layer-parallel)
                count = (t - start) // n * n
                outs.append(self._whole_segments(state, *(x[:, :, start:start + count] for x in (q, k, v, mq, mk))))
                start += count
                continue
            if start == 0 and t >= 2 * n and self._opens_document(state):
                outs.append(self._first_segments(state, *(x[:, :, :2 * n] for x in (q, k, v, mq, mk))))
                start = 2 * n
                continue
            room = n - state.segment_tokens
            piece = slice(start, start + min(room, t - start))
            outs.append(self._segment_piece(state, q[:, :, piece], k[:, :, piece], v[:, :, piece], mq[:, :, piece], mk[:, :, piece]))
            start = piece.stop
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)

    def _opens_document(self, state: LayerState) -> bool:
        """Whether the next two whole segments are a document's first, read the way the
        default conversion reads them: both attend to themselves and the one before and
        leave an empty memory unmixed (see `_first_segments`)."""
        cfg = self.config
        return (state.segments == 0 and state.segment_tokens == 0 and cfg.memory_lag == 1 and cfg.xl_window
                and not cfg.mix_empty_memory)

    def opens_in_block(self, state: LayerState, like: torch.Tensor) -> bool:
        """Whether whole segments like `like` that open a document go through the window
        kernel as one block, as later blocks do (its first two segments masked as
        `_first_segments` reads them): a document's start then takes no CUDA graph of its
        own (docs/benchmarks.md, sixteenth session)."""
        return (self.has_memory and self._opens_document(state) and chosen_impl() == "chunk"
                and window_kernel_applies(like, self.head_dim, self.config))

    def _first_segments(self, state: LayerState, q, k, v, mq, mk) -> torch.Tensor:
        """A document's first two segments at once. Both read an empty memory and each sees
        itself and the one before, so together they are plain causal attention: one kernel
        where segment by segment took two, and no reads of an empty memory to throw away
        (a short document's first CUDA graph ran them eagerly, docs/benchmarks.md). Then
        both are written, as segment by segment."""
        n = self.config.segment_len
        out = self._attend(q, k, v, *self._rope.get(2 * n, q, self.layer_type))
        state.keep_sinks(k, v, self.config.sink_tokens)
        for s in (slice(0, n), slice(n, 2 * n)):
            state.append_segment(k[:, :, s], v[:, :, s], mk[:, :, s])
            self.complete_segment(state)
        return out

    def _mix(self, local: torch.Tensor, mem: torch.Tensor, empty_tokens: int = 0) -> torch.Tensor:
        """Gate the memory in; the first `empty_tokens` read an empty memory and, unless
        the config says to mix those too, keep the local attention as it is."""
        mixed = gate_mix(local, mem, self.memory_gate)
        if empty_tokens and not self.config.mix_empty_memory:
            mixed = torch.cat([local[:, :, :empty_tokens], mixed[:, :, empty_tokens:]], dim=2)
        return mixed

    def _segment_piece(self, state: LayerState, q, k, v, mq, mk) -> torch.Tensor:
        """Tokens that all belong to the current segment: attend, read, and write the
        segment into the memory once it is complete."""
        wk, wv = state.local_with(k, v, self.config.xl_window, sinks=state.segments > self.config.memory_lag)
        cos, sin = self._rope.get(wk.shape[-2], q, self.layer_type)
        empty = q.shape[2] if state.segments <= self.config.memory_lag else 0
        out = self._attend_read_mix(q, wk, wv, mq, state.M, state.z, cos, sin, empty)
        if state.segments == 0:
            state.keep_sinks(k, v, self.config.sink_tokens)
        state.append_segment(k, v, mk)
        if state.segment_tokens == self.config.segment_len:
            self.complete_segment(state)
        return out

    def complete_segment(self, state: LayerState) -> None:
        """Write the full current segment into the memory (with xl_window: into M_next, and
        the segment that left the window becomes readable)."""
        _, seg_v, seg_mk = state.take_segment(self.config.xl_window)
        if self.config.memory_lag:
            state.M, state.z = state.M_next, state.z_next
            state.M_next, state.z_next = self._write(state.M_next, state.z_next, seg_mk, seg_v)
        else:
            state.M, state.z = self._write(state.M, state.z, seg_mk, seg_v)
        state.segments += 1

    def _padded_piece(self, slot: PaddedSegment, x: torch.Tensor) -> torch.Tensor:
        """A piece of a prompt inside the current segment, in fixed shapes (`PaddedSegment`):
        its keys go into the segment's slots, and each query attends to the window up to its
        own position (the padding after the piece's last token sees more, and is dropped)."""
        q, k, v, mq, mk = self._project(x)
        where = slot.where
        for buffer, new in ((slot.seg_k, k), (slot.seg_v, v), (slot.seg_mk, mk)):
            buffer.index_copy_(2, where.slots, new)
        wk, wv = torch.cat([slot.sink_k, slot.win_k, slot.seg_k], 2), torch.cat([slot.sink_v, slot.win_v, slot.seg_v], 2)
        cos, sin = self._rope.get(wk.shape[-2], q, self.layer_type)
        q, wk = rotate(q, cos[where.positions], sin[where.positions]), rotate(wk, cos, sin)
        local = F.scaled_dot_product_attention(q, wk, wv, attn_mask=where.visible, scale=self.scaling, enable_gqa=True)
        return self._mix(local, read_memory(mq, slot.M, slot.z, self.n_kv_heads))

    def _attend_read_mix(self, q, wk, wv, mq, M, z, cos, sin, empty_tokens: int) -> torch.Tensor:
        """Local attention over the window, the memory read (before this piece is written)
        and the gate: tensors in, tensor out."""
        return self._mix(self._attend(q, wk, wv, cos, sin), read_memory(mq, M, z, self.n_kv_heads), empty_tokens)

    def _write(self, M, z, mk, v):
        return memory_update(M, z, feature_map(mk), v, self.config.rule)

    def past_start(self, state: LayerState) -> bool:
        """Whether this memory layer's stream is on a segment boundary past the document's
        start (the memory readable, the sinks kept): whole segments from here on take the
        layer-parallel path, all with the same shapes."""
        return (state.seg_k is not None and state.segment_tokens == 0
                and state.segments > self.config.memory_lag)

    def _reads_whole_block(self, state: LayerState, x: torch.Tensor) -> bool:
        """Whether the input `x` is two or more whole segments past the start (the blocks of
        a long read): `_block` takes it."""
        n, t = self.config.segment_len, x.shape[1]
        return self.has_memory and t >= 2 * n and t % n == 0 and self._reads_blocks(state, x)

    def _reads_blocks(self, state: LayerState, like: torch.Tensor) -> bool:
        """Whether whole segments like `like` take the layer-parallel path from here: past
        the document's start (from the segment whose window no longer holds it, all of them
        have the same shape of window), or opening it through the window kernel."""
        return self.past_start(state) or self.opens_in_block(state, like)

    def _block(self, state: LayerState, x: torch.Tensor) -> torch.Tensor:
        """A block of whole segments, from the layer's input to its output (`attend_block`)."""
        spec, cos, sin = self._block_spec(state, x)
        run = _block_version(attend_block, spec)
        out, kept, memory = run(self, spec, x, cos, sin, *self._block_state(state, x))
        self._after_block(state, spec, x.shape[1] // spec.segment_len, kept, memory)
        return out

    def _whole_segments(self, state: LayerState, q, k, v, mq, mk) -> torch.Tensor:
        """S whole segments starting at a segment boundary, each attending to itself (and
        its predecessor with xl_window) as one batch, the memory through the dispatch op."""
        spec, cos, sin = self._block_spec(state, q)
        reads = self._block_state(state, q)
        out, memory = _block_version(whole_segments, spec)(spec, self.memory_gate, cos, sin, q, k, v, mq, mk, *reads)
        self._after_block(state, spec, q.shape[2] // spec.segment_len, kept_of_block(spec, k, v, reads[0]), memory)
        return out

    def _block_spec(self, state: LayerState, like: torch.Tensor):
        cfg = self.config
        impl = chosen_impl()
        kernel = impl == "chunk" and window_kernel_applies(like, self.head_dim, cfg)
        opens = not self.past_start(state)  # (then it opens the document: `opens_in_block`)
        # (the window kernel rotates queries one segment further for the segment before)
        sinks = self._opening_sinks() if opens else state.sink_k.shape[2]
        window = sinks + (2 + kernel if cfg.xl_window else 1) * cfg.segment_len
        spec = BlockSpec(cfg.segment_len, cfg.rule, cfg.xl_window, cfg.memory_lag > 0, self.scaling,
                         self.n_kv_heads, impl, kernel, opens)
        return spec, *self._rope.get(window, like, self.layer_type)

    def _opening_sinks(self) -> int:
        """The sinks a document keeps: its first tokens, up to a segment's."""
        return min(self.config.sink_tokens, self.config.segment_len)

    def _block_state(self, state: LayerState, like: torch.Tensor) -> tuple:
        """The state tensors a block reads; for a block that opens a document, stand-ins in
        the shapes they have past the start, so that one compiled version serves both: an
        empty memory (both the lagged one and the next), and sinks and a window never read
        (the sinks are the block's own first tokens, and the kernel masks the window), so
        not even filled: in a short document's one graph, each tensor filled is 30 kernels."""
        if self.past_start(state):
            return state.sink_k, state.sink_v, state.win_k, state.win_v, state.M, state.z, state.M_next, state.z_next
        b, h, d, n = like.shape[0], self.n_kv_heads, self.head_dim, self.config.segment_len
        keys = partial(torch.empty, dtype=like.dtype, device=like.device)
        M, z = (torch.zeros(b, h, *size, dtype=torch.float32, device=like.device) for size in ((d, d), (d,)))
        p = self._opening_sinks()
        return keys(b, h, p, d), keys(b, h, p, d), keys(b, h, n, d), keys(b, h, n, d), M, z, M, z

    def _after_block(self, state: LayerState, spec: BlockSpec, segments: int, kept, memory) -> None:
        """The state after a block of `segments` segments: its memory, and what it keeps of
        the block's keys and values (`kept_of_block`)."""
        state.M, state.z, state.M_next, state.z_next = memory
        state.segments += segments
        win_k, win_v, sink_k, sink_v = kept
        if spec.xl_window:
            state.win_k, state.win_v = win_k, win_v
        if spec.opens:
            state.sink_k, state.sink_v = sink_k, sink_v
            state.init(sink_k, sink_v, True, self.config.memory_lag)  # (the empty current segment)


@dataclass(frozen=True)
class PieceIndex:
    """Where a padded prompt piece sits in its segment, shared by all layers."""

    slots: torch.Tensor  # [P] long: the segment slots of the piece's tokens
    positions: torch.Tensor  # [P] long: their positions in the window
    visible: torch.Tensor  # [P, keys] bool: the window keys each token attends to


@dataclass
class PaddedSegment:
    """A memory layer's stream in shapes that do not change from one prompt to the next, so
    that a CUDA graph can replay its forward (infini_core.prompt_graph): the memory, the
    window (sinks, previous segment) and slots for twice a segment, which hold the current
    segment's tokens and then the piece's. Only the slots are written."""

    M: torch.Tensor
    z: torch.Tensor
    sink_k: torch.Tensor
    sink_v: torch.Tensor
    win_k: torch.Tensor
    win_v: torch.Tensor
    seg_k: torch.Tensor
    seg_v: torch.Tensor
    seg_mk: torch.Tensor
    where: PieceIndex | None = None


@dataclass(frozen=True)
class BlockSpec:
    """What `whole_segments` needs of a layer besides tensors (the same for all layers of a
    model, so one compiled version serves them all)."""

    segment_len: int
    rule: str
    xl_window: bool
    lagged: bool  # the memory lags the window by a segment (M_next, z_next)
    scaling: float
    kv_heads: int
    impl: str  # of the memory op
    window_kernel: bool = False  # local attention, read and gate in one Triton kernel (ingest)
    opens: bool = False  # the block opens a document (window kernel only; the state given: stand-ins)


def whole_segments(spec: BlockSpec, gate, cos, sin, q, k, v, mq, mk, sink_k, sink_v, win_k, win_v,
                   M, z, M_next, z_next):
    """Local attention and memory of S whole segments (q, k, v, mq, mk: [B, H, S*N, D], all
    past the lag, so none reads an empty memory; or with `spec.opens` a document's first,
    read as segment by segment), gated together; and the memory after them (M, z, M_next,
    z_next). Tensors in, tensors out: torch.compile takes it whole."""
    if spec.opens and not spec.window_kernel:
        raise ValueError("only the window kernel reads a document's first segments as a block")
    if spec.window_kernel:
        from .window_kernel import fused_whole_segments

        n, p = spec.segment_len, sink_k.shape[2]
        if spec.opens:  # the sinks are the document's first tokens (`_block_state` gave stand-ins)
            sink_k, sink_v = k[:, :, :p], v[:, :, :p]
        own = p + n if spec.xl_window else p  # window position of a segment's first token
        keys, values = (torch.cat([win_k, k], 2), torch.cat([win_v, v], 2)) if spec.xl_window else (k, v)
        # every key rotated once, at its place in its own segment's window (the kernel moves
        # the queries for the keys of the segment before)
        keys = rotate(keys.unflatten(2, (-1, n)), cos[own:own + n], sin[own:own + n]).flatten(2, 3)
        reads_M, reads_z, memory = _block_memory(spec, mk, v, M, z, M_next, z_next)
        out = fused_whole_segments(q, keys, values, mq, rotate(sink_k, cos[:p], sin[:p]), sink_v, cos, sin,
                                   reads_M, reads_z, gate, spec.scaling, n, spec.xl_window, spec.opens)
        return out, memory
    b, hq, t, d = q.shape
    n, s = spec.segment_len, t // spec.segment_len

    def per_segment(x):  # [B, H, S*N, D] -> [B*S, H, N, D]
        return x.unflatten(2, (s, n)).transpose(1, 2).flatten(0, 1)

    qs, ks, vs = per_segment(q), per_segment(k), per_segment(v)
    sinks = [x.unsqueeze(1).expand(-1, s, -1, -1, -1).flatten(0, 1) for x in (sink_k, sink_v)]
    if spec.xl_window:  # each segment's window: sinks, the previous segment, itself
        prev = [torch.cat([w.unsqueeze(1), x.unflatten(0, (b, s))[:, :-1]], 1).flatten(0, 1)
                for w, x in ((win_k, ks), (win_v, vs))]
        wk, wv = (torch.cat([sk, pk, xs], 2) for sk, pk, xs in zip(sinks, prev, (ks, vs)))
    else:
        wk, wv = (torch.cat([sk, xs], 2) for sk, xs in zip(sinks, (ks, vs)))
    local = local_attention(qs, wk, wv, cos, sin, spec.scaling, hq // spec.kv_heads, sink_k.shape[2])
    local = local.unflatten(0, (b, s)).transpose(1, 2).flatten(2, 3)
    if spec.lagged:
        # segment 0 reads (M, z); segment i > 0 reads (M_next, z_next) plus segments
        # 0..i-2 of the block: the op with queries shifted one segment after the writes
        first = read_memory(mq[:, :, :n], M, z, spec.kv_heads)
        rest, (M, z) = infini_memory(mq[:, :, n:], mk[:, :, :-n], v[:, :, :-n], n, spec.rule,
                                     (M_next, z_next), impl=spec.impl)
        mem = torch.cat([first, rest.to(first.dtype)], dim=2)
        M_next, z_next = memory_update(M, z, feature_map(mk[:, :, -n:]), v[:, :, -n:], spec.rule)
    else:
        mem, (M, z) = infini_memory(mq, mk, v, n, spec.rule, (M, z), impl=spec.impl)
    return gate_mix(local, mem, gate), (M, z, M_next, z_next)


def _block_memory(spec: BlockSpec, mk, v, M, z, M_next, z_next):
    """The memory each of S whole segments reads (M [B, Hkv, S, D, D], z [B, Hkv, S, D]), as
    the torch path of `whole_segments` reads it, and the memory after them: the Triton scan
    of the window kernel's blocks."""
    from .memory.scan_kernel import scan_states

    n = spec.segment_len
    if spec.lagged:  # all S segments written into (M_next, z_next), the first reading (M, z)
        reads_M, reads_z, after_M, after_z = scan_states(mk, v, n, spec.rule, (M_next, z_next), lead=(M, z))
        return reads_M, reads_z, (after_M[:, :, 0], after_z[:, :, 0], after_M[:, :, 1], after_z[:, :, 1])
    reads_M, reads_z, after_M, after_z = scan_states(mk, v, n, spec.rule, (M, z))
    return reads_M, reads_z, (after_M[:, :, 0], after_z[:, :, 0], M_next, z_next)


def attend_block(attn: InfiniAttention, spec: BlockSpec, x, cos, sin, *state: torch.Tensor):
    """A memory layer's attention over a block of whole segments (x: [B, S*N, hidden], past
    the start): projections, `whole_segments` and o_proj in one function, so that compiled
    the elementwise work between the matmuls (the memory's low-rank Q/K added, its
    sharpness, the heads' layouts) fuses into few kernels. Returns the output, what the
    state keeps of the block's keys and values (`kept_of_block`), and the memory after it."""
    q, k, v, mq, mk = attn._project(x)
    out, memory = whole_segments(spec, attn.memory_gate, cos, sin, q, k, v, mq, mk, *state)
    return attn.o_proj(out.transpose(1, 2).flatten(2)), kept_of_block(spec, k, v, state[0]), memory


def kept_of_block(spec: BlockSpec, k, v, sink_k) -> tuple:
    """What the state keeps of a block's keys and values (None where nothing): its last
    segment, the next window, and for a block that opens a document its first tokens, as
    many as `sink_k` (the sinks it read) holds; as tensors of their own, since views would
    keep the block's projections alive (with q, k and v in one matmul: 113 MB a layer in a
    32K-token block, 3.4 GB in all)."""
    n, p = spec.segment_len, sink_k.shape[2]
    window = [x[:, :, -n:].contiguous() for x in (k, v)] if spec.xl_window else [None, None]
    sinks = [x[:, :, :p].contiguous() for x in (k, v)] if spec.opens else [None, None]
    return *window, *sinks


def read_memory(mq, M, z, kv_heads: int) -> torch.Tensor:
    """What memory queries mq [B, Hq, T, D] read from (M, z) of the KV heads."""
    sq = group_queries(feature_map(mq), kv_heads)
    return memory_read(sq, M.unsqueeze(2), z.unsqueeze(2)).flatten(1, 2)


def gate_mix(local: torch.Tensor, mem: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """sigmoid(gate) of the memory plus the rest of the local attention, per query head."""
    g = torch.sigmoid(gate.float())[None, :, None, None]
    return (g * mem.float() + (1 - g) * local.float()).to(local.dtype)


def local_attention(q, k, v, cos, sin, scaling: float, groups: int, sink_tokens: int,
                    sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of q, the last tokens of the window, over the window's k, v (all
    before RoPE; cos/sin of window positions, at least as many as keys). Sliding windows
    also drop keys `sliding_window` or more back."""
    n_q, n_k = q.shape[-2], k.shape[-2]
    q_start = n_k - n_q
    q = rotate(q, cos[q_start:n_k], sin[q_start:n_k])
    k = rotate(k, cos[:n_k], sin[:n_k])
    sdpa = dict(scale=scaling, enable_gqa=True)
    if sliding_window is not None:
        i = torch.arange(q_start, n_k, device=q.device)[:, None]
        j = torch.arange(n_k, device=q.device)[None]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=(j <= i) & (j > i - sliding_window), **sdpa)
    if q_start == 0 or n_q == 1:  # plain causal, or one new token that sees everything
        return F.scaled_dot_product_attention(q, k, v, is_causal=n_q > 1, **sdpa)
    if 2 * n_q + sink_tokens >= n_k:
        # flash kernels take plain causal attention: padding the queries in front (their
        # outputs dropped) costs less than the dense-mask kernel a window-end mask gets
        q = F.pad(q, (0, 0, q_start, 0))
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **sdpa)[:, :, q_start:]
    # causal aligned to the window's end: flash/efficient kernels take this without a
    # dense mask, but not with grouped heads, so those are expanded
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(n_q, n_k), scale=scaling)


_window_kernel: bool | None = None  # set by use_window_kernel


@contextmanager
def use_window_kernel(enabled: bool):
    """Force the Triton window kernel on (tests: also on CPU under TRITON_INTERPRET=1) or off
    (benchmarks: the torch path) for whole segments read without gradients."""
    global _window_kernel
    before, _window_kernel = _window_kernel, enabled
    try:
        yield
    finally:
        _window_kernel = before


def forced_window_kernel() -> bool | None:
    """What `use_window_kernel` forces (None: the default choice)."""
    return _window_kernel


def window_kernel_applies(like: torch.Tensor, head_dim: int, config: InfiniConfig) -> bool:
    """Whether whole segments like `like` take the Triton window kernel (and the memory scan
    beside it): it has no backward, and by default runs only on CUDA in 16-bit (fp32 reads
    stay the accuracy reference; blocks of every length gain, docs/benchmarks.md, fifteenth
    session), where it builds and runs (tried once, never while a CUDA graph is being
    captured: a worker's warm-up read comes first)."""
    if torch.is_grad_enabled() or head_dim & (head_dim - 1) or not 16 <= head_dim <= 128:
        return False
    if _window_kernel is not None:
        return _window_kernel
    if not (like.is_cuda and like.dtype in (torch.bfloat16, torch.float16)):
        return False
    from .window_kernel import kernel_works

    return kernel_works(like.device, like.dtype, head_dim, config.segment_len, config.xl_window,
                        may_try=not torch.cuda.is_current_stream_capturing())


_compiling_blocks = False  # inside compiled_blocks
# compiled_blocks(model) joins model's projections of one input into one matmul each (False:
# as before the seventeenth session, which bench/ingest.py measures beside it)
JOIN_PROJECTIONS = True
_joined = False  # inside compiled_blocks, with model's projections joined
_compiled_steps: dict = {}  # function -> its compiled version, shared by all layers


def _block_version(fn, spec: BlockSpec):
    """`fn` compiled (fused elementwise kernels) inside `compiled_blocks`, else as it is: a
    new shape costs a compilation, so only the fixed-size blocks of a long read take that
    path (and the Triton memory op runs as it is)."""
    return _compiled_version(fn) if _compiling_blocks and spec.impl == "chunk" else fn


def _compiled_version(fn):
    compiled = _compiled_steps.get(fn)
    if compiled is None:
        # one compilation per shape: a worker keeps graphs of 14 kinds of block (and a
        # benchmark two sets), and dynamo falls back to eager past its limit (8 by default)
        # of versions per function
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # rounding where eager rounds (bf16 casts kept), so compiled code reads as eager code does
        compiled = _compiled_steps[fn] = torch.compile(fn, dynamic=False, options={"emulate_precision_casts": True})
    return compiled


@dataclass
class JoinedLinear:
    """Linear maps of one input side by side: one matmul, one launch and one read of the
    input where there were several (ingest's blocks: docs/benchmarks.md, seventeenth
    session). Kept on the module it serves, as long as the module: CUDA graphs captured
    with it read its weight."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: list[int]

    def __call__(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1))


def join_linears(old: JoinedLinear | None, parts: list[tuple[torch.Tensor, torch.Tensor | None]]) -> JoinedLinear:
    """(weight, bias) pairs side by side, in the first weight's dtype; written into `old`
    where it has their shapes, so that graphs captured with it read the weights as they
    are now."""
    with torch.no_grad():
        like = parts[0][0]
        weight = torch.cat([w.to(like.dtype) for w, _ in parts])
        bias = None if all(b is None for _, b in parts) else torch.cat(
            [like.new_zeros(w.shape[0]) if b is None else b.to(like.dtype) for w, b in parts])
        if old is not None and (old.bias is None) == (bias is None) and all(
                getattr(old.weight, a) == getattr(weight, a) for a in ("shape", "dtype", "device")):
            old.weight.copy_(weight)
            if bias is not None:
                old.bias.copy_(bias)
            return old
    return JoinedLinear(weight, bias, [w.shape[0] for w, _ in parts])


class JoinedMLP(nn.Module):
    """The MLP of every supported architecture, down(act(gate(x)) * up(x)), with gate and
    up in one matmul: in a decoder layer's place of its MLP inside `compiled_blocks` (a
    module, not a swapped forward: compiled code would take each layer's forward for new
    code, and compile once per layer)."""

    def __init__(self, mlp: nn.Module, joined: JoinedLinear):
        super().__init__()
        self.down_proj, self.act_fn, self.joined = mlp.down_proj, mlp.act_fn, joined

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.joined(x)
        return self.down_proj(self.act_fn(gate) * up)


def _join(layer: nn.Module, attn: InfiniAttention) -> JoinedMLP | None:
    """The layer's projections joined (`JoinedLinear`), from its weights as they are now:
    the attention's input projections (`InfiniAttention._project` reads them inside
    `compiled_blocks`), and the MLP's gate and up (the MLP that reads them returned; None
    for an MLP of another form). Only plain `nn.Linear` layers join: a subclass (a LoRA, a
    quantized layer) computes more than its weight says."""
    plain = lambda *modules: all(type(m) is nn.Linear for m in modules)
    attn.joined = (join_linears(attn.joined, attn.joined_weights())
                   if plain(attn.q_proj, attn.k_proj, attn.v_proj) else None)
    mlp = getattr(layer, "mlp", None)
    gate, up = getattr(mlp, "gate_proj", None), getattr(mlp, "up_proj", None)
    if not (plain(gate, up) and hasattr(mlp, "down_proj") and hasattr(mlp, "act_fn")):
        return None
    mlp.joined = join_linears(getattr(mlp, "joined", None), [(p.weight, p.bias) for p in (gate, up)])
    return JoinedMLP(mlp, mlp.joined)


@contextmanager
def compiled_blocks(model: nn.Module | None = None):
    """Inside, the whole-segment path of memory layers runs through torch.compile (fused
    kernels instead of dozens of small elementwise ones), and so does the rest of `model`'s
    decoder layers around their attention (norms, MLP, residual adds: Hugging Face's RMSNorm
    alone is eight operations, and an add fuses into the norm after it). The attention
    itself runs as it is (its state is Python objects), compiling its block on its own.
    `model`'s projections of one input are joined into one matmul each (`_join`,
    `JOIN_PROJECTIONS`).
    The first call of each new shape compiles (seconds to a minute)."""
    global _compiling_blocks, _joined
    before = _compiling_blocks, _joined
    _compiling_blocks, _joined = True, model is not None and JOIN_PROJECTIONS
    swapped = []  # (module, attribute, what it was)
    try:
        for layer in model.base_model.layers if model is not None else ():
            attn = next(m for m in layer.children() if isinstance(m, InfiniAttention))
            # (a graph break: the compiled layer calls it as plain Python)
            changes = [(attn, "forward", torch.compiler.disable(partial(type(attn).forward, attn))),
                       (layer, "forward", partial(_compiled_version(type(layer).forward), layer))]
            if _joined and (mlp := _join(layer, attn)) is not None:
                changes.append((layer, "mlp", mlp))
            for module, name, value in changes:
                # (a forward: the instance's own if it has one, else None, the class's)
                was = module.__dict__.get(name) if name == "forward" else getattr(module, name)
                swapped.append((module, name, was))
                setattr(module, name, value)
        yield
    finally:
        _compiling_blocks, _joined = before
        for module, name, value in reversed(swapped):
            if value is None:
                delattr(module, name)
            else:
                setattr(module, name, value)
