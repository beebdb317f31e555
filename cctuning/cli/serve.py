"""``cctuning serve``: an OpenAI-compatible server with the connection, and a chat page (docs/serving.md)."""

from __future__ import annotations

import argparse
import os
from importlib.util import find_spec
from pathlib import Path

from cctuning.cli.common import (
    MODEL_HELP,
    add_connection,
    add_loading_options,
    add_special_tokens_option,
    inference_autocast,
)
from cctuning.errors import CCError
from cctuning.io import folder_lock

#: environment variable holding the API key (keeps it out of the process list)
API_KEY_ENV = "CCTUNING_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_connection(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--served-model-name", help="the model name clients ask for (default: the folder's name)")
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded together at most")
    p.add_argument(
        "--queue-size", type=int, default=64, help="sequences waiting at most; more are refused with 503"
    )
    p.add_argument("--max-tokens", type=int, default=256, help="max_tokens of a request that gives none")
    p.add_argument(
        "--max-length", type=int, help="tokens of prompt and answer together (default: the model's)"
    )
    p.add_argument(
        "--api-key", help=f"require 'Authorization: Bearer KEY' on /v1 (default: ${API_KEY_ENV}, else none)"
    )
    add_special_tokens_option(p, "messages")
    add_loading_options(p)
    p.set_defaults(func=serve)
    return p


def serve(args: argparse.Namespace) -> int:
    missing = [m for m in ("fastapi", "uvicorn") if find_spec(m) is None]
    if missing:  # checked before the model loads
        raise CCError(f"cctuning serve needs {' and '.join(missing)}: pip install 'cctuning[serve]'")
    from cctuning.inference.generate import CCGenerator  # deferred: imports torch
    from cctuning.loading import load_for_inference, resolve_model_path  # deferred: imports torch
    from cctuning.serve.server import Server, bind, build, check_options  # deferred: imports torch, FastAPI

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    name = args.served_model_name or (Path(args.model).name if Path(args.model).is_dir() else args.model)
    check_options(name, args.max_batch_size, args.queue_size, args.max_tokens)
    sock = bind(args.host, args.port)  # a port in use fails before the model loads
    path = resolve_model_path(args.model)
    with folder_lock(path, "cctuning serve", shared=True):  # no train --overwrite while it is served
        model, tok, _ = load_for_inference(path, args.trust_remote_code, device=args.device, dtype=args.dtype)
        generator = CCGenerator(
            model,
            tok,
            max_new_tokens=args.max_tokens,
            batch_size=args.max_batch_size,
            max_length=args.max_length,
            allow_special_tokens=args.allow_special_tokens,
        )
        built = build(
            generator,
            name,
            args.connection,
            args.max_batch_size,
            args.queue_size,
            args.max_tokens,
            api_key,
            precision=lambda: inference_autocast(args),  # autocast is per thread: the engine's own
        )
        server = Server(built.app, sock)
        print(
            f"serving {name} (connection {built.served.connection} by default; models "
            f"{', '.join(built.served.model_ids())}) on {server.url}: chat page {server.url}/, "
            f"API {server.url}/v1" + ("" if api_key else " (no API key)")
        )
        if args.host not in LOOPBACK and not api_key:
            print(f"warning: listening on {args.host} without an API key: anyone who reaches it can use it")
        try:
            server.run()
        except KeyboardInterrupt:  # Ctrl-C: uvicorn has shut down and re-raises the signal to say so
            pass
        finally:
            built.engine.stop()
    print("cctuning serve: stopped")
    return 0
