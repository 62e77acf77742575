"""Infini-attention for Hugging Face causal LMs: a pure library (torch, transformers, triton)."""

from .attention import InfiniAttention, InfiniConfig
from .convert import convert_to_infini, gate_parameters, infini_layers, memory_parameters
from .memory import infini_memory

__all__ = [
    "InfiniAttention",
    "InfiniConfig",
    "convert_to_infini",
    "gate_parameters",
    "infini_layers",
    "infini_memory",
    "memory_parameters",
]
