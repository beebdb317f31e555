"""Pad a list of tokenised examples into a batch, keeping each row's connection position right."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from cctuning.data.encoding import IGNORE_INDEX


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos id when it has none (never a new token)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def pad_rows(
    rows: list[list[int]],
    pad_value: int,
    side: str = "right",
    multiple_of: int | None = None,
    anchors: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad ``rows`` to one length. Returns ``(ids, attention_mask, shift)`` where ``shift[i]`` is
    how far row i's tokens moved right (its left padding), to add to positions inside the row.

    ``side="aligned"`` pads on both sides so that every row's ``anchors[i]`` (an index in the row)
    lands in one column, the rightmost anchor's: left padding up to it, right padding after."""
    if side not in ("left", "right", "aligned"):
        raise ValueError(f"padding side must be 'left', 'right' or 'aligned', not {side!r}")
    if side == "aligned":
        if anchors is None or len(anchors) != len(rows):
            raise ValueError("aligned padding needs one anchor per row")
        lead = [max(anchors) - a for a in anchors]
    else:
        lead = None
    width = max(len(r) + (lead[i] if lead else 0) for i, r in enumerate(rows))
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(rows), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    shift = torch.zeros(len(rows), dtype=torch.long)
    for i, row in enumerate(rows):
        start = lead[i] if lead else (width - len(row) if side == "left" else 0)
        ids[i, start : start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, start : start + len(row)] = 1
        shift[i] = start
    return ids, mask, shift


@dataclass
class CCCollator:
    """Batches :meth:`EncodedExample.features` dicts.

    Produces ``input_ids``, ``attention_mask``, ``labels`` (-100 on prompt and padding) and
    ``cc_position``; when the examples carry an English prompt also ``en_input_ids``,
    ``en_attention_mask`` and ``en_cc_position``. Positions are corrected for left padding.
    ``padding_side="aligned"`` puts every row's p in one column (prompts padded on the left,
    responses on the right; the English prompts, which end at their p, are padded on the left):
    connected scoring then runs the prompts up to p once and only the responses after it.
    """

    pad_token_id: int
    padding_side: str = "right"
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        anchors = [f["cc_position"] for f in features] if self.padding_side == "aligned" else None
        ids, mask, shift = pad_rows(
            [f["input_ids"] for f in features],
            self.pad_token_id,
            self.padding_side,
            self.pad_to_multiple_of,
            anchors,
        )
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in features[0]:
            labels, _, _ = pad_rows(
                [f["labels"] for f in features],
                IGNORE_INDEX,
                self.padding_side,
                self.pad_to_multiple_of,
                anchors,
            )
            batch["labels"] = labels
        batch["cc_position"] = torch.tensor([f["cc_position"] for f in features], dtype=torch.long) + shift
        if "en_input_ids" in features[0]:
            en_ids, en_mask, en_shift = pad_rows(
                [f["en_input_ids"] for f in features],
                self.pad_token_id,
                "left" if self.padding_side == "aligned" else self.padding_side,
                self.pad_to_multiple_of,
            )
            batch["en_input_ids"], batch["en_attention_mask"] = en_ids, en_mask
            batch["en_cc_position"] = (
                torch.tensor([f["en_cc_position"] for f in features], dtype=torch.long) + en_shift
            )
        return batch


def padding_batches(
    lengths: list[int], batch_size: int, slack: float = 1.25, responses: list[int] | None = None
) -> list[list[int]]:
    """Indices grouped into batches of at most ``batch_size`` whose padded size stays within ``slack``
    × their real tokens: an outlier gets a batch of its own instead of doubling the work of the others.

    Left padding (``responses`` not given): sorted by length, a batch costs rows × its longest row.
    Aligned padding (``responses[i]``: the tokens of row i after its p, so ``lengths[i] - responses[i]``
    are its prompt's): every row's p in one column, so a batch costs rows × (longest prompt + longest
    response); sorted by prompt length, in steps of 25 %, then by response length."""
    if responses is None:
        order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    else:
        prompts = [n - r for n, r in zip(lengths, responses)]
        order = sorted(
            range(len(lengths)), key=lambda i: (int(math.log(max(prompts[i], 1), 1.25)), responses[i])
        )
    batches: list[list[int]] = []
    current: list[int] = []
    tokens = longest = prompt = response = 0
    for i in order:
        if responses is None:
            wide = max(longest, lengths[i])
        else:
            wide = max(prompt, lengths[i] - responses[i]) + max(response, responses[i])
        if current and (
            len(current) == batch_size or (len(current) + 1) * wide > slack * (tokens + lengths[i])
        ):
            batches.append(current)
            current, tokens, longest, prompt, response = [], 0, 0, 0, 0
        current.append(i)
        tokens += lengths[i]
        longest = max(longest, lengths[i])
        if responses is not None:
            prompt = max(prompt, lengths[i] - responses[i])
            response = max(response, responses[i])
    if current:
        batches.append(current)
    return batches
