"""Tiny random models and tokenizers for tests, examples and CPU smoke runs (nothing is downloaded)."""
from __future__ import annotations

import functools

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from gendistill.tokenizer import train_tokenizer

_CORPUS = [
    "Alice Moreau was born on 3 May 1971 in Lyon. She studied physics at the University of Geneva.",
    "Bruno Keller works for Helix Labs in Zurich. He was born in Basel and studied chemistry.",
    "The answer is (B). Question: where was Alice born? Answer: Lyon.",
    "Numbers 0 1 2 3 4 5 6 7 8 9 10 42 1971 2024. Letters A B C D.",
    "The quick brown fox jumps over the lazy dog while the key is 7351.",
]


@functools.lru_cache(maxsize=None)
def _cached_tokenizer(vocab_size: int):
    return train_tokenizer(_CORPUS * 20, vocab_size=vocab_size, min_frequency=1)


def tiny_tokenizer(vocab_size: int = 384):
    """A small byte-level BPE with the ChatML chat template (a fresh copy each call)."""
    import copy

    return copy.deepcopy(_cached_tokenizer(vocab_size))


def tiny_qwen3_config(vocab_size: int = 384, layers: int = 4, hidden: int = 64, heads: int = 4, kv_heads: int = 2,
                      head_dim: int = 16, intermediate: int = 128, **overrides) -> Qwen3Config:
    kw = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, max_position_embeddings=4096,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


def tiny_qwen3(seed: int = 0, **config_kw) -> Qwen3ForCausalLM:
    """A random tiny Qwen3ForCausalLM in eval mode (fp32, SDPA)."""
    torch.manual_seed(seed)
    cfg = tiny_qwen3_config(**config_kw)
    cfg._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(cfg).eval()
    # Random init gives near-uniform logits; a larger std makes argmax decisions (and test failures) meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.08)
    return model


def qwen3_0_6b_config(**overrides) -> Qwen3Config:
    """The published Qwen3-0.6B shape (random weights when instantiated)."""
    kw = dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        bos_token_id=151643, eos_token_id=151645, pad_token_id=151643,
    )
    kw.update(overrides)
    return Qwen3Config(**kw)


SHAPES = ("tiny", "qwen3-0.6b")


def random_teacher_and_student(shape: str, seed: int = 0):
    """A teacher with random weights in a known shape ("tiny": 4 layers for CPU runs; "qwen3-0.6b": the published
    shape, SDPA) and its student from `convert` (paper layer set), both fp32 on CPU: what benchmarks time when speed
    and memory, not the weights' values, are the question."""
    from gendistill.convert import convert

    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}: one of {', '.join(SHAPES)}")
    if shape == "tiny":
        teacher = tiny_qwen3(seed=seed, layers=4)
    else:
        torch.manual_seed(seed)
        config = qwen3_0_6b_config()
        config._attn_implementation = "sdpa"
        teacher = Qwen3ForCausalLM(config).eval()
    return teacher, convert(teacher, seed=seed)
def printable_outputs_only(model, tokenizer) -> None:
    """Zero the output rows of every token that is special, outside `tokenizer`'s vocabulary, or does not decode on
    its own to printable ASCII, so greedy decoding of random weights (whose logits then vary around the zero those
    rows give) picks whole printable tokens only: no end-of-turn, and no lone UTF-8 bytes, which a streamed decode
    holds back. Tied embeddings lose those rows too (fine for a random model: prompts are made of allowed tokens)."""
    vocab = model.get_output_embeddings().weight
    banned = [i for i in range(vocab.shape[0]) if i >= len(tokenizer) or i in tokenizer.all_special_ids
              or not (text := tokenizer.decode([i])).isascii() or not text.isprintable()]
    with torch.no_grad():
        vocab[banned] = 0
