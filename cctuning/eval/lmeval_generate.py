"""``generate_until`` of :class:`cctuning.eval.lmeval.CCLM`: the fast connected generation of
:class:`~cctuning.inference.generate.CCGenerator`, decoded by ``transformers``' ``generate`` with each
request's options; ``until`` strings stop a row and cut its text, ``max_gen_toks`` bounds it; our
stop tokens (eos and the template's end-of-turn tokens) stop it too."""

from __future__ import annotations

import contextlib
import logging

from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from tqdm.auto import tqdm

from cctuning.data.encoding import EncodedPrompt
from cctuning.errors import CCError
from cctuning.model.connection import layer_sampling

logger = logging.getLogger("cctuning.eval.lmeval")


class GenerateUntil:
    """lm-eval's generation requests, for a class with CCLM's attributes (``generator``,
    ``connection``, ``sample_layer``, ``tok_encode``, ...)."""

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same options, longest first (as lm-eval's ``hf`` model)."""
        if self.sample_layer > 1:
            logger.warning(
                "generate_until samples one layer per request (sample_layer=%d)", self.sample_layer
            )
        before = list(self.without_english)
        # the contexts as the model is prompted (a bilingual-prompt model: with the English)
        contexts = [self._context(request, request.args[0]) for request in requests]
        self._warn_without_english(before)
        collator = Collator(
            [(contexts[index], request.args[1], index) for index, request in enumerate(requests)],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), desc=f"generate_until ({self.connection})", disable=disable_tqdm)
        sampling = layer_sampling(self.model, self.seed) if self.sample_layer else contextlib.nullcontext()
        try:
            with sampling:
                for chunk in collator.get_batched(n=self.batch_size):
                    for text, (_, _, index) in zip(self._generate_chunk(chunk, requests, eos), chunk):
                        results.append(text)
                        self.cache_hook.add_partial("generate_until", requests[index].args, text)
                        bar.update(1)
        finally:
            bar.close()
        return collator.get_original(results)

    def _generate_chunk(self, chunk, requests, eos: str) -> list[str]:
        options = normalize_gen_kwargs(chunk[0][1], self.max_gen_toks)
        until = handle_stop_sequences(options.pop("until", None), eos=eos)
        max_gen_toks = options.pop("max_gen_toks")
        if options.pop("max_length", None) is not None:
            logger.warning("max_length in the generation options is ignored; max_gen_toks bounds generation")
        if options.get("temperature") == 0.0 and not options.get("do_sample"):
            options.pop("temperature")  # greedy (lm-eval's temperature 0)
            options["do_sample"] = False
        room = self.max_length - max_gen_toks
        if room <= 0:
            raise CCError(
                f"max_gen_toks={max_gen_toks} leaves no room for a prompt in max_length={self.max_length}"
            )
        encoded = []
        for context, _, _ in chunk:
            ids = self.tok_encode(context, left_truncate_len=room)
            encoded.append(EncodedPrompt(ids=ids, position=self._position(len(ids))))
        english = (
            [self._english_prompt(requests[index]) for _, _, index in chunk]
            if self.connection == "english"
            else None
        )
        outs = self.generator.generate_encoded(
            encoded,
            self.connection,
            english,
            max_new_tokens=max_gen_toks,
            generation_kwargs=options,
            stop_strings=[u for u in until if u] or None,
            sort=False,
        )
        return [postprocess_generated_text(out.text, until, None) for out in outs]
