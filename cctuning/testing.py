"""Tiny random models and a locally built tokenizer, for tests and benchmarks (no model hub).

``tiny_tokenizer()`` trains a byte-level BPE on a few multilingual sentences, so any Unicode
text round-trips, and gives it a ChatML chat template. ``tiny_model(arch)`` builds a randomly
initialised model of each supported architecture from its config.
"""

from __future__ import annotations

import functools

CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Answer the question.",
    "Translate into English: Habari ya asubuhi, rafiki yangu.",
    "请回答下面的问题。今天天气很好。",
    "ما هي عاصمة مصر؟ القاهرة هي العاصمة.",
    "नमस्ते, आप कैसे हैं? मैं ठीक हूँ।",
    "สวัสดีครับ วันนี้อากาศดีมาก",
    "Привет, как дела? Всё хорошо, спасибо.",
    "Merhaba, nasılsın? İyiyim, teşekkürler.",
    "1 2 3 4 5 6 7 8 9 0 (1) (2) (3) A B C D: answer is",
]

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3_text")


@functools.lru_cache(maxsize=1)
def _tokenizer_object():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True):
    """A fast tokenizer with pad/bos/eos, ``<|im_start|>``/``<|im_end|>`` and (optionally) ChatML."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_object()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_config(arch: str, vocab_size: int, num_layers: int = 3, hidden_size: int = 32):
    from transformers import AutoConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=arch == "gemma3_text",
    )
    if arch == "gemma3_text":
        common.update(head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
    if arch not in ARCHITECTURES:
        raise ValueError(f"no tiny config for {arch!r}; known: {ARCHITECTURES}")
    return AutoConfig.for_model(arch, **common)


def tiny_model(arch: str = "llama", seed: int = 0, tokenizer=None, **kwargs):
    """A random float32 causal LM of ``arch`` sized for the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model
