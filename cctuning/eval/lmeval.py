"""lm-evaluation-harness backend: the model class ``cctuning`` and the tasks of our six benchmarks.

lm-eval 0.4.13 finds models only in its own registry (no entry points for models or tasks), so
``cctuning lm-eval ARGS...`` (:func:`run_cli`) registers :class:`CCLM` as ``cctuning``, adds the
task folder shipped in the package (:data:`TASKS_DIR`) to ``--include_path`` and runs lm-eval's own
command line with every argument passed through. In Python, importing this module registers the
model: ``lm_eval.simple_evaluate(model="cctuning", model_args=..., task_manager=task_manager())``.

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
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from cctuning.data.collator import pad_rows
from cctuning.data.encoding import PLAIN_HEAD, PLAIN_TAIL, EncodedPrompt, PromptEncoder
from cctuning.errors import CCError
from cctuning.eval.benchmarks import BENCHMARKS, RESOURCE_DIR, Item, read_items
from cctuning.eval.scoring import score_item
from cctuning.inference.generate import CCGenerator
from cctuning.loading import load_for_inference
from cctuning.model.ccmodel import positions_from_mask
from cctuning.model.connection import connected_forward, layer_sampling, resolve_connection

logger = logging.getLogger(__name__)

MODEL_NAME = "cctuning"
TASKS_DIR = Path(__file__).resolve().parent.parent / "resources" / "lm_eval_tasks"
DEFAULT_MAX_LENGTH = 2048  # lm-eval's own fallback when neither config nor tokenizer gives one


def register() -> None:
    """Register :class:`CCLM` with lm-eval as ``cctuning`` (again: nothing happens)."""
    if model_registry.get(MODEL_NAME, None) is not CCLM:
        model_registry.register(MODEL_NAME)(CCLM)


def task_manager(include_path: str | Path | list | None = None, **kwargs):
    """An lm-eval ``TaskManager`` that knows our tasks (and ``include_path``'s)."""
    from lm_eval.tasks import TaskManager

    extra = [] if include_path is None else include_path if isinstance(include_path, list) else [include_path]
    return TaskManager(include_path=[str(TASKS_DIR), *map(str, extra)], **kwargs)


@dataclass
class _Scored:
    """One forward input: ``tokens`` (context + continuation, of which the model reads all but the
    last), the connection position ``p`` in them and the requests scored from its logits."""

    tokens: list[int]
    p: int
    english: EncodedPrompt | None
    # (request index, continuation length, continuation ids) of the requests scored from it
    members: list[tuple[int, int, list[int]]] = field(default_factory=list)


class CCLM(TemplateLM):
    """A cctuning model folder (CC-Tuning, SFT or plain) for lm-evaluation-harness (``--model cctuning``).

    ``model_args``: ``pretrained`` (a folder or preset name, or a loaded :class:`CCModel` with
    ``tokenizer``), ``connection`` (transform, none, english), ``sample_layer`` (K draws, 0: argmax),
    ``seed``, ``english_field``, ``batch_size``, ``max_length``, ``max_gen_toks`` (256, lm-eval's
    default), ``dtype``, ``device``, ``add_bos_token``, ``prefix_token_id``, ``trust_remote_code``.
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
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise CCError(
                f"lm-eval model 'cctuning' does not take {', '.join(sorted(unknown))} (see cctuning.eval.lmeval.CCLM)"
            )
        self._device = _device(device)
        if isinstance(pretrained, (str, Path)):  # loaded straight onto the device
            model, tokenizer, folder = load_for_inference(
                str(pretrained),
                trust_remote_code=trust_remote_code,
                dtype=_dtype(dtype),
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
        if isinstance(sample_layer, bool):
            sample_layer = int(sample_layer)
        if not isinstance(sample_layer, int) or sample_layer < 0:
            raise CCError(f"sample_layer takes the number of draws (≥ 0), got {sample_layer!r}")
        self.sample_layer = sample_layer if self.connection != "none" else 0
        self.seed = int(seed)
        self.english_field = english_field
        self._batch_size = _batch_size(batch_size, max_batch_size)
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

    # -- construction from lm-eval's arguments -------------------------------------------------
    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """``model_args`` win over lm-eval's own defaults (``--batch_size 1``, ``--device cuda:0``)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

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

    # -- log-likelihoods -----------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        inputs: dict[tuple, _Scored] = {}
        for index, request in enumerate(requests):
            context, continuation = request.args
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
                sampling = layer_sampling(self.model, self.seed + draw) if self.sample_layer else _nothing()
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

    # -- generation ----------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batches of requests with the same options, longest first (as lm-eval's ``hf`` model)."""
        if self.sample_layer > 1:
            logger.warning(
                "generate_until samples one layer per request (sample_layer=%d)", self.sample_layer
            )
        collator = Collator(
            [(*request.args, index) for index, request in enumerate(requests)],
            sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
            group_by="gen_kwargs",
            group_fn=lambda r: r[1],
        )
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        results = []
        bar = tqdm(total=len(requests), desc=f"generate_until ({self.connection})", disable=disable_tqdm)
        sampling = layer_sampling(self.model, self.seed) if self.sample_layer else _nothing()
        try:
            with sampling:
                for chunk in collator.get_batched(n=self.batch_size):
                    for text, (context, gen_kwargs, _) in zip(
                        self._generate_chunk(chunk, requests, eos), chunk
                    ):
                        results.append(text)
                        self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
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


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _dtype(name):
    if name in (None, "auto") or isinstance(name, torch.dtype):
        return None if name == "auto" else name
    value = getattr(torch, str(name), None)
    if not isinstance(value, torch.dtype):
        raise CCError(f"unknown dtype '{name}' (use float32, bfloat16, float16 or auto)")
    return value


def _device(name) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        logger.info("device %s is not available here; using the CPU", name)
        return torch.device("cpu")
    return device


def _batch_size(value, max_batch_size) -> int:
    if isinstance(value, str) and value.startswith("auto"):
        size = int(max_batch_size or 8)
        logger.warning("batch_size=%s: cctuning does not detect a batch size; using %d", value, size)
        return size
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise CCError(f"batch_size must be a positive integer, got {value!r}") from None
    if size <= 0:
        raise CCError(f"batch_size must be a positive integer, got {value!r}")
    return size


# -- tasks ------------------------------------------------------------------------------------------
def load_split(data_files, benchmark: str, lang: str, cctuning_data_dir: str | None = None, **_metadata):
    """``custom_dataset`` of our task YAMLs: the ``data_files`` (relative paths: inside
    ``cctuning_data_dir``, a ``--metadata`` key, or else the bundled development split), read and
    checked as ``cctuning eval`` reads them. Other keys (lm-eval's metadata, the model_args) are ignored."""
    from datasets import Dataset, DatasetDict

    base = Path(cctuning_data_dir).expanduser() if cctuning_data_dir else RESOURCE_DIR
    files = data_files if isinstance(data_files, dict) else {"test": data_files}
    splits = {}
    for split, name in files.items():
        path = Path(name).expanduser()
        items = read_items(path if path.is_absolute() else base / path, benchmark, lang)
        splits[split] = Dataset.from_list([_doc(item) for item in items])
    return DatasetDict(splits)


def _doc(item: Item) -> dict:
    answer = list(item.answer) if isinstance(item.answer, tuple) else item.answer
    return {
        "id": str(item.id),
        "prompt": item.prompt,
        "answer": answer,
        "prompt_en": item.prompt_en,
        "benchmark": item.benchmark,
        "lang": item.lang,
    }


def process_results(doc: dict, results: list[str]) -> dict[str, float]:
    """Our runner's per-item scores (``cctuning.eval.scoring.score_item``) of a generated answer."""
    answer = doc["answer"]
    item = Item(
        id=doc["id"],
        prompt=doc["prompt"],
        answer=tuple(answer) if isinstance(answer, list) else answer,
        prompt_en=doc["prompt_en"],
        lang=doc["lang"],
        benchmark=doc["benchmark"],
    )
    metrics = score_item(item, results[0])
    return {name: float(metrics[name]) for name in _generate_metrics(doc["benchmark"])}


def _generate_metrics(benchmark: str) -> tuple[str, ...]:
    spec = BENCHMARKS[benchmark]
    return spec.metrics + (("parsed",) if spec.answer_kind == "choice" else ())


GENERATED = "# Written by cctuning.eval.lmeval.write_task_configs(); change that function, not this file.\n"
MAX_GEN_TOKS = 40  # as `cctuning eval` and the paper


def _yaml_list(values) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def _task_head(task: str, bench: str, lang: str) -> str:
    return (
        f"{GENERATED}task: {task}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        "  data_files:\n"
        f"    test: {bench}/{lang}.jsonl\n"
        f"  benchmark: {bench}\n"
        f"  lang: {lang}\n"
        "custom_dataset: !function cctuning.eval.lmeval.load_split\n"
        "test_split: test\n"
        "doc_to_text: prompt\n"
    )


def _metrics(names) -> str:
    lines = ["metric_list:\n"]
    for name in names:
        lines.append(f"  - metric: {name}\n    aggregation: mean\n    higher_is_better: true\n")
    return "".join(lines)


def _group(group: str, tasks: list[str], metrics) -> str:
    lines = [f"{GENERATED}group: {group}\ntask:\n"]
    lines += [f"  - {t}\n" for t in tasks]
    lines.append("aggregate_metric_list:\n")
    for name in metrics:
        lines.append(f"  - metric: {name}\n    aggregation: mean\n    weight_by_size: false\n")
    lines.append("metadata:\n  version: 1.0\n")
    return "".join(lines)


def task_configs() -> dict[str, str]:
    """Every task and group YAML of :data:`TASKS_DIR` by relative path. Per benchmark, a task per
    language ``cctuning_<benchmark>_<lang>`` and a group ``cctuning_<benchmark>`` (languages
    weighted equally, as ``cctuning eval``'s average). Multiple-choice benchmarks are scored by
    likelihood (``acc``: the label whose continuation after the prompt is most likely); their
    ``cctuning_<benchmark>_gen_<lang>`` tasks generate and parse the label as ``cctuning eval``'s
    default scoring does. The others generate (greedy, 40 tokens) and are scored by our rules."""
    out = {}
    for bench, spec in BENCHMARKS.items():
        key = bench.lower()
        variants = []
        if spec.answer_kind == "choice":
            variants.append((f"cctuning_{key}", "choice", ("acc",)))
            variants.append((f"cctuning_{key}_gen", "generate", _generate_metrics(bench)))
        else:
            variants.append((f"cctuning_{key}", "generate", _generate_metrics(bench)))
        for group, kind, metrics in variants:
            tasks = []
            for lang in spec.languages:
                task = f"{group}_{lang}"
                tasks.append(task)
                text = _task_head(task, bench, lang)
                if kind == "choice":
                    labels = ", ".join(f"'{label}'" for label in spec.labels)
                    text += (
                        "output_type: multiple_choice\n"
                        f"doc_to_choice: {_yaml_list(spec.labels)}\n"
                        f'doc_to_target: "{{{{[{labels}].index(answer)}}}}"\n'
                        'target_delimiter: ""\n'
                    )
                else:
                    text += (
                        "output_type: generate_until\n"
                        "doc_to_target: answer\n"
                        "generation_kwargs:\n"
                        "  until: []\n"
                        f"  max_gen_toks: {MAX_GEN_TOKS}\n"
                        "  do_sample: false\n"
                        "process_results: !function cctuning.eval.lmeval.process_results\n"
                    )
                text += _metrics(metrics) + "metadata:\n  version: 1.0\n"
                out[f"{key}/{task}.yaml"] = text
            out[f"{key}/_{group}.yaml"] = _group(group, tasks, metrics)
    return out


def write_task_configs(folder: str | Path = TASKS_DIR) -> list[Path]:
    """Write :func:`task_configs` into ``folder`` (the package's own task folder by default)."""
    written = []
    for rel, text in task_configs().items():
        path = Path(folder) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


# -- command line -----------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> int:
    """lm-eval's command line (``lm-eval ARGS``) with the model ``cctuning`` registered and our task
    folder added to ``--include_path`` (before any folder given there)."""
    from lm_eval._cli import HarnessCLI

    register()
    cli = HarnessCLI()
    saved = sys.argv
    sys.argv = ["lm-eval", *argv]
    try:
        args = cli.parse_args()
    finally:
        sys.argv = saved
    if hasattr(args, "include_path"):
        given = args.include_path
        args.include_path = [str(TASKS_DIR)] + ([given] if given else [])
    cli.execute(args)
    return 0


register()
