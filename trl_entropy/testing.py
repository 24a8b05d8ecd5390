"""Tiny offline models for tests, examples and smoke runs: a WordLevel tokenizer and a 2-layer Llama."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
WORDS = [str(i) for i in range(41)] + "what is + - = ? the answer a b c yes no".split()

# A minimal chat template, so conversational datasets work with the tiny tokenizer as with a real chat model.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }} {% endfor %}{% if add_generation_prompt %}= {% endif %}"
)


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace WordLevel tokenizer over numbers 0-40, a few words and ``<pad>``/``<eos>``/``<unk>``."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def make_tiny_model(seed: int = 0, vocab_size: int | None = None, hidden_size: int = 32) -> LlamaForCausalLM:
    """A randomly initialised 2-layer Llama (about 40k parameters) that runs a GRPO step in well under a second."""
    vocab_size = vocab_size or len(SPECIAL_TOKENS) + len(WORDS)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    return model


def make_tiny_model_and_tokenizer(seed: int = 0) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """``(make_tiny_model(seed), make_tiny_tokenizer())``."""
    return make_tiny_model(seed), make_tiny_tokenizer()


def tiny_prompts(n: int = 8, seed: int = 0) -> list[str]:
    """``n`` short arithmetic prompts in the tiny vocabulary, e.g. ``"what is 3 + 4 ?"``."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, 20, (n, 2), generator=g).tolist()
    return [f"what is {a} + {b} ?" for a, b in pairs]
