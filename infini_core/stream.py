"""Feeding a document through a converted model piece by piece, carrying its state."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .convert import infini_layers
from .state import LayerState


def new_layer_states(model: nn.Module) -> list[LayerState]:
    return [LayerState() for _ in infini_layers(model)]


@contextmanager
def _on_layers(model: nn.Module, name: str, layer_states: list[LayerState]):
    layers = infini_layers(model)
    if len(layers) != len(layer_states):
        raise ValueError(f"state has {len(layer_states)} layers, the model {len(layers)}")
    for attn, state in zip(layers, layer_states):
        setattr(attn, name, state)
    try:
        yield
    finally:
        for attn in layers:
            setattr(attn, name, None)


def bound(model: nn.Module, layer_states: list[LayerState]):
    """Make the model's layers read and update these states while inside the block."""
    return _on_layers(model, "state", layer_states)


def starting_from(model: nn.Module, layer_states: list[LayerState]):
    """Every forward inside that has no bound state (training's) starts from a copy of these
    states, so a layer that gradient checkpointing runs again starts where its first run did."""
    return _on_layers(model, "start", layer_states)


def forward(model: nn.Module, input_ids: torch.Tensor, layer_states: list[LayerState], logits: bool = True,
            logits_to_keep: int = 0):
    """Continue the stream with input_ids [B, T]: the next-token logits (of the last
    `logits_to_keep` positions; 0: all), or, with logits=False, the last hidden states: no
    LM head, as ingest needs."""
    with bound(model, layer_states):
        if logits:
            return model(input_ids=input_ids, use_cache=False, logits_to_keep=logits_to_keep).logits
        return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def continue_stream(model, state, ids: list[int], logits: bool = True):
    """Run a MemoryState's pending tokens and then `ids` (a prompt, say) through the model,
    updating the state. Returns the logits of what comes next, [B, 1, V] (the LM head runs
    on the last position only: over a 600-token prompt it would be 34 GFLOP), or with
    logits=False the last hidden states of `ids`."""
    run = state.pending + list(ids)
    out = forward(model.lm, torch.tensor([run], device=model.device), state.layers, logits=logits, logits_to_keep=1)
    state.pending = []
    state.tokens += len(ids)
    return out if logits else out[:, len(run) - len(ids):]


def settle(model, state) -> None:
    """Run the state's pending tokens (its unfinished last segment) through the model now,
    so that each question forked from it runs only its own prompt instead of up to a
    segment more. The state is then mid-segment: it can be forked and continued, not saved."""
    if state.pending:
        with torch.no_grad():
            continue_stream(model, state, [], logits=False)
