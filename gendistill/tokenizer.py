"""Byte-level BPE tokenizers trained locally (no hub download), with a Qwen-style chat template; and the one
tokenizer fingerprint (token caches, run.json, eval manifests)."""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Qwen's ChatML layout without the thinking machinery: <|im_start|>role\ncontent<|im_end|>\n
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def tokenizer_fingerprint(tokenizer) -> str:
    """Equal fingerprints: the same text gives the same token ids and a chat renders the same way (the backend's
    whole definition -- vocabulary, merges, normaliser, pre-tokeniser, special tokens -- plus the chat template and
    eos). Token caches are keyed by it, run.json records it (a resumed stage refuses another tokenizer), and eval
    compares greedy outputs token by token only between models whose fingerprints are equal."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(repr((getattr(tokenizer, "chat_template", None), tokenizer.eos_token)).encode())
    return h.hexdigest()[:16]


def render_chatml(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """CHAT_TEMPLATE in Python, for text that is rendered by the ten thousand (the world's chat data): the same string
    as `apply_chat_template(messages, tokenize=False)` with that template, which tests/test_world.py checks."""
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and wrap it as a HF fast tokenizer (pad = <|endoftext|>, eos = <|im_end|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        padding_side="left",
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf
