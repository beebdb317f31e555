"""Greedy generation with the simulated connection at the prefill (docs/method.md §2.5), batched.

Connection modes:

* ``transform``: collect the model's own non-English ``f_l[p]``, map them with the Transform
  Matrix, let the Decision Maker choose, add the choice after layer k at p; prefill only.
* ``english``: the oracle, with the real English prompt's activations (needs ``instruction_en``).
* ``none``: plain generation of the same model.

Fast path: with causal attention the tokens before p are identical in the collecting pass and in
the fused pass, so the prefix ``[0, p)`` is run once into the KV cache; only the tail from p is
run twice. With a cache that can be cut back (``DynamicLayer``), one pass over ``[0, p]`` fills the
cache and collects ``f_l[p]``, the cache is cut back to p and the tail is run once more, fused;
otherwise (e.g. sliding-window layers) the prefix is run alone and the tail collected on a copy of
the cache. The overhead over plain generation is about one extra token step instead of a second
prefill. ``naive=True`` runs the
official two-full-prefill path (used by tests and benchmarks to check and measure the fast one).

Decoding is greedy with the KV cache and no fusion after the prefill. Generation stops on the
tokenizer's eos, the model's ``generation_config.eos_token_id`` and every special token that the
chat template puts after an assistant turn (e.g. ``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>``); special tokens are stripped from the text.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from cctuning.data.collator import pad_rows, pad_token_id
from cctuning.data.encoding import PromptEncoder
from cctuning.errors import CCError
from cctuning.model.ccmodel import CCModel, positions_from_mask
from cctuning.model.connection import default_connection, injected, injection, resolve_connection

logger = logging.getLogger(__name__)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    layer: int | None  # the layer chosen by the Decision Maker (None without connection)
    prompt_tokens: int
    first_logits: torch.Tensor | None = None


def stop_token_ids(tokenizer, model=None, encoder: PromptEncoder | None = None) -> set[int]:
    """eos, the generation config's eos ids and the special tokens ending an assistant turn."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = getattr(getattr(model, "base", model), "generation_config", None)
    eos = getattr(gen, "eos_token_id", None)
    if eos is not None:
        ids.update(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    if encoder is not None and encoder.mode == "chat":
        prompt, _ = encoder.render_prompt("x")
        tail = encoder.render_completion("x", "y", prompt)
        special = set(tokenizer.all_special_ids)
        after = tokenizer(tail, add_special_tokens=False)["input_ids"]
        ids.update(t for t in after if t in special and t != tokenizer.pad_token_id)
    return ids


class CCGenerator:
    """Batched greedy generation for a :class:`CCModel` (any method; ``none`` works for all)."""

    def __init__(
        self,
        model: CCModel,
        tokenizer,
        max_new_tokens: int = 40,
        batch_size: int = 8,
        max_length: int | None = None,
    ):
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value <= 0:
                raise CCError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.encoder = PromptEncoder(tokenizer, model.cc_config.prompt_format)
        self.max_length = max_length
        self.stop_ids = stop_token_ids(tokenizer, model, self.encoder)
        self.pad_id = pad_token_id(tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.arch.embeddings.weight.device

    def default_connection(self) -> str:
        return default_connection(self.model)

    # -- public API ----------------------------------------------------------------------------
    def generate(
        self,
        prompts: list[str],
        connection: str | None = None,
        english: list[str] | None = None,
        naive: bool = False,
        return_first_logits: bool = False,
        progress: bool = False,
        max_new_tokens: int | None = None,
    ) -> list[Generation]:
        """Greedy generations of ``prompts`` (``max_new_tokens`` overrides the generator's for this call)."""
        connection = resolve_connection(
            self.model, connection, english is not None and len(english) == len(prompts)
        )
        new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if new_tokens <= 0:
            raise CCError(f"--max-new-tokens must be > 0, got {new_tokens}")
        budget = self._prompt_budget(new_tokens)
        encoded = [self.encoder.encode_prompt(p, budget) for p in prompts]
        en_encoded = [self.encoder.encode_prompt(e, budget) for e in english] if english else None
        # longest first, so that batches hold prompts of similar length (less padding)
        order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i].ids))
        results: list[Generation | None] = [None] * len(prompts)
        bar = tqdm(total=len(prompts), desc=f"generate ({connection})", unit="prompt", disable=not progress)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch_en = [en_encoded[i] for i in idx] if en_encoded else None
                outs = self._generate_batch(
                    [encoded[i] for i in idx], batch_en, connection, naive, return_first_logits, new_tokens
                )
                for i, out in zip(idx, outs):
                    results[i] = out
                bar.update(len(idx))
        finally:
            self.model.train(was_training)
            bar.close()
        return results

    # -- internals -----------------------------------------------------------------------------
    def _prompt_budget(self, new_tokens: int | None = None) -> int | None:
        """Tokens a prompt may keep so that it and ``new_tokens`` fit the context."""
        new_tokens = self.max_new_tokens if new_tokens is None else new_tokens
        limit = self.max_length or getattr(self.model.config, "max_position_embeddings", None)
        return None if limit is None else max(1, limit - new_tokens)

    def _forward(self, ids, mask, positions, cache, inject=None, logits=True):
        """One chunk through the model with the cache; ``inject``: an :class:`Injection` at chunk positions."""
        module = self.model.base if logits else self.model.arch.decoder
        kwargs = dict(
            input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True
        )
        if logits:
            kwargs["logits_to_keep"] = 1
        if inject is None:
            return module(**kwargs)
        with injected(self.model, inject):
            return module(**kwargs)

    def _english_acts(self, en_batch) -> torch.Tensor:
        ids, mask, shift = pad_rows([e.ids for e in en_batch], self.pad_id, "left")
        pos = torch.tensor([e.position for e in en_batch]) + shift
        return self.model.collect_activations(ids.to(self.device), mask.to(self.device), pos.to(self.device))

    @torch.no_grad()
    def _generate_batch(
        self, batch, en_batch, connection, naive, return_first_logits, new_tokens
    ) -> list[Generation]:
        ids, mask, _ = pad_rows([e.ids for e in batch], self.pad_id, "left")
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = positions_from_mask(mask)
        width = ids.shape[1]
        offset = self.model.cc_config.prompt_format.position_offset
        p = width - 1 - offset  # left padding: the connection position is the same column in every row
        cache = DynamicCache(config=self.model.base.config)
        layers = None
        if connection == "none":
            out = self._forward(ids, mask, pos, cache)
        elif naive:
            if connection == "transform":
                acts = self.model.collect_activations(
                    ids, mask, torch.full((len(batch),), p, device=self.device)
                )
            else:
                acts = self._english_acts(en_batch)
            column = torch.full((len(batch),), p, device=self.device)
            inj = injection(self.model, connection, acts, ids, column)
            layers = inj.layers
            out = self._forward(ids, mask, pos, cache, inject=inj)
        else:
            tail, first = ids[:, p:], torch.zeros(len(batch), dtype=torch.long, device=self.device)
            if connection == "transform" and _croppable(cache):
                # one pass over [0, p] fills the cache and captures f_l[p]; the cache is then cut back
                # to [0, p), so the only extra work over plain generation is the fused pass from p
                column = torch.full((len(batch),), p, device=self.device)
                with self.model.hooks.capturing(column):
                    self._forward(ids[:, : p + 1], mask[:, : p + 1], pos[:, : p + 1], cache, logits=False)
                    acts = self.model.hooks.stacked()
                cache.crop(-1)
            else:
                if p > 0:
                    self._forward(ids[:, :p], mask[:, :p], pos[:, :p], cache, logits=False)
                if connection == "transform":  # a cache that cannot be cut back: collect on a copy
                    snapshot = copy.deepcopy(cache)
                    with self.model.hooks.capturing(first):
                        self._forward(tail, mask, pos[:, p:], cache, logits=False)
                        acts = self.model.hooks.stacked()
                    cache = snapshot
                else:
                    acts = self._english_acts(en_batch)
            inj = injection(self.model, connection, acts, tail, first)
            layers = inj.layers
            out = self._forward(tail, mask, pos[:, p:], cache, inject=inj)
        cache = out.past_key_values
        first_logits = out.logits[:, -1].float()
        tokens = self._decode(first_logits, cache, mask, pos[:, -1], new_tokens)
        results = []
        for i, toks in enumerate(tokens):
            results.append(
                Generation(
                    text=self.tokenizer.decode(toks, skip_special_tokens=True),
                    token_ids=toks,
                    layer=None if layers is None else int(layers[i]),
                    prompt_tokens=len(batch[i].ids),
                    first_logits=first_logits[i].cpu() if return_first_logits else None,
                )
            )
        return results

    def _decode(self, logits, cache, mask, last_pos, new_tokens: int) -> list[list[int]]:
        """Greedy decoding from the prefill's last logits; stops per row on a stop id."""
        n = logits.shape[0]
        done = torch.zeros(n, dtype=torch.bool, device=logits.device)
        out: list[list[int]] = [[] for _ in range(n)]
        stop = torch.tensor(sorted(self.stop_ids), device=logits.device, dtype=torch.long)
        for step in range(new_tokens):
            nxt = logits.argmax(-1)
            is_stop = torch.isin(nxt, stop)
            for i in range(n):
                if not done[i] and not is_stop[i]:
                    out[i].append(int(nxt[i]))
            done |= is_stop
            if bool(done.all()) or step == new_tokens - 1:
                break
            nxt = torch.where(done, torch.full_like(nxt, self.pad_id), nxt)
            mask = torch.cat([mask, torch.ones(n, 1, dtype=mask.dtype, device=mask.device)], dim=1)
            last_pos = last_pos + 1
            res = self.model.base(
                input_ids=nxt[:, None],
                attention_mask=mask,
                position_ids=last_pos[:, None],
                past_key_values=cache,
                use_cache=True,
            )
            cache, logits = res.past_key_values, res.logits[:, -1].float()
        return out


def _croppable(cache) -> bool:
    return all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", []))
