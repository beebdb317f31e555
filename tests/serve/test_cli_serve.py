"""``cctuning serve`` as a command: a real process on a saved model (it prints where it listens, answers
with the API key, stops on Ctrl-C), and its one-line errors."""

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from cctuning.cli import build_parser, main
from tests.conftest import connected_model
from tests.serve.test_api import call

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("cli") / "cc"
    connected_model(tokenizer, seed=3).save_pretrained(path, tokenizer=tokenizer)
    return path


@pytest.mark.slow
def test_the_command_serves_a_folder_with_a_key_and_stops_on_ctrl_c(folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CCTUNING_API_KEY": "sk-env", "CCTUNING_DEVICE": "cpu"}
    args = [
        sys.executable,
        "-m",
        "cctuning.cli",
        "serve",
        "--model",
        str(folder),
        "--port",
        "0",
        "--max-tokens",
        "4",
    ]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("serving cc (connection transform by default; models cc, cc@transform"), line
        url = line.split(" on ")[1].split(":")[:3]
        url = ":".join(url).rstrip(":")
        assert url.startswith("http://127.0.0.1:")
        assert call(url, "GET", "/health")[0] == 200
        body = {"model": "cc", "messages": [{"role": "user", "content": "Habari?"}]}
        assert call(url, "POST", "/v1/chat/completions", body=body)[0] == 401
        status, answer = call(
            url, "POST", "/v1/chat/completions", body=body, headers={"Authorization": "Bearer sk-env"}
        )
        assert status == 200 and answer["usage"]["completion_tokens"] <= 4, json.dumps(answer)
        assert answer["choices"][0]["cctuning"]["connection"] == "transform"
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "cctuning serve: stopped" in out, err
    assert "Traceback" not in err


def test_a_port_in_use_is_a_one_line_error_before_the_model_loads(capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert main(["serve", "--model", "/nonexistent", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cctuning: error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1


def test_options_and_their_defaults():
    sub = next(a for a in build_parser("serve")._actions if a.dest == "command").choices["serve"]
    args = sub.parse_args(["--model", "m"])
    assert (args.host, args.port, args.max_batch_size, args.queue_size, args.connection) == (
        "127.0.0.1",
        8000,
        8,
        64,
        None,
    )
    assert args.api_key is None and not args.trust_remote_code
    assert main(["serve", "--model", "/nonexistent", "--port", "0"]) == 2  # a one-line error, no traceback
