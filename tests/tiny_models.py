"""Tiny random models of each supported architecture, built here, never downloaded."""

import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def tiny_model(arch: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, intermediate_size=64, num_hidden_layers=2, attn_implementation="sdpa")
    if arch == "llama":  # GQA 3:1, like SmolLM2
        model = LlamaForCausalLM(LlamaConfig(**{**common, "hidden_size": 96, "num_attention_heads": 6,
                                                "num_key_value_heads": 2, "head_dim": 16, **overrides}))
    elif arch == "qwen2":  # biased q/k/v projections
        model = Qwen2ForCausalLM(Qwen2Config(**{**common, "hidden_size": 96, "num_attention_heads": 6,
                                                "num_key_value_heads": 2, **overrides}))
    elif arch == "gemma3":  # q/k norms, sliding local layers around one global layer
        model = Gemma3ForCausalLM(Gemma3TextConfig(**{
            **common, "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "num_hidden_layers": 4, "sliding_window": 6, "query_pre_attn_scalar": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            **overrides}))
    else:
        raise ValueError(arch)
    return model.eval()


ARCHS = ("llama", "qwen2", "gemma3")
