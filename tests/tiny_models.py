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


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained here on a few sentences (no download), with a
    chat template and an end-of-turn token like the default model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(["The lighthouse keeper read the old book in the lamp room."] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>",
                                   eos_token="<|im_end|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def save_tiny_checkpoint(folder, arch: str = "llama", seed: int = 0, **overrides):
    """A tiny random model and tokenizer as a checkpoint folder, as a user would have one."""
    tokenizer = tiny_tokenizer()
    model = tiny_model(arch, seed=seed, **{"vocab_size": len(tokenizer), **overrides})
    model.generation_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
