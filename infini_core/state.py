"""The state a document leaves behind in each layer, and its container."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _cat(*parts: torch.Tensor | None) -> torch.Tensor:
    return torch.cat([p for p in parts if p is not None], dim=2)


@dataclass
class LayerState:
    """One layer's part of a stream. Keys are kept before RoPE, shaped [B, Hkv, t, D].

    memory layers: M [B, Hkv, Dk, Dv] and z [B, Hkv, Dk] (fp32); `win_*` the previous
    segment (with xl_window); `seg_*` the current, unfinished segment (`seg_mk` its memory
    keys), written into M and z once it is complete.
    sliding layers: `win_*` the last sliding_window - 1 tokens.
    """

    M: torch.Tensor | None = None
    z: torch.Tensor | None = None
    win_k: torch.Tensor | None = None
    win_v: torch.Tensor | None = None
    seg_k: torch.Tensor | None = None
    seg_v: torch.Tensor | None = None
    seg_mk: torch.Tensor | None = None

    @property
    def segment_tokens(self) -> int:
        return 0 if self.seg_k is None else self.seg_k.shape[2]

    @property
    def has_window(self) -> bool:
        return self.win_k is not None and self.win_k.shape[2] > 0

    def init_memory(self, k: torch.Tensor, dv: int) -> None:
        b, h, _, dk = k.shape
        self.M = torch.zeros(b, h, dk, dv, dtype=torch.float32, device=k.device)
        self.z = torch.zeros(b, h, dk, dtype=torch.float32, device=k.device)

    # sliding layers
    def window_with(self, k, v):
        return _cat(self.win_k, k), _cat(self.win_v, v)

    def keep_window(self, k, v, size: int) -> None:
        start = max(0, k.shape[2] - size)
        self.win_k, self.win_v = k[:, :, start:], v[:, :, start:]

    # memory layers
    def local_with(self, k, v, xl_window: bool):
        win_k, win_v = (self.win_k, self.win_v) if xl_window else (None, None)
        return _cat(win_k, self.seg_k, k), _cat(win_v, self.seg_v, v)

    def append_segment(self, k, v, mk) -> None:
        self.seg_k, self.seg_v, self.seg_mk = _cat(self.seg_k, k), _cat(self.seg_v, v), _cat(self.seg_mk, mk)

    def take_segment(self, xl_window: bool):
        """The completed segment; it becomes the window of the next one (with xl_window)."""
        done = self.seg_k, self.seg_v, self.seg_mk
        if xl_window:
            self.win_k, self.win_v = self.seg_k, self.seg_v
        self.seg_k = self.seg_v = self.seg_mk = None
        return done
