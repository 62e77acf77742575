"""Perplexity of long texts read in one stream, by position: does reading with memory
predict later text better than reading each window alone?"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ingest import new_state
from ..stream import forward


def stream_nll(model, ids: list[int], block_segments: int = 8) -> torch.Tensor:
    """Negative log-likelihood of every token after the first, the text read in blocks of
    whole segments (the state carried across blocks), as fp32 on the CPU."""
    state = new_state(model)
    block = block_segments * model.config.segment_len
    nll, carry = [], None  # carry: the logits that predict the next block's first token
    with torch.no_grad():
        for start in range(0, len(ids), block):
            x = torch.tensor([ids[start:start + block]], device=model.device)
            logits = forward(model.lm, x, state.layers)[0].float()
            if carry is not None:
                nll.append(F.cross_entropy(carry[None], x[0, :1]).view(1))
            nll.append(F.cross_entropy(logits[:-1], x[0, 1:], reduction="none"))
            carry = logits[-1]
    return torch.cat(nll).cpu()


def base_model(model):
    """The unconverted model that `model` was made from, in its dtype and on its device:
    the reference that reads a text whole, where the text fits its context."""
    from transformers import AutoModelForCausalLM

    from ..loading import checkpoint_dir

    return AutoModelForCausalLM.from_pretrained(checkpoint_dir(model.fingerprint["source"]["model"]),
                                                dtype=model.lm.dtype, attn_implementation="sdpa").to(model.device).eval()


def full_context_nll(lm, ids: list[int], device) -> torch.Tensor:
    """The base model reading the text in one forward (only where it fits its context)."""
    with torch.no_grad():
        x = torch.tensor([ids], device=device)
        logits = lm(input_ids=x, use_cache=False).logits[0].float()
        return F.cross_entropy(logits[:-1], x[0, 1:], reduction="none").cpu()


def bucketed_perplexity(nll: torch.Tensor, bucket: int) -> list[float]:
    """exp(mean NLL) over consecutive buckets of positions (the last may be shorter)."""
    return [math.exp(chunk.mean().item()) for chunk in nll.split(bucket) if len(chunk)]


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(nll.mean().item())


def gain_by_half(segment_only: list[float], memory: list[float]) -> tuple[float, float]:
    """How much lower the memory's perplexity is than the window alone's (%), over the first
    and the second half of the buckets (a text's last one, which may be shorter, left out;
    with an odd count, the middle one too): a memory that carries the book should gain
    more the further in it reads."""
    gains = [100 * (1 - m / s) for s, m in list(zip(segment_only, memory))[:-1]]
    half = len(gains) // 2
    if half == 0:
        raise ValueError("a text of fewer than two full buckets has no halves")
    return sum(gains[:half]) / half, sum(gains[-half:]) / half

