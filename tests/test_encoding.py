import pytest
import torch

from cctuning.data.collator import CCCollator
from cctuning.data.encoding import IGNORE_INDEX, PLAIN_HEAD, PLAIN_TAIL, PromptEncoder, PromptFormat
from cctuning.errors import CCError
from cctuning.testing import tiny_tokenizer


def template_ids(tok, instruction):
    """The prompt as Hugging Face tokenises it, computed independently of our encoder."""
    ids = tok.apply_chat_template(
        [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_prompt_matches_chat_template_and_labels_mask_exactly_the_prompt(tokenizer):
    enc = PromptEncoder(tokenizer)
    ex = enc.encode_example("Habari ya asubuhi?", "Nzuri sana.", "Good morning?")
    prompt = template_ids(tokenizer, "Habari ya asubuhi?")
    n = len(prompt)
    assert ex.input_ids[:n] == prompt
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:] and len(ex.labels) == len(ex.input_ids)
    assert tokenizer.decode(ex.input_ids[n:]) == "Nzuri sana.<|im_end|>\n"
    assert ex.position == n - 1  # the last prompt token: the one that predicts the first response token
    assert ex.en_input_ids == template_ids(tokenizer, "Good morning?")
    assert ex.en_position == len(ex.en_input_ids) - 1


def test_position_offset_counts_back_from_the_last_prompt_token(tokenizer):
    enc = PromptEncoder(tokenizer, PromptFormat(position_offset=2))
    ex = enc.encode_example("Habari?", "Nzuri.", "Hello?")
    n = len(template_ids(tokenizer, "Habari?"))
    assert ex.position == n - 3 and ex.en_position == len(ex.en_input_ids) - 3


def test_truncation_cuts_response_first_then_instruction_start(tokenizer):
    instruction = " ".join(f"neno{i}" for i in range(60))
    full = PromptEncoder(tokenizer).encode_example(instruction, "jibu " * 40, instruction)
    prompt_len = full.position + 1
    resp_len = len(full.input_ids) - prompt_len
    # budget that only needs the response cut
    enc = PromptEncoder(tokenizer, max_length=prompt_len + 5)
    ex = enc.encode_example(instruction, "jibu " * 40, instruction)
    assert len(ex.input_ids) == prompt_len + 5 and ex.response_cut == resp_len - 5 and ex.instruction_cut == 0
    assert ex.input_ids[:prompt_len] == full.input_ids[:prompt_len]
    # budget smaller than the prompt: one response token kept, the instruction loses its start
    limit = prompt_len - 10
    enc = PromptEncoder(tokenizer, max_length=limit)
    ex = enc.encode_example(instruction, "jibu " * 40, instruction)
    assert len(ex.input_ids) == limit
    assert ex.labels.count(IGNORE_INDEX) == limit - 1  # exactly one response token survives
    assert ex.instruction_cut == 11 and ex.response_cut == resp_len - 1
    tail = template_ids(tokenizer, "x")[-3:]  # "<|im_end|>\n<|im_start|>assistant\n" end of the template
    assert ex.input_ids[ex.position - 2 : ex.position + 1] == tail
    head = full.input_ids[:3]
    assert ex.input_ids[:3] == head  # the template head (bos, role header) is kept
    # the English prompt is truncated on its own, to the same max_length
    assert len(ex.en_input_ids) == limit and ex.en_instruction_cut == prompt_len - limit
    assert enc.stats.instruction_cut_examples == 1 and enc.stats.response_cut_tokens == resp_len - 1


def test_prompt_template_longer_than_max_length_is_a_clear_error(tokenizer):
    with pytest.raises(CCError, match="max_length"):
        PromptEncoder(tokenizer, max_length=4).encode_example("a", "b", "c")


def test_plain_fallback_for_tokenizers_without_chat_template():
    tok = tiny_tokenizer(chat_template=False)
    enc = PromptEncoder(tok)  # auto → plain
    assert enc.mode == "plain"
    ex = enc.encode_example("Habari?", "Nzuri.", None)
    text = tok.decode(ex.input_ids)
    assert text == "<s>" + PLAIN_HEAD + "Habari?" + PLAIN_TAIL + "Nzuri.</s>"
    assert tok.decode(ex.input_ids[: ex.position + 1]).endswith(PLAIN_TAIL)
    with pytest.raises(CCError, match="no chat template"):
        PromptEncoder(tok, PromptFormat(mode="chat"))


@pytest.mark.parametrize("side", ["left", "right", "aligned"])
def test_collator_positions_follow_padding(tokenizer, side):
    enc = PromptEncoder(tokenizer)
    exs = [
        enc.encode_example(q, a, e)
        for q, a, e in [
            ("Habari?", "Nzuri sana sana.", "Hello?"),
            (
                "请回答下面的问题。今天天气很好。",
                "好",
                "Please answer the question below, the weather is good today.",
            ),
            ("ما هي عاصمة مصر؟", "القاهرة", "What is the capital of Egypt?"),
        ]
    ]
    batch = CCCollator(tokenizer.pad_token_id, side)([e.features() for e in exs])
    for i, ex in enumerate(exs):
        assert batch["input_ids"][i, batch["cc_position"][i]] == ex.input_ids[ex.position]
        assert batch["en_input_ids"][i, batch["en_cc_position"][i]] == ex.en_input_ids[ex.en_position]
        real = batch["attention_mask"][i].bool()
        assert batch["input_ids"][i][real].tolist() == ex.input_ids
        assert batch["labels"][i][real].tolist() == ex.labels
        assert (batch["labels"][i][~real] == IGNORE_INDEX).all()
        # every token before p in the row is prompt: no label there
        assert (batch["labels"][i, : batch["cc_position"][i] + 1] == IGNORE_INDEX).all()
        assert batch["labels"][i, batch["cc_position"][i] + 1] != IGNORE_INDEX
    lengths = torch.tensor([len(e.input_ids) for e in exs])
    positions = torch.tensor([e.position for e in exs])
    if side == "aligned":  # every p in one column, the longest prompt's; responses padded on the right
        assert (batch["cc_position"] == positions.max()).all()
        assert batch["input_ids"].shape[1] == int(positions.max() + (lengths - positions).max())
        assert (batch["en_cc_position"] == batch["en_input_ids"].shape[1] - 1).all()  # English: left
        return
    assert (batch["cc_position"] - positions == ((lengths.max() - lengths) if side == "left" else 0)).all()
