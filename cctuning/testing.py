"""Tiny random models and a locally built tokenizer, for tests and benchmarks (no model hub).

``tiny_tokenizer()`` trains a byte-level BPE on a few multilingual sentences, so any Unicode
text round-trips, and gives it a ChatML chat template. ``tiny_model(arch)`` builds a randomly
initialised model of each supported architecture from its config.
"""

from __future__ import annotations

import functools

import tokenizers
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

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
# further architectures with their own mechanism tests (tests/test_architectures.py); kept apart so
# that the tests parametrized over ARCHITECTURES do not grow with them
MORE_ARCHITECTURES = (
    "qwen3",
    "phi3",
    "olmo2",
    "gemma2",
    "gpt_neox",  # parallel residual (use_parallel_residual, the default)
    "gpt_neox_sequential",  # gpt_neox with use_parallel_residual=False
    "phi",  # Phi-2: attention and MLP in parallel on one LayerNorm
    "gpt2",
    "mixtral",  # mixture of experts
    "qwen3_moe",  # mixture of experts; layer 0 a dense MLP (mlp_only_layers)
    "qwen2_moe",  # mixture of experts with a gated shared expert
)


@functools.lru_cache(maxsize=1)
def _tokenizer_object():
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return tok.to_str()


def tiny_tokenizer(chat_template: bool = True):
    """A fast tokenizer with pad/bos/eos, ``<|im_start|>``/``<|im_end|>`` and (optionally) ChatML."""
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_str(_tokenizer_object()),
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template:
        tok.chat_template = CHATML_TEMPLATE
    return tok


def tiny_config(arch: str, vocab_size: int, num_layers: int = 3, hidden_size: int = 32):
    """A small random config of ``arch`` (one of ARCHITECTURES or MORE_ARCHITECTURES); dropout is
    off everywhere, so that a training step is deterministic."""
    if arch not in ARCHITECTURES + MORE_ARCHITECTURES:
        raise ValueError(f"no tiny config for {arch!r}; known: {ARCHITECTURES + MORE_ARCHITECTURES}")
    tokens = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "gpt2":  # GPT-2's own names; its dropouts default to 0.1
        return AutoConfig.for_model(
            "gpt2",
            n_embd=hidden_size,
            n_inner=2 * hidden_size,
            n_layer=num_layers,
            n_head=4,
            n_positions=512,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=False,
            **tokens,
        )
    common = dict(
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        max_position_embeddings=512,
        tie_word_embeddings=arch in ("gemma3_text", "gemma2"),
        **tokens,
    )
    if arch not in ("gpt_neox", "gpt_neox_sequential"):
        common.update(num_key_value_heads=2)
    if arch in ("gemma3_text", "gemma2"):
        common.update(head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
    if arch in ("qwen3", "qwen3_moe"):
        common.update(head_dim=hidden_size // 4)  # their default is 128
    if arch in ("gpt_neox", "gpt_neox_sequential"):
        common.update(use_parallel_residual=arch == "gpt_neox", hidden_dropout=0.0, attention_dropout=0.0)
        arch = "gpt_neox"
    if arch == "phi":
        common.update(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if arch == "phi3":
        common.update(resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if arch == "mixtral":
        common.update(num_local_experts=4, num_experts_per_tok=2)
    if arch in ("qwen3_moe", "qwen2_moe"):
        # layer 0 is a dense MLP, the others mixtures of 4 experts (2 per token)
        common.update(
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden_size, mlp_only_layers=[0]
        )
    if arch == "qwen3_moe":
        common.update(norm_topk_prob=True)
    if arch == "qwen2_moe":
        common.update(shared_expert_intermediate_size=hidden_size)
    return AutoConfig.for_model(arch, **common)


def tiny_model(arch: str = "llama", seed: int = 0, tokenizer=None, **kwargs):
    """A random float32 causal LM of ``arch`` sized for the tiny tokenizer."""
    tokenizer = tokenizer or tiny_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tokenizer), **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.eval()
    return model
