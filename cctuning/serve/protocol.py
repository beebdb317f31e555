"""The request fields of ``cctuning serve`` (the OpenAI protocol's, and ours), checked one by one.

Every problem is an :class:`APIError`: an HTTP status and an OpenAI-shaped body
``{"error": {"message", "type", "param", "code"}}``. Fields that change what the model computes and
that the server does not implement (``frequency_penalty``, ``logit_bias``, tools, ...) are refused
when they are set to anything but their neutral value; other unknown fields are ignored, as the
OpenAI clients send a few of their own.
"""

from __future__ import annotations

from dataclasses import dataclass

from cctuning.data.formats import json_type, text_problem
from cctuning.errors import CCError
from cctuning.inference.generate import CCGenerator
from cctuning.model.connection import CONNECTIONS, resolve_connection
from cctuning.serve.sequence import Sampling

#: most stop strings in one request (the OpenAI API allows 4)
MAX_STOP = 16
#: fields the server refuses unless neutral: name -> the neutral values
UNSUPPORTED = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logit_bias": ({},),
    "best_of": (1,),
    "suffix": ("",),
    "tools": ([],),
    "functions": ([],),
    "tool_choice": ("none",),
    "top_logprobs": (0,),
    "prediction": (),
    "audio": (),
    "modalities": (["text"],),
}


class APIError(Exception):
    """A request the server refuses: ``status`` and the OpenAI error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str, code: str | None = None) -> APIError:
    """A 400 about the request field ``param``."""
    return APIError(400, message, param=param, code=code)


def field(body: dict, name: str, kinds: tuple[type, ...], default=None):
    """``body[name]`` checked to be of one of ``kinds`` (a JSON number is ``int`` or ``float``; a
    boolean is no number); missing or null: ``default``."""
    value = body.get(name)
    if value is None:
        return default
    boolean = isinstance(value, bool)
    if not isinstance(value, kinds) or (boolean and bool not in kinds):
        names = " or ".join(dict.fromkeys(_TYPE_NAMES[k] for k in kinds))
        got = _TYPE_NAMES.get(type(value), json_type(value))
        raise bad(name, f"'{name}' must be {_article(names)}, got {_article(got)}", "invalid_type")
    if float in kinds and isinstance(value, int) and not boolean:
        value = float(value)
    return value


_TYPE_NAMES = {int: "integer", float: "number", str: "string", list: "array", dict: "object", bool: "boolean"}


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def text_field(body: dict, name: str) -> str | None:
    """A non-empty string field, or None when absent."""
    value = body.get(name)
    if value is None:
        return None
    problem = text_problem(value)
    if problem:
        raise bad(name, f"'{name}' {problem}", "invalid_type" if not isinstance(value, str) else None)
    return value


def check_unsupported(body: dict) -> None:
    for name, neutral in UNSUPPORTED.items():
        if body.get(name) is not None and body[name] not in neutral:
            raise bad(name, f"'{name}' is not supported by cctuning serve", "unsupported_parameter")


def sampling(body: dict, default_max_tokens: int, max_name: str = "max_tokens") -> Sampling:
    """``max_tokens`` (> 0), ``temperature`` (0 to 2; 0: greedy, the default), ``top_p`` (0 to 1],
    ``stop`` (a string or a list of strings) and ``seed``."""
    max_tokens = field(body, max_name, (int,), default_max_tokens)
    if max_tokens <= 0:
        raise bad(max_name, f"'{max_name}' must be > 0, got {max_tokens}", "invalid_value")
    temperature = field(body, "temperature", (int, float), 0.0)
    if not 0.0 <= temperature <= 2.0:
        raise bad("temperature", f"'temperature' must be between 0 and 2, got {temperature}", "invalid_value")
    top_p = field(body, "top_p", (int, float), 1.0)
    if not 0.0 < top_p <= 1.0:
        raise bad("top_p", f"'top_p' must be in (0, 1], got {top_p}", "invalid_value")
    stop = field(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad("stop", f"'stop' must be a string or a list of at most {MAX_STOP} non-empty strings")
    seed = field(body, "seed", (int,))
    return Sampling(max_tokens, temperature, top_p, tuple(stop), seed)


@dataclass
class Served:
    """The model the server serves: its name, its generator (model, tokenizer, prompt encoder), the
    default connection and the per-request limits."""

    name: str
    generator: CCGenerator
    connection: str
    max_tokens: int = 256
    max_n: int = 64

    @property
    def model(self):
        return self.generator.model

    @property
    def tokenizer(self):
        return self.generator.tokenizer

    def connections(self) -> list[str]:
        """The connections this model can run (``english`` with the English prompt of each request)."""
        usable = []
        for connection in CONNECTIONS:
            try:
                resolve_connection(self.model, connection, None)
            except CCError:
                continue
            usable.append(connection)
        return usable

    def model_ids(self) -> list[str]:
        """``NAME`` (the default connection) and ``NAME@CONNECTION`` for every connection it can run:
        clients that cannot send extra fields choose the connection by the model's name."""
        return [self.name] + [f"{self.name}@{c}" for c in self.connections()]

    def model_connection(self, body: dict) -> tuple[str, str | None]:
        """The requested model (it must be one of :meth:`model_ids`) and the connection its name
        chooses (None: the default)."""
        name = field(body, "model", (str,))
        if name is None:
            raise bad("model", "'model' is required", "missing_required_parameter")
        if name not in self.model_ids():
            raise APIError(
                404,
                f"the model '{name}' does not exist; this server serves {', '.join(self.model_ids())}",
                param="model",
                code="model_not_found",
            )
        return name, name.partition("@")[2] or None

    @property
    def bilingual(self) -> bool:
        """Whether the model was trained with ``--augment bilingual-prompt``: its chat prompt carries
        the English instruction where it is given (:func:`cctuning.data.augment.inference_instruction`)."""
        return self.model.cc_config.augment == "bilingual-prompt"

    def connection_of(self, body: dict, alias: str | None, english: bool, prompt_reads: bool = False) -> str:
        """The request's connection: ``connection``, or the model name's, or ``english`` when the
        English prompt is given (and the prompt itself does not read it: ``prompt_reads``, a chat
        request to a ``bilingual-prompt`` model), or the server's default; checked against the model."""
        given = field(body, "connection", (str,))
        if given is not None and given not in CONNECTIONS:
            raise bad("connection", f"unknown connection '{given}' (use {', '.join(CONNECTIONS)})")
        if given and alias and given != alias:
            raise bad("connection", f"'connection' is {given} but the model name '@{alias}' asks for {alias}")
        connection = given or alias or ("english" if english and not prompt_reads else self.connection)
        if connection == "english" and not english:
            raise bad("english", "connection 'english' needs the English version of the prompt in 'english'")
        try:
            connection = resolve_connection(self.model, connection, english)
        except CCError as err:
            raise bad("english" if english and not (given or alias) else "connection", str(err)) from None
        if english and connection != "english" and not prompt_reads:
            raise bad(
                "english",
                f"'english' is read by connection english only; this request runs connection {connection}"
                + (" (a bilingual-prompt model reads it in chat requests only)" if self.bilingual else ""),
            )
        return connection
