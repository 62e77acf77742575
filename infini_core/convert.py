"""Retrofit a Hugging Face causal LM with Infini-attention, in place."""

from __future__ import annotations

from torch import nn
from transformers import AttentionInterface

from .attention import InfiniAttention, InfiniConfig, RopeTable

# model_type of the text config -> the architectures whose attention we know how to reuse
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "gemma3_text")

# A converted model's attention implementation, registered with Hugging Face's public
# AttentionInterface. It has no mask function, so Hugging Face builds no attention mask for
# our layers, which mask for themselves: under CUDA-graph capture it otherwise materialised
# a [T, T] causal mask (1 GiB for a 32K block) in every replayed block.
ATTENTION_NAME = "infini"


def _attention_not_used(*args, **kwargs):
    raise RuntimeError("InfiniAttention attends by itself; Hugging Face's attention functions are not used")


AttentionInterface.register(ATTENTION_NAME, _attention_not_used)


def convert_to_infini(model: nn.Module, config: InfiniConfig | None = None) -> nn.Module:
    """Swap every decoder layer's attention for InfiniAttention (memory on the global
    layers, sliding layers keep their window). The gates start closed, so inside one
    segment the model computes what it computed before."""
    config = config or InfiniConfig()
    hf = model.config
    if hf.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {hf.model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("bidirectional attention cannot stream a document")
    base = model.base_model
    if any(isinstance(layer.self_attn, InfiniAttention) for layer in base.layers):
        raise ValueError("this model is already converted to Infini-attention")
    rope = RopeTable(base.rotary_emb)
    layer_types = getattr(hf, "layer_types", None)
    for i, layer in enumerate(base.layers):
        layer_type = layer_types[i] if layer_types else None
        window = hf.sliding_window if layer_type == "sliding_attention" else None
        layer.self_attn = InfiniAttention(
            layer.self_attn, config, hf.num_attention_heads, hf.num_key_value_heads, rope, layer_type, window
        )
    model.set_attn_implementation(ATTENTION_NAME)
    # the state lives in our layers; Hugging Face's KV cache must not be used
    hf.use_cache = False
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.use_cache = False
    model.infini_config = config
    return model


def infini_layers(model: nn.Module) -> list[InfiniAttention]:
    layers = [layer.self_attn for layer in model.base_model.layers]
    if not all(isinstance(attn, InfiniAttention) for attn in layers):
        raise ValueError("this model is not converted: call convert_to_infini(model) first")
    return layers


def memory_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """What the memory owns (gates, sharpness, memory Q/K), by name: the adapter."""
    return {name: p for name, p in model.named_parameters() if ".memory_" in name}


def gate_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The per-head gates, for their own learning rate."""
    return [attn.memory_gate for attn in infini_layers(model) if attn.has_memory]
