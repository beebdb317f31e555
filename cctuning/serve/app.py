"""The HTTP side of ``cctuning serve``: a FastAPI app with the OpenAI endpoints, ``/health`` and the
chat page (docs/serving.md).

* ``POST /v1/chat/completions``, ``POST /v1/completions`` (``"stream": true``: server-sent events),
  ``GET /v1/models``, ``GET /health`` and ``GET /`` (the chat page, one static file).
* With an API key, every endpoint but ``/health`` needs it (compared in constant time): as
  ``Authorization: Bearer KEY`` (what OpenAI clients send), or as HTTP Basic credentials with the key
  as the password and any user name. The page answers a request without it with a Basic challenge,
  so a browser asks for the key once and sends it with the page's own requests too.
* Every refusal has an OpenAI-shaped body, also a wrong path or method, a body that is not JSON or
  is over ``max_body`` bytes, and an unexpected failure (500, logged with its traceback).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from importlib.resources import files

from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from cctuning.data.augment import inference_instruction, needs_english, warn_without_english
from cctuning.serve.engine import Engine
from cctuning.serve.prompts import chat_instruction, completion_prompts, encode_chat, raw_prompt
from cctuning.serve.protocol import APIError, Served, bad, check_unsupported, field, sampling, text_field
from cctuning.serve.runs import Execution, Run
from cctuning.serve.scoring import score

logger = logging.getLogger(__name__)

#: the largest request body read, in bytes (a larger one is refused with 413)
MAX_BODY = 16 * 2**20
PAGE = "static/chat.html"


async def read_json(request: Request, limit: int) -> dict:
    """The request's body as a JSON object (400 when it is none, 413 when it is over ``limit`` bytes)."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise APIError(413, f"the request body is over {limit} bytes", code="request_too_large")
    try:
        body = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise bad(None, "the request body is not UTF-8", "invalid_json") from None
    except json.JSONDecodeError as err:
        raise bad(None, f"the request body is not valid JSON: {err}", "invalid_json") from None
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object", "invalid_json")
    return body


#: the challenge of the chat page (only there: an API client's 401 must not open a browser dialog)
CHALLENGE = {"WWW-Authenticate": 'Basic realm="cctuning serve", charset="UTF-8"'}


def given_key(authorization: str) -> str | None:
    """The key in an ``Authorization`` header: ``Bearer KEY``, or ``Basic`` credentials whose
    password is the key (any user name); None when there is none."""
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[2]
        except (binascii.Error, UnicodeDecodeError):
            return None
    return None


def key_check(api_key: str | None, challenge: bool = False):
    """A dependency that refuses requests without ``api_key`` (:func:`given_key`); ``challenge``: the
    refusal asks a browser for Basic credentials."""

    async def check(request: Request) -> None:
        if api_key is None:
            return
        given = given_key(request.headers.get("authorization", ""))
        if given is None or not hmac.compare_digest(given.encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or wrong API key (Authorization: Bearer KEY)",
                code="invalid_api_key",
                headers=CHALLENGE if challenge else None,
            )

    return check


def _stream_flags(body: dict) -> tuple[bool, bool]:
    stream = field(body, "stream", (bool,), False)
    options = field(body, "stream_options", (dict,), {})
    usage = options.get("include_usage", False)
    if not isinstance(usage, bool):
        raise bad("stream_options", "'stream_options.include_usage' must be a boolean")
    return stream, usage


def _n(body: dict, served: Served) -> int:
    n = field(body, "n", (int,), 1)
    if not 1 <= n <= served.max_n:
        raise bad("n", f"'n' must be between 1 and {served.max_n} (the queue size), got {n}", "invalid_value")
    return n


def chat_run(served: Served, body: dict) -> Run:
    """A chat request checked and tokenised."""
    check_unsupported(body)
    if body.get("logprobs") not in (None, False):
        raise bad("logprobs", "'logprobs' is not supported for chat completions", "unsupported_parameter")
    name, alias = served.model_connection(body)
    max_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    settings = sampling(body, served.max_tokens, max_name)
    n = _n(body, served)
    stream, usage = _stream_flags(body)
    plain = chat_instruction(served, body.get("messages"))
    english = text_field(body, "english")
    connection = served.connection_of(body, alias, english is not None, prompt_reads=served.bilingual)
    augment = served.model.cc_config.augment
    # a bilingual-prompt model reads the English inside its prompt where it is given (docs/data.md)
    warn_without_english("a chat request", int(needs_english(plain, english, augment)), 1)
    instruction = inference_instruction(plain, english, augment)
    prompt = encode_chat(served, instruction, settings.max_tokens, "messages")
    en = encode_chat(served, english, settings.max_tokens, "english") if connection == "english" else None
    bilingual = (instruction != plain) if served.bilingual else None
    return Run("chat", name, connection, [prompt], [en], settings, n, stream, usage, bilingual=bilingual)


def completion_run(served: Served, body: dict) -> Run:
    """A completion request checked and tokenised (echo: see :mod:`cctuning.serve.scoring`)."""
    check_unsupported(body)
    name, alias = served.model_connection(body)
    settings = sampling(body, served.max_tokens)
    n = _n(body, served)
    stream, usage = _stream_flags(body)
    prompts = completion_prompts(served, body, settings.max_tokens)
    english = body.get("english")
    if isinstance(english, str):
        english = [english]
    if english is not None and (not isinstance(english, list) or len(english) != len(prompts)):
        raise bad("english", "'english' must be a string, or an array with one English prompt per prompt")
    connection = served.connection_of(body, alias, english is not None)
    en = [raw_prompt(served, e, settings.max_tokens, "english") for e in english] if english else None
    run = Run(
        "completion", name, connection, prompts, en or [None] * len(prompts), settings, n, stream, usage
    )
    if run.n * len(prompts) > served.max_n:
        raise bad("n", f"{len(prompts)} prompts × n={n} choices exceed the queue size ({served.max_n})")
    return run


def create_app(
    served: Served, engine: Engine, api_key: str | None = None, max_body: int = MAX_BODY
) -> FastAPI:
    """The app serving ``served`` through ``engine`` (already started)."""
    app = FastAPI(title="cctuning serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served, app.state.engine = served, engine
    page = files("cctuning.serve").joinpath(PAGE).read_text(encoding="utf-8")
    _handlers(app)
    guarded = [Depends(key_check(api_key))]

    @app.get("/health")
    async def health():
        status = 200 if engine.alive else 503
        body = {"status": "ok" if engine.alive else "engine stopped", "model": served.name, **engine.load()}
        return JSONResponse(body, status_code=status)

    @app.get("/", response_class=HTMLResponse, dependencies=[Depends(key_check(api_key, challenge=True))])
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        data = [
            {"id": i, "object": "model", "created": 0, "owned_by": "cctuning",
             "cctuning": {"connection": i.partition("@")[2] or served.connection}}
            for i in served.model_ids()
        ]  # fmt: skip
        return {"object": "list", "data": data}

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat(request: Request):
        return await _respond(engine, chat_run(served, await read_json(request, max_body)), request)

    @app.post("/v1/completions", dependencies=guarded)
    async def completions(request: Request):
        body = await read_json(request, max_body)
        if body.get("echo") or body.get("logprobs") is not None:
            return await score(served, engine, body, request)
        return await _respond(engine, completion_run(served, body), request)

    return app


async def _respond(engine: Engine, run: Run, request: Request):
    execution = Execution(engine, run, request)
    if run.stream:
        return StreamingResponse(execution.stream(), media_type="text/event-stream")
    answer = await execution.answer()
    return JSONResponse(answer if answer is not None else {})


def _handlers(app: FastAPI) -> None:
    """OpenAI-shaped error bodies for every refusal and failure."""

    @app.exception_handler(APIError)
    async def api_error(_request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status, headers=err.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request, err: HTTPException):
        error = APIError(
            err.status_code, str(err.detail), code="not_found" if err.status_code == 404 else None
        )
        return JSONResponse(error.body(), status_code=err.status_code, headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def failure(_request, err: Exception):
        logger.exception("request failed")
        error = APIError(500, f"internal error: {type(err).__name__}", "server_error")
        return JSONResponse(error.body(), status_code=500)
