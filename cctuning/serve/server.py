"""Putting ``cctuning serve`` together: a loaded model behind an engine and the app, on a socket.

:func:`build` is what the command runs after loading the model; :class:`Server` runs uvicorn on a
socket bound beforehand (:func:`bind`: a port in use is a one-line error, and port 0 picks a free
one), in this thread (the command) or in a background thread (tests, the bench).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import uvicorn

from cctuning.errors import CCError
from cctuning.inference.generate import CCGenerator
from cctuning.model.connection import resolve_connection
from cctuning.serve.app import MAX_BODY, create_app
from cctuning.serve.engine import Engine
from cctuning.serve.protocol import Served


@dataclass
class Built:
    served: Served
    engine: Engine
    app: object


def build(
    generator: CCGenerator,
    name: str,
    connection: str | None = None,
    max_batch_size: int = 8,
    queue_size: int = 64,
    max_tokens: int = 256,
    api_key: str | None = None,
    precision=contextlib.nullcontext,
    max_body: int = MAX_BODY,
) -> Built:
    """The app serving ``generator``'s model as ``name``, its engine started (``connection``: the
    default of requests that name none; None: transform when the model has a matrix, else none)."""
    check_options(name, max_batch_size, queue_size, max_tokens)
    served = Served(name, generator, resolve_connection(generator.model, connection), max_tokens, queue_size)
    engine = Engine(generator, max_batch_size, queue_size, precision).start()
    return Built(served, engine, create_app(served, engine, api_key, max_body))


def check_options(name: str, max_batch_size: int, queue_size: int, max_tokens: int) -> None:
    """One-line errors for the served name and the limits (before anything loads)."""
    limits = {"--max-batch-size": max_batch_size, "--queue-size": queue_size, "--max-tokens": max_tokens}
    for option, value in limits.items():
        if value <= 0:
            raise CCError(f"{option} must be > 0, got {value}")
    if not name or "@" in name:
        raise CCError(f"the served model name must be non-empty and without '@', got '{name}'")


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (a one-line error when that is not possible)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as err:
        raise CCError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    return sock


class Server:
    """uvicorn serving ``app`` on ``sock``."""

    def __init__(self, app, sock: socket.socket):
        self.sock = sock
        self.server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        )
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}"

    def run(self) -> None:
        """Serve until interrupted (Ctrl-C, SIGTERM)."""
        self.server.run(sockets=[self.sock])

    def start(self, timeout: float = 30.0) -> Server:
        """Serve from a background thread; returns once it accepts connections."""
        self.thread = threading.Thread(target=self.run, name="cctuning-serve-http", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
        self.sock.close()
