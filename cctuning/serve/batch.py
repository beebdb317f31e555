"""The running batch of ``cctuning serve``: sequences decoded together, one token a step.

* **Joining.** New sequences are prefilled by :meth:`CCGenerator.prepare
  <cctuning.inference.generate.CCGenerator.prepare>`, the connected prefill of ``cctuning generate``
  (:func:`~cctuning.model.connection.prefill_to_connection`), one group per connection and prompts of
  similar length (:func:`~cctuning.data.collator.padding_batches`: at most 25 % padding), left-padded.
  Their first forward runs the prompt's tail from the cache with the connection's injection, as the
  first forward of ``transformers``' ``generate`` does in ``cctuning generate``, and gives their
  first token. Their KV cache is then merged into the running batch's between two steps: both are
  left-padded to the longer one (masked, so the padding takes no attention weight). A cache that
  cannot be cut and padded (sliding-window or recurrent layers) is never merged: new sequences then
  wait until the running batch has finished.
* **Steps.** Every row feeds its last token with its own position (``positions_from_mask``, as
  ``generate`` computes them) and the batch's attention mask; the next token is the argmax of the
  float32 logits (greedy) or a draw from the row's own seeded generator (``temperature``, ``top_p``),
  so a row's tokens do not depend on the rows beside it.
* **Leaving.** A sequence that finishes (stop token, stop string, ``max_tokens``) or whose client has
  gone (``cancelled``) leaves the batch at the end of the step: its rows of the cache are dropped,
  and columns that are padding for every remaining row are cut off.
"""

from __future__ import annotations

import inspect
import logging
from itertools import groupby

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from cctuning.data.collator import padding_batches
from cctuning.inference.generate import CCGenerator, injected_once
from cctuning.model.ccmodel import positions_from_mask
from cctuning.model.connection import can_crop
from cctuning.serve.sequence import Sequence

logger = logging.getLogger(__name__)


class Batch:
    """The sequences being decoded together, their KV cache, attention mask, next positions and
    last tokens (row ``i`` of each is ``rows[i]``)."""

    def __init__(self, generator: CCGenerator):
        self.gen = generator
        self.model = generator.model
        self.rows: list[Sequence] = []
        self.cache = None
        self.mask: torch.Tensor | None = None  # (rows, cached columns + 1): the last token's column too
        self.positions: torch.Tensor | None = None  # (rows,): the position id of each row's last token
        self.last: torch.Tensor | None = None  # (rows,): the token each row feeds next
        self.cancelled = 0  # sequences that left unfinished because their client went away
        forward = inspect.signature(self.model.base.forward).parameters
        self.keep_logits = {"logits_to_keep": 1} if "logits_to_keep" in forward else {}

    @property
    def joinable(self) -> bool:
        """Whether new sequences can join now (an empty batch, or a cache that can be padded)."""
        return not self.rows or can_crop(self.cache)

    def decode(self, tokens: list[int]) -> str:
        return self.gen.tokenizer.decode(tokens, skip_special_tokens=True)

    # -- joining -------------------------------------------------------------------------------
    def admit(self, sequences: list[Sequence]) -> list[Sequence]:
        """Prefill ``sequences`` (one group per connection), give each its first token and add the
        unfinished ones to the batch; those that cannot join now (after a group whose cache cannot be
        padded) are returned, to wait."""
        ordered = sorted(sequences, key=lambda s: s.connection)
        groups = [list(g) for _, g in groupby(ordered, key=lambda s: s.connection)]
        for i, group in enumerate(groups):
            if not self.joinable:
                return [s for g in groups[i:] for s in g]
            chunks = self._chunks(group)
            for k, chunk in enumerate(chunks):
                if not self.joinable:  # a cache that cannot be padded: the rest wait for this batch
                    return [s for c in chunks[k:] for s in c] + [s for g in groups[i + 1 :] for s in g]
                self._admit_group(group[0].connection, chunk)
        return []

    def _chunks(self, group: list[Sequence]) -> list[list[Sequence]]:
        """``group`` in prefills of prompts of similar length (left padding: one 500-token prompt among
        100-token ones would make every row 500 tokens wide), where the caches can then be merged;
        else one prefill."""
        if not can_crop(DynamicCache(config=self.model.base.config)):
            return [group]
        return [
            [group[j] for j in chunk]
            for chunk in padding_batches([len(s.prompt.ids) for s in group], len(group))
        ]

    def _admit_group(self, connection: str, group: list[Sequence]) -> None:
        english = [s.english for s in group] if connection == "english" else None
        prepared = self.gen.prepare([s.prompt for s in group], english, connection)
        start, cache, mask = prepared.prefill.start, prepared.prefill.cache, prepared.mask
        positions = positions_from_mask(mask)
        with injected_once(self.model, prepared.injection):
            out = self.model.base(
                input_ids=prepared.ids[:, start:],
                attention_mask=mask,
                position_ids=positions[:, start:],
                past_key_values=cache,
                use_cache=True,
                **self.keep_logits,
            )
        inj = prepared.injection
        for i, seq in enumerate(group):
            seq.started(None if inj is None or inj.layers is None else int(inj.layers[i]))
        tokens = self._pick(out.logits[:, -1], group)
        ones = mask.new_ones(len(group), 1)
        self._merge(group, cache, torch.cat([mask, ones], 1), positions[:, -1] + 1, tokens)
        self._take(group, tokens)

    def _merge(self, group, cache, mask, positions, tokens) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = list(group), cache, mask
            self.positions, self.last = positions, tokens
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, new in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_left_pad(old.keys, width - 1, 2), _left_pad(new.keys, width - 1, 2)])
            old.values = torch.cat([_left_pad(old.values, width - 1, 2), _left_pad(new.values, width - 1, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.rows += group
        self.positions = torch.cat([self.positions, positions])
        self.last = torch.cat([self.last, tokens])

    # -- decoding ------------------------------------------------------------------------------
    def step(self) -> None:
        """One decoding step of every row; finished and cancelled sequences leave."""
        out = self.model.base(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.positions[:, None],
            past_key_values=self.cache,
            use_cache=True,
            **self.keep_logits,
        )
        tokens = self._pick(out.logits[:, -1], self.rows)
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], 1)
        self.positions = self.positions + 1
        self.last = tokens
        self._take(self.rows, tokens)

    def _take(self, rows: list[Sequence], tokens: torch.Tensor) -> None:
        """Give ``rows`` their ``tokens``, then drop the rows of the batch that are done."""
        stop_ids = self.gen.stop_ids
        for seq, token in zip(rows, tokens.tolist()):
            if not seq.cancelled:
                seq.add(token, stop_ids, self.decode)
        self.drop_done()

    def drop_done(self) -> None:
        """Remove the sequences that finished or were cancelled from the batch."""
        keep = [i for i, seq in enumerate(self.rows) if not seq.done]
        if len(keep) == len(self.rows):
            return
        self.cancelled += sum(seq.cancelled and seq.finish_reason is None for seq in self.rows)
        if not keep:
            self.clear()
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.rows = [self.rows[i] for i in keep]
        self.mask, self.positions, self.last = self.mask[index], self.positions[index], self.last[index]
        used = self.mask.any(0).nonzero()
        cut = int(used[0]) if len(used) else 0
        if cut and can_crop(self.cache):  # columns that are padding for every row left
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, cut:], layer.values[:, :, cut:]
            self.mask = self.mask[:, cut:]

    def clear(self) -> None:
        self.rows, self.cache, self.mask, self.positions, self.last = [], None, None, None, None

    def _pick(self, logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        """The next token of each row: the argmax of the float32 logits, or a seeded draw."""
        logits = logits.float()
        tokens = logits.argmax(-1)
        for i, seq in enumerate(rows):
            if seq.generator is not None:
                tokens[i] = sample(logits[i], seq.sampling.temperature, seq.sampling.top_p, seq.generator)
        return tokens


def sample(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator) -> int:
    """A token drawn from ``softmax(logits / temperature)`` restricted to the smallest set of most
    likely tokens whose probability reaches ``top_p`` (nucleus sampling), with ``generator``."""
    probs = F.softmax(logits.cpu() / temperature, -1)
    if top_p < 1.0:
        ordered, order = probs.sort(descending=True)
        before = ordered.cumsum(0) - ordered  # the probability of the tokens ahead of each
        ordered[before >= top_p] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, ordered)
    return int(torch.multinomial(probs, 1, generator=generator))


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """``tensor`` padded with zeros at the start of dimension ``dim`` to ``width``."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim)
