"""Serving throughput (``serve``): N concurrent clients against ``cctuning serve`` next to offline
generation (``CCGenerator.generate``, what ``cctuning generate`` runs) on the same prompts at the same
batch size, in one run.

For each N (1, 4, 16 clients): one server (the app of ``cctuning serve`` under uvicorn, in this process,
on 127.0.0.1) with ``--max-batch-size N`` on a CC-Tuning model (random Decision Maker, identity-plus-
noise matrix: the cost of trained ones), connection ``transform``. A round: N client threads each send
``requests`` chat completions one after the other (HTTP keep-alive, greedy, ``max_tokens`` new
tokens), all starting together; then, in a rotated order, the offline generator makes the same
N × ``requests`` answers in batches of N. Stop tokens are switched off, so every answer has exactly
``new_tokens`` tokens in both. Reported per N: tokens/s of each (answer tokens over the wall time of
the round's part), their ratio per round (target at 16 clients: ≥ 0.8), and the p50/p95 latency of
a request (from sending it to the whole answer), over the kept rounds. The clients run in the same
process and share its cores with the server, as a client on the same machine would.
"""

from __future__ import annotations

import http.client
import json
import statistics
import threading
import time
from dataclasses import dataclass
from typing import Any

from bench.common import (
    Contention,
    Loaded,
    clean_rounds,
    mix_records,
    pairwise_ratios,
    rotated,
    summary,
    wrap,
)


@dataclass
class ServeSetup:
    clients: tuple[int, ...] = (1, 4, 16)
    requests: int = 2  # requests per client and round
    new_tokens: int = 32
    repeats: int = 3
    seed: int = 0


def _client(
    port: int, prompts: list[str], new_tokens: int, start: threading.Barrier, latencies: list, errors: list
):
    """One client: its prompts one after the other on one connection; each request's latency."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start.wait()
    try:
        for prompt in prompts:
            body = {
                "model": "bench",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": new_tokens,
            }
            began = time.perf_counter()
            conn.request(
                "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
            )
            answer = json.loads(conn.getresponse().read())
            latencies.append(time.perf_counter() - began)
            if answer.get("usage", {}).get("completion_tokens") != new_tokens:
                errors.append(f"expected {new_tokens} tokens, got {answer}")
    except Exception as err:  # reported by the round, which fails
        errors.append(repr(err))
    finally:
        conn.close()


def _serve_round(port: int, prompts: list[str], clients: int, new_tokens: int) -> tuple[float, list[float]]:
    """Wall seconds for ``clients`` clients to get all ``prompts`` answered, and each request's latency."""
    share = [prompts[i::clients] for i in range(clients)]
    start, latencies, errors = threading.Barrier(clients + 1), [], []
    threads = [
        threading.Thread(target=_client, args=(port, mine, new_tokens, start, latencies, errors))
        for mine in share
    ]
    for thread in threads:
        thread.start()
    start.wait()
    began = time.perf_counter()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    if errors:
        raise RuntimeError(f"serve round failed: {errors[0]}")
    return seconds, latencies


def bench_serve(loaded: Loaded, setup: ServeSetup, contention: Contention) -> dict[str, Any]:
    from cctuning.inference import CCGenerator
    from cctuning.serve.server import Server, bind, build

    model = wrap(loaded, "cc", with_transform=True).eval()
    out: dict[str, Any] = {"new_tokens": setup.new_tokens, "requests_per_client": setup.requests}
    for clients in setup.clients:
        prompts = [r["instruction"] for r in mix_records(clients * setup.requests, seed=setup.seed + clients)]
        gen = CCGenerator(model, loaded.tokenizer, max_new_tokens=setup.new_tokens, batch_size=clients)
        gen.stop_ids = set()  # exactly new_tokens tokens everywhere
        built = build(
            gen, "bench", max_batch_size=clients, queue_size=4 * clients, max_tokens=setup.new_tokens
        )
        server = Server(built.app, bind("127.0.0.1", 0)).start()
        port = server.sock.getsockname()[1]
        try:
            out[f"c{clients}"] = _measure(gen, built.engine, port, prompts, clients, setup, contention)
        finally:
            server.stop()
            built.engine.stop()
    return out


def _measure(gen, engine, port, prompts, clients, setup, contention) -> dict[str, Any]:
    tokens = len(prompts) * setup.new_tokens
    contention.settle()
    _serve_round(port, prompts, clients, setup.new_tokens)  # warm-up
    gen.generate(prompts, "transform")

    def one_round(_index: int, attempt: int) -> dict:
        times: dict[str, Any] = {}
        for part in rotated(["serve", "offline"], attempt):
            if part == "serve":
                times["serve"], times["latencies"] = _serve_round(port, prompts, clients, setup.new_tokens)
            else:
                began = time.perf_counter()
                gen.generate(prompts, "transform")
                times["offline"] = time.perf_counter() - began
        return times

    engine.stats.largest_batch = 0
    kept, info = clean_rounds(setup.repeats, one_round, contention, f"serve c{clients}",
                              lambda r: f"serve {r['serve']:.2f} s, offline {r['offline']:.2f} s")  # fmt: skip
    latencies = sorted(lat for r in kept for lat in r["latencies"])
    return {
        "ratio": summary(
            pairwise_ratios([tokens / r["serve"] for r in kept], [tokens / r["offline"] for r in kept])
        ),
        "serve_tokens_per_s": summary([tokens / r["serve"] for r in kept], 1),
        "offline_tokens_per_s": summary([tokens / r["offline"] for r in kept], 1),
        "latency_p50_s": round(statistics.median(latencies), 3),
        "latency_p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 3),
        "requests": len(latencies),
        "largest_batch": engine.stats.largest_batch,
        "mean_prompt_tokens": round(
            statistics.mean(len(gen.encoder.encode_prompt(p).ids) for p in prompts), 1
        ),
        "contention": info,
    }
