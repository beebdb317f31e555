"""Generation with the simulated connection at the prefill (docs/method.md §2.5), batched.

Connection modes:

* ``transform``: collect the model's own non-English ``f_l[p]``, map them with the Transform
  Matrix, let the Decision Maker choose, add the choice after layer k at p; prefill only.
* ``english``: the oracle, with the real English prompt's activations (needs ``instruction_en``).
* ``none``: plain generation of the same model.

Fast path: with causal attention the tokens before p are identical in the collecting pass and in
the fused pass, so the prefix ``[0, p)`` is run once into the KV cache and only the tail from p is
run twice (:func:`~cctuning.model.connection.prefill_to_connection`, which the held-out NLL shares:
with a cache that can be cut back one pass over ``[0, p]`` fills it and collects ``f_l[p]``, and the
cache is cut back to p; otherwise, e.g. with sliding-window layers, the prefix is run alone and the
tail collected on a copy of the cache). The fused pass over the tail is the first forward of
``transformers``' ``generate``, which continues from that cache with the injection armed for that
one forward only. The overhead over plain generation is about one extra token step instead of a
second prefill. ``naive=True`` runs the official two-full-prefill path (used by tests and benchmarks
to check and measure the fast one).

Decoding is ``transformers``' ``generate`` (no fusion after the prefill): greedy by default, as in
the paper; ``generation_kwargs`` passes any ``GenerationConfig`` option (``do_sample``,
``temperature``, ``top_p``, ``repetition_penalty``, ...), and ``stop_strings`` stop a row when its
text contains one of them (the text keeps the stop string). Settings the call does not give come
from the model folder's ``generation_config.json``, as in ``transformers``. Generation stops on the
tokenizer's eos, the model's ``generation_config.eos_token_id`` and every special token that the
chat template puts after an assistant turn (e.g. ``<|im_end|>``, ``<|eot_id|>``,
``<end_of_turn>``); the stop token is not returned and special tokens are stripped from the text.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache, GenerationConfig
from transformers.generation import StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from cctuning.data.collator import pad_rows, pad_token_id
from cctuning.data.encoding import EncodedPrompt, PromptEncoder
from cctuning.data.special import warn_special_text
from cctuning.errors import CCError
from cctuning.model.ccmodel import CCModel, positions_from_mask
from cctuning.model.connection import (
    Injection,
    Prefill,
    default_connection,
    injected,
    prefill_to_connection,
    resolve_connection,
    source_activations,
)

logger = logging.getLogger(__name__)

# one sequence per prompt: beams and multiple return sequences would need the prefilled cache and
# the injection expanded with them
_REFUSED = {"num_beams": 1, "num_return_sequences": 1}
# options set by the generator itself
_OWN = (
    "max_new_tokens",
    "max_length",
    "eos_token_id",
    "pad_token_id",
    "stop_strings",
    "return_dict_in_generate",
    "output_logits",
)


@dataclass
class PreparedBatch:
    """Prompts left-padded (``ids``, ``mask``) and run up to the connection: the decoding continues
    from ``prefill.cache`` over the columns from ``prefill.start``, its first forward carrying
    ``injection`` (None for connection none; :func:`injected_once`)."""

    ids: torch.Tensor
    mask: torch.Tensor
    prefill: Prefill
    injection: Injection | None


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


class _StopStrings(StoppingCriteria):
    """``transformers``' stop-string criterion that also records, per row, how many new tokens it had
    when a stop string first appeared (-1: never), so that the padding after it is not returned."""

    def __init__(self, tokenizer, stop_strings: list[str], prompt_width: int, rows: int, device):
        self.inner = StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)
        self.width = prompt_width
        self.lengths = torch.full((rows,), -1, dtype=torch.long, device=device)

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = self.inner(input_ids, scores, **kwargs)
        first = done & (self.lengths < 0)
        self.lengths[first] = input_ids.shape[1] - self.width
        return done


@contextlib.contextmanager
def injected_once(model: CCModel, inj):
    """The injection applies to the next forward through layer k only (the prefill of ``generate``);
    the decoding steps after it run without fusion."""
    if inj is None:
        yield
        return
    with contextlib.ExitStack() as armed:
        armed.enter_context(injected(model, inj))
        # registered after the injection hook, so it runs after it and disarms it for later forwards
        layer = model.arch.layers[model.cc_config.inject_layer]
        handle = layer.register_forward_hook(lambda *_: armed.close())
        try:
            yield
        finally:
            handle.remove()


class CCGenerator:
    """Batched generation for a :class:`CCModel` (any method; ``none`` works for all)."""

    def __init__(
        self,
        model: CCModel,
        tokenizer,
        max_new_tokens: int = 40,
        batch_size: int = 8,
        max_length: int | None = None,
        allow_special_tokens: bool = False,
    ):
        for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
            if value <= 0:
                raise CCError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        self.model = model
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.encoder = PromptEncoder(
            tokenizer, model.cc_config.prompt_format, allow_special_tokens=allow_special_tokens
        )
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
        generation_kwargs: dict | None = None,
        stop_strings: list[str] | None = None,
    ) -> list[Generation]:
        """Generations of ``prompts``, rendered by the model's prompt format (``max_new_tokens``
        overrides the generator's for this call; ``generation_kwargs`` and ``stop_strings``: see the
        module docstring)."""
        connection = resolve_connection(
            self.model, connection, english is not None and len(english) == len(prompts)
        )
        new_tokens = self._new_tokens(max_new_tokens)
        budget = self._prompt_budget(new_tokens)
        if not self.encoder.allow_special_tokens:  # encoded as plain text: say so, once a call
            rows = zip(prompts, english or [None] * len(prompts))
            warn_special_text(self.encoder.special, rows, "generate", "prompts")
        encoded = [self.encoder.encode_prompt(p, budget) for p in prompts]
        en_encoded = [self.encoder.encode_prompt(e, budget) for e in english] if english else None
        return self.generate_encoded(
            encoded,
            connection,
            en_encoded,
            naive=naive,
            return_first_logits=return_first_logits,
            progress=progress,
            max_new_tokens=new_tokens,
            generation_kwargs=generation_kwargs,
            stop_strings=stop_strings,
            sort=True,
        )

    def generate_encoded(
        self,
        encoded: list[EncodedPrompt],
        connection: str | None = None,
        english: list[EncodedPrompt] | None = None,
        naive: bool = False,
        return_first_logits: bool = False,
        progress: bool = False,
        max_new_tokens: int | None = None,
        generation_kwargs: dict | None = None,
        stop_strings: list[str] | None = None,
        sort: bool = True,
    ) -> list[Generation]:
        """Generations of prompts already tokenised (``EncodedPrompt.position`` is p, counted in the
        prompt's own ids). ``sort=False`` keeps the given order in the batches (the caller batched)."""
        connection = resolve_connection(
            self.model, connection, english is not None and len(english) == len(encoded)
        )
        new_tokens = self._new_tokens(max_new_tokens)
        options = self._generation_options(generation_kwargs)
        order = list(range(len(encoded)))
        if sort:  # longest first, so that batches hold prompts of similar length (less padding)
            order.sort(key=lambda i: -len(encoded[i].ids))
        results: list[Generation | None] = [None] * len(encoded)
        bar = tqdm(total=len(encoded), desc=f"generate ({connection})", unit="prompt", disable=not progress)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                outs = self._generate_batch(
                    [encoded[i] for i in idx],
                    [english[i] for i in idx] if english else None,
                    connection,
                    naive,
                    return_first_logits,
                    new_tokens,
                    options,
                    stop_strings,
                )
                for i, out in zip(idx, outs):
                    results[i] = out
                bar.update(len(idx))
        finally:
            self.model.train(was_training)
            bar.close()
        return results

    # -- internals -----------------------------------------------------------------------------
    def _new_tokens(self, max_new_tokens: int | None) -> int:
        new_tokens = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        if new_tokens <= 0:
            raise CCError(f"--max-new-tokens must be > 0, got {new_tokens}")
        return new_tokens

    @staticmethod
    def _generation_options(generation_kwargs: dict | None) -> dict:
        """The ``GenerationConfig`` options of a call: greedy unless asked otherwise."""
        options = {"do_sample": False, **(generation_kwargs or {})}
        for key in _OWN:
            if key in options:
                raise CCError(
                    f"generation option '{key}' is set by cctuning itself; pass it as its own argument"
                )
        for key, only in _REFUSED.items():
            if options.get(key, only) != only:
                raise CCError(
                    f"generation option {key}={options[key]} is not supported (one sequence per prompt)"
                )
        return options

    @property
    def context_length(self) -> int | None:
        """Tokens of prompt and generation together: ``max_length``, else the model's
        ``max_position_embeddings`` (None when neither is known)."""
        return self.max_length or getattr(self.model.config, "max_position_embeddings", None)

    def _prompt_budget(self, new_tokens: int | None = None) -> int | None:
        """Tokens a prompt may keep so that it and ``new_tokens`` fit the context."""
        new_tokens = self.max_new_tokens if new_tokens is None else new_tokens
        limit = self.context_length
        return None if limit is None else max(1, limit - new_tokens)

    def _english(self, en_batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The English prompts' ids, mask and p, left-padded."""
        ids, mask, shift = pad_rows([e.ids for e in en_batch], self.pad_id, "left")
        pos = torch.tensor([e.position for e in en_batch]) + shift
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    def _prefill(self, connection, naive, ids, mask, column, en_batch) -> tuple[Prefill, Injection | None]:
        """The cache that ``generate`` continues from and the injection of its first forward: the prompt
        prefix run once (:func:`~cctuning.model.connection.prefill_to_connection`), or with ``naive``
        an empty cache and ``f_l[p]`` from a full pass of their own (the official path)."""
        english = self._english(en_batch) if connection == "english" else None
        if connection == "none":
            return Prefill(DynamicCache(config=self.model.base.config), 0, None), None
        if naive:
            acts = source_activations(self.model, connection, ids, mask, column, *(english or (None,) * 3))
            prefill = Prefill(DynamicCache(config=self.model.base.config), 0, acts)
        else:
            pos = positions_from_mask(mask)
            prefill = prefill_to_connection(
                self.model, connection, ids, mask, pos, column, english, always_cache=True
            )
        return prefill, prefill.injection(self.model, connection, ids, column)

    @torch.no_grad()
    def prepare(
        self, batch: list[EncodedPrompt], en_batch, connection: str, naive: bool = False
    ) -> PreparedBatch:
        """A batch of prompts left-padded and prefilled up to the connection (:meth:`_prefill`): what
        the decoding continues from, here with ``transformers``' ``generate`` and in ``cctuning serve``."""
        ids, mask, shift = pad_rows([e.ids for e in batch], self.pad_id, "left")
        ids, mask = ids.to(self.device), mask.to(self.device)
        # left padding: each row's p is its own position shifted by its padding
        column = (torch.tensor([e.position for e in batch]) + shift).to(self.device)
        prefill, inj = self._prefill(connection, naive, ids, mask, column, en_batch)
        return PreparedBatch(ids, mask, prefill, inj)

    @torch.no_grad()
    def _generate_batch(
        self, batch, en_batch, connection, naive, return_first_logits, new_tokens, options, stop_strings
    ) -> list[Generation]:
        prepared = self.prepare(batch, en_batch, connection, naive)
        ids, mask, prefill, inj = prepared.ids, prepared.mask, prepared.prefill, prepared.injection
        width = ids.shape[1]
        criteria = (
            _StopStrings(self.tokenizer, list(stop_strings), width, len(batch), self.device)
            if stop_strings
            else None
        )
        config = GenerationConfig(
            max_new_tokens=new_tokens,
            eos_token_id=sorted(self.stop_ids),
            pad_token_id=self.pad_id,
            return_dict_in_generate=True,
            output_logits=return_first_logits,
            **options,
        )
        with injected_once(self.model, inj):
            out = self.model.base.generate(
                input_ids=ids,
                attention_mask=mask,
                past_key_values=prefill.cache,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([criteria]) if criteria else None,
            )
        return self._results(batch, out, width, criteria, inj, return_first_logits)

    def _results(self, batch, out, width, criteria, inj, return_first_logits) -> list[Generation]:
        """One :class:`Generation` per row of ``generate``'s output, cut at its stop string or token."""
        results = []
        for i, toks in enumerate(out.sequences[:, width:].tolist()):
            if criteria is not None and int(criteria.lengths[i]) >= 0:
                toks = toks[: int(criteria.lengths[i])]
            cut = next((j for j, t in enumerate(toks) if t in self.stop_ids), len(toks))
            toks = toks[:cut]
            results.append(
                Generation(
                    text=self.tokenizer.decode(toks, skip_special_tokens=True),
                    token_ids=toks,
                    layer=None if inj is None or inj.layers is None else int(inj.layers[i]),
                    prompt_tokens=len(batch[i].ids),
                    first_logits=out.logits[0][i].float().cpu() if return_first_logits else None,
                )
            )
        return results
