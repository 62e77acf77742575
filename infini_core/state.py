"""The state a document leaves behind in each layer, and its container."""

from __future__ import annotations

import hashlib
import json
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch


def _cat(*parts: torch.Tensor | None) -> torch.Tensor:
    parts = [p for p in parts if p is not None and p.shape[2]]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


@dataclass
class LayerState:
    """One layer's part of a stream. Keys are kept before RoPE, shaped [B, Hkv, t, D].

    memory layers: M [B, Hkv, Dk, Dv] and z [B, Hkv, Dk] (fp32), the memory the current
    segment reads; `win_*` the previous segment (with xl_window); `seg_*` the current,
    unfinished segment (`seg_mk` its memory keys); `sink_*` the document's first tokens,
    kept at the front of every later window. A completed segment is written into the
    memory at once, or, with xl_window, into M_next and z_next, which become M and z when
    the segment leaves the window (so the memory never holds what attention sees).
    sliding layers: `win_*` the last sliding_window - 1 tokens.
    """

    M: torch.Tensor | None = None
    z: torch.Tensor | None = None
    M_next: torch.Tensor | None = None
    z_next: torch.Tensor | None = None
    sink_k: torch.Tensor | None = None
    sink_v: torch.Tensor | None = None
    win_k: torch.Tensor | None = None
    win_v: torch.Tensor | None = None
    seg_k: torch.Tensor | None = None
    seg_v: torch.Tensor | None = None
    seg_mk: torch.Tensor | None = None
    segments: int = 0  # completed segments

    @property
    def segment_tokens(self) -> int:
        return 0 if self.seg_k is None else self.seg_k.shape[2]  # (a loaded snapshot stores no empty segment)

    def init(self, k: torch.Tensor, v: torch.Tensor, memory: bool, lag: int = 0) -> None:
        """Fill in what is missing (a new stream, or empty parts a snapshot leaves out),
        shaped after this layer's keys and values."""
        if self.win_k is None:
            self.win_k, self.win_v = k[:, :, :0], v[:, :, :0]
        if memory and self.sink_k is None:
            self.sink_k, self.sink_v = k[:, :, :0], v[:, :, :0]
        if memory and self.seg_k is None:
            self.seg_k, self.seg_v, self.seg_mk = k[:, :, :0], v[:, :, :0], k[:, :, :0]
        if memory and self.M is None:
            b, h, _, dk = k.shape
            self.M = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float32, device=k.device)
            self.z = torch.zeros(b, h, dk, dtype=torch.float32, device=k.device)
        if memory and lag and self.M_next is None:
            self.M_next, self.z_next = torch.zeros_like(self.M), torch.zeros_like(self.z)

    # sliding layers
    def window_with(self, k, v):
        return _cat(self.win_k, k), _cat(self.win_v, v)

    def keep_window(self, k, v, size: int) -> None:
        start = max(0, k.shape[2] - size)
        self.win_k, self.win_v = k[:, :, start:], v[:, :, start:]

    # memory layers
    def local_with(self, k, v, xl_window: bool, sinks: bool):
        win_k, win_v = (self.win_k, self.win_v) if xl_window else (None, None)
        sink_k, sink_v = (self.sink_k, self.sink_v) if sinks else (None, None)
        return _cat(sink_k, win_k, self.seg_k, k), _cat(sink_v, win_v, self.seg_v, v)

    def keep_sinks(self, k, v, size: int) -> None:
        """The document's first `size` tokens, from the pieces of its first segment."""
        take = size - self.sink_k.shape[2]
        if take > 0:
            self.sink_k, self.sink_v = _cat(self.sink_k, k[:, :, :take]), _cat(self.sink_v, v[:, :, :take])

    def append_segment(self, k, v, mk) -> None:
        self.seg_k, self.seg_v, self.seg_mk = _cat(self.seg_k, k), _cat(self.seg_v, v), _cat(self.seg_mk, mk)

    def take_segment(self, xl_window: bool):
        """The completed segment; it becomes the window of the next one (with xl_window)."""
        done = self.seg_k, self.seg_v, self.seg_mk
        if xl_window:
            self.win_k, self.win_v = self.seg_k, self.seg_v
        self.seg_k, self.seg_v, self.seg_mk = (t[:, :, :0] for t in done)
        return done


def own_tensors(layers: list[LayerState]) -> None:
    """Give each tensor of the layers a contiguous buffer of its own: no view into a block's
    keys, none shared with another state. Copied in a few kernels where the tensors allow
    (contiguous ones: a CUDA graph's buffers), not one per tensor: the default model's
    state is 330 of them, each a launch from Python at the end of every document."""
    # one copy per dtype (the fp32 memory, the 16-bit keys and values): lists of mixed
    # dtypes leave the fast path, and copy tensor by tensor
    by_dtype: dict[torch.dtype, tuple[list, list]] = {}
    for layer in layers:
        for name in LAYER_TENSORS:
            if (t := getattr(layer, name)) is not None:
                targets, sources = by_dtype.setdefault(t.dtype, ([], []))
                targets.append(torch.empty_like(t, memory_format=torch.contiguous_format))
                sources.append(t.detach())
                setattr(layer, name, targets[-1])
    for targets, sources in by_dtype.values():
        torch._foreach_copy_(targets, sources)


# -- the whole state of a document, and its file ------------------------------------------

FORMAT = "infini-docqa/memory-state"
FORMAT_VERSION = 2  # 2: the memory lags the XL window (M_next, z_next); attention sinks
MEMORY_FIELDS = ("M", "z", "M_next", "z_next")  # fp32, fixed size
LAYER_TENSORS = (*MEMORY_FIELDS, "sink_k", "sink_v", "win_k", "win_v", "seg_k", "seg_v", "seg_mk")


class StateError(Exception):
    """A memory state cannot be used; the message says why in one sentence."""


class StateFormatError(StateError):
    """Not a memory-state file, or one of a format version this code does not read."""


class CorruptStateError(StateError):
    """Truncated or altered: the checksum does not match."""


class StateMismatchError(StateError):
    """Made by another model, conversion or segment length than the one it is loaded into."""


@dataclass
class MemoryState:
    """What a document leaves behind: per layer (M, z) and local windows, the tokens read,
    and what it belongs to. Reading runs whole segments only: the tokens of the unfinished
    last segment wait in `pending` and go through the model in front of whatever comes
    next (more text, or a question). So a snapshot holds no half segment, and its size
    does not depend on the document's length."""

    layers: list[LayerState]
    fingerprint: dict
    tokens: int = 0  # read so far, pending included
    pending: list[int] = field(default_factory=list)

    @property
    def segment_len(self) -> int:
        return self.fingerprint["conversion"]["segment_len"]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            f"layers.{i}.{name}": getattr(layer, name)
            for i, layer in enumerate(self.layers)
            for name in LAYER_TENSORS
            if getattr(layer, name) is not None and getattr(layer, name).numel()
        }

    def stored_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        """The tensors as saved: windows and pending tokens zero-padded to a whole segment
        (a sliding window may be longer), so that a snapshot's size does not depend on
        where the document ended; plus their true lengths."""
        tensors, lengths = {}, {}
        pending = torch.tensor(self.pending, dtype=torch.int64).view(1, 1, -1, 1)
        for key, t in {**self.tensors(), "pending": pending}.items():
            if key.split(".")[-1] in MEMORY_FIELDS:
                tensors[key] = t
                continue
            lengths[key] = t.shape[2]
            size = self.fingerprint["conversion"].get("sink_tokens", 0) if ".sink_" in key else self.segment_len
            pad = max(size, t.shape[2]) - t.shape[2]
            tensors[key] = torch.nn.functional.pad(t, (0, 0, 0, pad))
        return tensors, lengths

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.stored_tensors()[0].values())

    def clone(self) -> "MemoryState":
        """A copy with tensors of its own."""
        copy = self.fork()
        own_tensors(copy.layers)
        return copy

    def fork(self) -> "MemoryState":
        """A state to continue without changing this one, sharing its tensors: reading
        replaces a layer's tensors, never writes into them (a CUDA-graphed ingest writes in
        place only into buffers it cloned for itself first), so no copy is needed."""
        return MemoryState([replace(l) for l in self.layers], dict(self.fingerprint), self.tokens, list(self.pending))

    def check_compatible(self, fingerprint: dict) -> None:
        """Refuse, with the reason, a state made by anything but this model and conversion."""
        mine = self.fingerprint
        for key, what in (("architecture", "architecture"), ("weights", "base weights"),
                          ("adapter", "memory adapter")):
            if mine.get(key) != fingerprint.get(key):
                raise StateMismatchError(
                    f"this snapshot belongs to another model: its {what} differ "
                    f"(snapshot {_short(mine.get(key))}, model {_short(fingerprint.get(key))})")
        ours, theirs = mine.get("conversion", {}), fingerprint.get("conversion", {})
        for key in sorted(set(ours) | set(theirs)):
            if ours.get(key) != theirs.get(key):
                raise StateMismatchError(
                    f"this snapshot was made with {key}={ours.get(key)!r}, the model uses {theirs.get(key)!r}")

    def save(self, path) -> str:
        """Write safetensors with JSON metadata and a sha256 over both; returns the sha256."""
        from safetensors.torch import save

        if any(layer.seg_k is not None and layer.seg_k.shape[2] for layer in self.layers):
            raise StateError("a state in the middle of a segment cannot be saved; ingest() leaves none")
        tensors, lengths = self.stored_tensors()
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        window_dtype = next((t.dtype for k, t in tensors.items() if ".win_" in k), None)
        meta = {"format": FORMAT, "version": str(FORMAT_VERSION), "tokens": str(self.tokens),
                "layers": str(len(self.layers)), "lengths": json.dumps(lengths, sort_keys=True),
                "dtype": str(window_dtype).removeprefix("torch."),
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True), "checksum": PER_LAYER}
        meta["sha256"] = _checksum(_tensor_parts(tensors), meta)
        tmp = f"{path}.tmp"
        with open(tmp, "wb") as f:  # write-then-rename: a crash never leaves half a snapshot
            f.write(save(tensors, metadata=meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return meta["sha256"]

    @classmethod
    def load(cls, path, fingerprint: dict | None = None, device=None, dtype=None) -> "MemoryState":
        """Read and verify a state; with `fingerprint`, also refuse one made for another model.
        `dtype` is the model's: the windows follow it, M and z stay fp32."""
        meta, tensors = read_state_file(path, device)
        lengths = json.loads(meta["lengths"])
        pending = tensors.pop("pending")[0, 0, :lengths["pending"], 0].tolist()
        layers = [LayerState() for _ in range(int(meta["layers"]))]
        for key, value in tensors.items():
            _, i, name = key.split(".")
            if key in lengths:
                value = value[:, :, :lengths[key]]
            if dtype is not None and name not in MEMORY_FIELDS:
                value = value.to(dtype)
            setattr(layers[int(i)], name, value)
        state = cls(layers, json.loads(meta["fingerprint"]), int(meta["tokens"]), pending)
        for layer in layers:  # a snapshot sits on a segment boundary: all it ran is written
            layer.segments = (state.tokens - len(pending)) // state.segment_len
        if fingerprint is not None:
            state.check_compatible(fingerprint)
        return state


# safetensors' names of the dtypes a state holds
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64}


def read_state_file(path, device=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Metadata and tensors of a state file, verified: format, version and checksum. The
    tensors are views of one buffer (the file as read, or with `device` its one copy there):
    a state is a few hundred small tensors, and copying each on its own took longer than
    answering a question from them (time to the first token is counted from the file)."""
    name = os.path.basename(str(path))
    try:
        with open(path, "rb") as f:
            data = bytearray(os.fstat(f.fileno()).st_size)  # (writable: tensors view it)
            f.readinto(data)
    except FileNotFoundError:
        raise StateFormatError(f"{name}: no such snapshot file") from None
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = header.pop("__metadata__", None) or {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        raise StateFormatError(f"{name} is not a memory snapshot") from None
    if meta.get("format") != FORMAT:
        raise StateFormatError(f"{name} is not a memory snapshot")
    if meta.get("version") != str(FORMAT_VERSION):
        raise StateFormatError(f"{name} has snapshot format version {meta.get('version')}; "
                               f"this version of infini-docqa reads version {FORMAT_VERSION}")
    start = 8 + header_len  # (safetensors aligns it to 8 bytes)
    try:
        layout = _layout(header, len(data) - start)
    except (KeyError, TypeError, ValueError):
        raise CorruptStateError(f"{name} is truncated or damaged") from None
    body = memoryview(data)[start:]
    expected = meta.pop("sha256", None)
    if expected != _checksum({key: (_described(key, dtype, shape), body[begin:end])
                              for key, (dtype, shape, begin, end) in layout.items()}, meta):
        raise CorruptStateError(f"{name} is damaged: its checksum does not match its contents")
    meta["sha256"] = expected
    blob = torch.frombuffer(data, dtype=torch.uint8)
    blob = blob.to(device) if device is not None else blob
    try:
        return meta, {key: blob[start + begin:start + end].view(dtype).view(shape) if end > begin
                      else torch.zeros(shape, dtype=dtype, device=blob.device)
                      for key, (dtype, shape, begin, end) in layout.items()}
    except RuntimeError:  # (bytes not aligned to their dtype)
        raise CorruptStateError(f"{name} is truncated or damaged") from None


def _layout(header: dict, size: int) -> dict[str, tuple]:
    """key -> (dtype, shape, first byte, end) of each tensor a safetensors header lays out in
    the `size` bytes after it; ValueError where they do not fit."""
    layout = {}
    for key, entry in header.items():
        dtype, shape = DTYPES[entry["dtype"]], [int(x) for x in entry["shape"]]
        begin, end = (int(x) for x in entry["data_offsets"])
        if end - begin != dtype.itemsize * math.prod(shape) or not 0 <= begin <= end <= size:
            raise ValueError(f"{key}: its bytes lie outside the file")
        layout[key] = dtype, shape, begin, end
    return layout


# meta["checksum"]: meta["sha256"] is the sha256 of the metadata and of one sha256 per layer
# (and one of the pending tokens), which hash in parallel. Files written before it (no
# "checksum" in their metadata) hold one sha256 over all tensors.
PER_LAYER = "sha256-per-layer"


def _checksum(parts: dict[str, tuple[str, object]], meta: dict) -> str:
    """The checksum, as meta["checksum"] says, of a state file's metadata and tensors (key ->
    (its "key:dtype:shape", its bytes)). Per layer because sha256 reads ~1 GB/s: hashing a
    14 MiB state in one stream was most of the time to load one from disk
    (docs/benchmarks.md, eleventh session)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "sha256"}, sort_keys=True).encode())
    if meta.get("checksum") != PER_LAYER:
        _hash_parts(h, parts, sorted(parts))
        return h.hexdigest()
    groups: dict[str, list[str]] = {}  # "layers.3" (or "pending") -> its tensors' keys
    for key in sorted(parts):
        groups.setdefault(key.rsplit(".", 1)[0], []).append(key)
    digests = _hash_threads().map(lambda keys: _hash_parts(hashlib.sha256(), parts, keys).digest(), groups.values())
    for group, digest in zip(groups, digests):
        h.update(group.encode())
        h.update(digest)
    return h.hexdigest()


def _tensor_parts(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[str, object]]:
    """What `_checksum` hashes of tensors held in CPU memory (the buffers themselves, not copies)."""
    return {key: (_described(key, t.dtype, t.shape), t.contiguous().view(torch.uint8).numpy())
            for key, t in tensors.items()}


def _described(key: str, dtype: torch.dtype, shape) -> str:
    """What the checksum hashes before a tensor's bytes: its key, dtype and shape."""
    return f"{key}:{dtype}:{tuple(shape)}"


def _hash_parts(h, parts: dict[str, tuple[str, object]], keys: list[str]):
    for key in keys:
        described, data = parts[key]
        h.update(described.encode())
        h.update(data)
    return h


_threads: tuple[int, ThreadPoolExecutor] | None = None  # (the process it belongs to, the pool)


def _hash_threads() -> ThreadPoolExecutor:
    """Threads for hashing (hashlib lets go of the GIL), made again in a forked process (a
    Celery worker child), where the parent's threads do not exist."""
    global _threads
    if _threads is None or _threads[0] != os.getpid():
        _threads = os.getpid(), ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="state-checksum")
    return _threads[1]


def _short(value) -> str:
    return "none" if value is None else str(value)[:12]
