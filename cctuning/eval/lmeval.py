"""lm-evaluation-harness backend: the model class ``cctuning`` (the tasks of our six benchmarks:
:mod:`cctuning.eval.lmeval_tasks`, whose names are also importable from here).

lm-eval 0.4.13 finds models only in its own registry (no entry points for models or tasks), so
``cctuning lm-eval ARGS...`` (:mod:`cctuning.cli.lm_eval`) registers :class:`CCLM` as ``cctuning``,
adds the task folder shipped in the package (:data:`TASKS_DIR`) to ``--include_path`` and runs
lm-eval's own command line with every argument passed through. In Python, importing this module
registers the model: ``lm_eval.simple_evaluate(model="cctuning", model_args=...,
task_manager=task_manager())``.

What :class:`CCLM` computes (docs/evaluation.md, "lm-evaluation-harness"):

* ``loglikelihood`` and ``loglikelihood_rolling``: one teacher-forced forward over context +
  continuation with the connection at p, as ``cctuning eval --nll``; p is the last token of the
  context as lm-eval gives it (with ``--apply_chat_template``: the rendered prompt, as in
  training), even where lm-eval moves the context's trailing whitespace into the scored
  continuation. A rolling window's p is the last token of its context. Tokenisation, truncation
  and the scored tokens follow lm-eval's ``hf`` model, so that ``connection=none`` gives its numbers.
* ``generate_until``: the fast connected generation of :class:`CCGenerator`, decoded by
  ``transformers``' ``generate`` with the request's options; ``until`` strings stop a row and cut
  its text, ``max_gen_toks`` bounds it; our stop tokens (eos and the template's end-of-turn
  tokens) stop it too.
* ``connection=transform|none|english`` (default: transform when the model has a matrix);
  ``english`` renders the English prompt of each request's document (field ``english_field``,
  default ``prompt_en``) as training renders an English instruction. ``sample_layer=K``: the
  official Gumbel-sampled layer, seeded with ``seed``; a log-likelihood is the mean over K draws.
* A model trained with ``--augment bilingual-prompt`` gets, in each context, the document's
  instruction (field ``prompt_field``, default ``prompt``: its last occurrence in the context) made
  the bilingual prompt with the document's English (``english_field``), as ``cctuning eval`` gives
  it; ``withhold_english=true`` leaves the contexts as they are. Requests whose context got no
  English are counted, warned about and recorded in the results' config (``get_model_info``).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import resolve_max_length
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
from tqdm.auto import tqdm

from cctuning.config import coerce
from cctuning.data.augment import augmented_context, prompt_report, warn_without_english
from cctuning.data.collator import pad_rows
from cctuning.data.encoding import PLAIN_HEAD, PLAIN_TAIL, EncodedPrompt, PromptEncoder
from cctuning.errors import CCError
from cctuning.eval.lmeval_args import read_batch_size, read_device, read_dtype, read_sample_layer
from cctuning.eval.lmeval_generate import GenerateUntil
from cctuning.eval.lmeval_tasks import (
    TASKS_DIR,
    load_split,
    process_results,
    task_configs,
    task_manager,
    write_task_configs,
)
from cctuning.inference.generate import CCGenerator
from cctuning.loading import load_for_inference
from cctuning.model.ccmodel import positions_from_mask
from cctuning.model.connection import connected_forward, layer_sampling, resolve_connection

logger = logging.getLogger(__name__)

__all__ = [
    "CCLM",
    "MODEL_NAME",
    "TASKS_DIR",
    "load_split",
    "process_results",
    "register",
    "task_configs",
    "task_manager",
    "write_task_configs",
]

MODEL_NAME = "cctuning"
DEFAULT_MAX_LENGTH = 2048  # lm-eval's own fallback when neither config nor tokenizer gives one


def register() -> None:
    """Register :class:`CCLM` with lm-eval as ``cctuning`` (again: nothing happens)."""
    if model_registry.get(MODEL_NAME, None) is not CCLM:
        model_registry.register(MODEL_NAME)(CCLM)


@dataclass
class _Scored:
    """One forward input: ``tokens`` (context + continuation, of which the model reads all but the
    last), the connection position ``p`` in them and the requests scored from its logits."""

    tokens: list[int]
    p: int
    english: EncodedPrompt | None
    # (request index, continuation length, continuation ids) of the requests scored from it
    members: list[tuple[int, int, list[int]]] = field(default_factory=list)


class CCLM(GenerateUntil, TemplateLM):
    """A cctuning model folder (CC-Tuning, SFT or plain) for lm-evaluation-harness (``--model cctuning``).

    ``model_args``: ``pretrained`` (a folder or preset name, or a loaded :class:`CCModel` with
    ``tokenizer``), ``connection`` (transform, none, english), ``sample_layer`` (K draws, 0: argmax),
    ``seed``, ``english_field``, ``batch_size``, ``max_length``, ``max_gen_toks`` (256, lm-eval's
    default), ``dtype``, ``device``, ``add_bos_token``, ``prefix_token_id``, ``trust_remote_code``,
    ``prompt_field`` and ``withhold_english`` (models trained with ``--augment bilingual-prompt``).
    """

    def __init__(
        self,
        pretrained,
        connection: str | None = None,
        sample_layer: int | bool = 0,
        seed: int = 0,
        english_field: str = "prompt_en",
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str | None = None,
        device: str | None = None,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        trust_remote_code: bool = False,
        tokenizer=None,
        prompt_field: str = "prompt",
        withhold_english: bool | str = False,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise CCError(
                f"lm-eval model 'cctuning' does not take {', '.join(sorted(unknown))} (see cctuning.eval.lmeval.CCLM)"
            )
        self._device = read_device(device)
        if isinstance(pretrained, (str, Path)):  # loaded straight onto the device
            model, tokenizer, folder = load_for_inference(
                str(pretrained),
                trust_remote_code=trust_remote_code,
                dtype=read_dtype(dtype),
                device=str(self._device),
            )
        else:
            if tokenizer is None:
                raise CCError("a loaded model needs its tokenizer (tokenizer=...)")
            model, folder = pretrained, None
        self.model = model.to(self._device).eval()
        self.tokenizer = tokenizer
        self.folder = folder
        self.connection = resolve_connection(model, connection)
        self.sample_layer = read_sample_layer(sample_layer) if self.connection != "none" else 0
        self.seed = int(seed)
        self.english_field = english_field
        self._batch_size = read_batch_size(batch_size, max_batch_size)
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self.offset = model.cc_config.prompt_format.position_offset
        self.encoder = PromptEncoder(tokenizer, model.cc_config.prompt_format)
        self.generator = CCGenerator(
            model, tokenizer, batch_size=self._batch_size, max_length=self.max_length
        )
        self.batch_sizes: dict = {}  # what lm-eval's results record as detected batch sizes (none)
        self._english_cache: dict[str, EncodedPrompt] = {}
        self.prompt_field = prompt_field
        self.withhold_english = bool(coerce(withhold_english, bool, "model_args withhold_english"))
        self.without_english = [0, 0]  # requests of a bilingual-prompt model without their English, of all

    # -- construction from lm-eval's arguments -------------------------------------------------
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``model_args`` win over lm-eval's own defaults (``--batch_size 1``, ``--device cuda:0``)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # -- what lm-eval reads --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or resolve_max_length(
            self.model.config, self.tokenizer, default=DEFAULT_MAX_LENGTH
        )

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or "").replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        if self.encoder.mode == "plain":
            return f"cctuning plain format: {PLAIN_HEAD!r}{{instruction}}{PLAIN_TAIL!r}"
        return self.tokenizer.chat_template

    def get_model_info(self) -> dict:
        return {
            "cctuning_model": self.folder,
            "method": self.model.cc_config.method,
            "connection": self.connection,
            "sample_layer": self.sample_layer,
            "seed": self.seed,
            "transform_matrix": self.model.transform is not None,
            "num_layers": self.model.arch.num_layers,
            "model_num_parameters": sum(p.numel() for p in self.model.base.parameters()),
            "model_dtype": str(self.model.arch.embeddings.weight.dtype),
            **prompt_report(self.model.cc_config.augment, self.withhold_english, self.without_english[0]),
        }

    # -- prompts -------------------------------------------------------------------------------
    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        """The model's prompt format, as in training: its chat template (with the system prompt saved
        with the model when the history has none), or the plain format for a model without one."""
        messages = list(chat_history)
        system = self.model.cc_config.prompt_format.system_prompt
        if system and not any(m["role"] == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": system})
        if self.encoder.mode == "plain":
            return self._plain_chat(messages, add_generation_prompt)
        try:
            text = self.tokenizer.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=not add_generation_prompt,
            )
        except Exception as err:  # noqa: BLE001 - the user's template raised: one line
            raise CCError(f"the tokenizer's chat template failed: {err}") from None
        return text if isinstance(text, str) else text[0]

    def _plain_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The plain format (docs/method.md §2.2) over a conversation: each user turn an instruction,
        each assistant turn a response ending with eos (the last one open when it is continued)."""
        eos = self.tokenizer.eos_token or ""
        text = self.tokenizer.bos_token or ""
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system:
            text += "\n\n".join(system) + "\n\n"
        turns = [m for m in messages if m["role"] != "system"]
        for i, m in enumerate(turns):
            if m["role"] == "user":
                text += PLAIN_HEAD + m["content"] + PLAIN_TAIL
            else:
                last = i == len(turns) - 1
                text += m["content"] + ("" if last and not add_generation_prompt else eos)
        return text

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs
    ):
        """lm-eval's ``hf`` rule: the tokenizer's default special tokens, none when ``string``
        already starts with the prefix (BOS) token's text, or as ``add_special_tokens`` /
        ``add_bos_token`` say."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        if add_special_tokens is None and string.startswith(self.tokenizer.decode(self.prefix_token_id)):
            add_special_tokens = False
        kwargs = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kwargs)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _position(self, prompt_length: int) -> int:
        p = prompt_length - 1 - self.offset
        if p < 0:
            raise CCError(
                f"position_offset={self.offset} is beyond the start of a {prompt_length}-token prompt"
            )
        return p

    def _english_prompt(self, request) -> EncodedPrompt | None:
        if self.connection != "english":
            return None
        doc = getattr(request, "doc", None) or {}
        text = doc.get(self.english_field) if isinstance(doc, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise CCError(
                f"connection 'english' reads the English prompt from the document field '{self.english_field}', "
                f"which a document of task '{getattr(request, 'task_name', None)}' lacks (model_args english_field=...)"
            )
        if text not in self._english_cache:  # every choice of a document asks again
            self._english_cache[text] = self.encoder.encode_prompt(text, self.max_length)
        return self._english_cache[text]

    def _context(self, request, context: str) -> str:
        """``context`` as a model trained with ``--augment bilingual-prompt`` is prompted: the document's
        instruction (``prompt_field``) preceded by its English (``english_field``), unless
        ``withhold_english`` (:func:`~cctuning.data.augment.augmented_context`); counted."""
        augment = self.model.cc_config.augment
        if augment != "bilingual-prompt" or not context:
            return context
        doc = getattr(request, "doc", None)
        doc = doc if isinstance(doc, dict) else {}
        instruction, english = doc.get(self.prompt_field), doc.get(self.english_field)
        english = None if self.withhold_english or not isinstance(english, str) else english
        text, alone = (
            augmented_context(context, instruction, english, augment, doc.get("lang"))
            if isinstance(instruction, str)
            else (context, True)
        )
        self.without_english[0] += alone
        self.without_english[1] += 1
        return text

    def _warn_without_english(self, before: list[int]) -> None:
        """One warning for the requests of this call that went without their English."""
        warn_without_english(
            "lm-eval", self.without_english[0] - before[0], self.without_english[1] - before[1]
        )

    # -- log-likelihoods -----------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        inputs: dict[tuple, _Scored] = {}
        before = list(self.without_english)
        for index, request in enumerate(requests):
            context, continuation = request.args
            context = self._context(request, context)
            if context == "":
                cont = self.tok_encode(continuation, add_special_tokens=False)
                ctx, cont = (
                    ([self.prefix_token_id], cont)
                    if self.prefix_token_id != cont[0]
                    else (cont[:1], cont[1:])
                )
                prompt = len(ctx)
            else:
                ctx, cont = self._encode_pair(context, continuation)
                # p: the last token of the context as given, before lm-eval moved its trailing
                # whitespace into the continuation (the rendered prompt of training)
                given = self.tok_encode(context)
                prompt = len(given) if (ctx + cont)[: len(given)] == given else len(ctx)
            self._add(
                inputs, ctx + cont, self._position(prompt), self._english_prompt(request), index, len(cont)
            )
        self._warn_without_english(before)
        scores = self._score(list(inputs.values()), len(requests), disable_tqdm)
        for request, score in zip(requests, scores):
            self.cache_hook.add_partial("loglikelihood", request.args, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        if self.connection == "english":
            raise CCError(
                "connection 'english' needs a prompt; loglikelihood_rolling scores whole texts without one"
            )
        inputs: dict[tuple, _Scored] = {}
        owner: list[int] = []  # the request of each window
        for index, request in enumerate(requests):
            (string,) = request.args
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(string),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for ctx, cont in map(make_disjoint_window, windows):
                self._add(inputs, ctx + cont, self._position(len(ctx)), None, len(owner), len(cont))
                owner.append(index)
        per_window = self._score(list(inputs.values()), len(owner), disable_tqdm)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, per_window):
            totals[index] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """lm-eval's token-level entry point: ``(strings, context ids, continuation ids)`` triples,
        with p the last context token."""
        inputs: dict[tuple, _Scored] = {}
        for index, (_, ctx, cont) in enumerate(requests):
            self._add(inputs, ctx + cont, self._position(len(ctx)), None, index, len(cont))
        return self._score(list(inputs.values()), len(requests), disable_tqdm)

    def _add(self, inputs: dict, tokens: list[int], p: int, english, index: int, n_cont: int) -> None:
        """Requests with the same model input (all tokens but the last), p and English prompt share a forward."""
        if n_cont <= 0:
            raise CCError("lm-eval asked for the log-likelihood of an empty continuation")
        if n_cont > self.max_length:
            raise CCError(f"a continuation of {n_cont} tokens is longer than max_length={self.max_length}")
        cut = max(0, len(tokens) - (self.max_length + 1))  # lm-eval truncates from the left
        if cut:
            logger.warning(
                "context and continuation (%d tokens) exceed max_length=%d: %d tokens cut from the left",
                len(tokens),
                self.max_length,
                cut,
            )
            tokens, p = tokens[cut:], p - cut
            if p < 0:
                logger.warning(
                    "the connection position was cut off; the connection is applied at the first token"
                )
                p = 0
        key = (tuple(tokens[:-1]), p, None if english is None else tuple(english.ids))
        entry = inputs.setdefault(key, _Scored(tokens, p, english))
        entry.members.append((index, n_cont, tokens[-n_cont:]))

    def _score(self, inputs: list[_Scored], count: int, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """``(log-probability, is greedy)`` of every request: batched forwards, longest first."""
        inputs = sorted(inputs, key=lambda s: (-len(s.tokens), tuple(s.tokens)))
        draws = max(1, self.sample_layer)
        sums = [0.0] * count
        greedy = [True] * count
        bar = tqdm(total=count * draws, desc=f"loglikelihood ({self.connection})", disable=disable_tqdm)
        try:
            for draw in range(draws):
                sampling = (
                    layer_sampling(self.model, self.seed + draw)
                    if self.sample_layer
                    else contextlib.nullcontext()
                )
                with sampling, torch.no_grad():
                    for start in range(0, len(inputs), self.batch_size):
                        batch = inputs[start : start + self.batch_size]
                        for entry, logprobs in zip(batch, self._forward(batch)):
                            for index, n_cont, target in entry.members:
                                scored = logprobs[-n_cont:]
                                target = torch.tensor(target, device=scored.device)
                                sums[index] += float(scored.gather(1, target[:, None]).sum()) / draws
                                greedy[index] &= bool((scored.argmax(-1) == target).all())
                                bar.update(1)
        finally:
            bar.close()
        return list(zip(sums, greedy))

    def _forward(self, batch: list[_Scored]) -> list[torch.Tensor]:
        """Per input, the log-softmax of the logits at each of its positions (its padding dropped)."""
        rows = [s.tokens[:-1] for s in batch]
        ids, mask, _ = pad_rows(rows, self.generator.pad_id, "right")
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = torch.tensor([s.p for s in batch], device=self.device)
        english = {}
        if self.connection == "english":
            en_ids, en_mask, _ = pad_rows([s.english.ids for s in batch], self.generator.pad_id, "right")
            english = dict(
                en_input_ids=en_ids.to(self.device),
                en_attention_mask=en_mask.to(self.device),
                en_positions=torch.tensor([s.english.position for s in batch], device=self.device),
            )
        out = connected_forward(
            self.model,
            self.connection,
            ids,
            mask,
            positions,
            **english,
            position_ids=positions_from_mask(mask),
            use_cache=False,
        )
        logprobs = torch.log_softmax(out.logits.float(), dim=-1)
        return [logprobs[i, : len(row)] for i, row in enumerate(rows)]


register()
