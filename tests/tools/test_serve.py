"""`transformers serve models/merged` (README, "Use the model") answers as `sftflow chat` does.

The tiny pipeline's merged model is served on 127.0.0.1 (offline: HF_HUB_OFFLINE=1, set in
conftest), asked through the OpenAI-compatible `/v1/chat/completions` for a greedy reply, and
the reply is compared with `sftflow chat --prompt --greedy` on the same prompt and system prompt.
Needs the `serve` extra (setup.sh installs it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.conftest import bin_path, run

PROMPT = "Who are you?"
MAX_NEW_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, server: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, f"transformers serve exited ({server.returncode}):\n{log.read_text()}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        assert time.monotonic() < deadline, f"transformers serve not up within {timeout:.0f} s:\n{log.read_text()}"
        time.sleep(0.5)


def test_served_greedy_reply_equals_sftflow_chat(tiny_project: Path, tmp_path: Path) -> None:
    from transformers.utils.import_utils import is_serve_available

    from stages.core.params import load_params

    assert is_serve_available(), "transformers serve needs the serve extra: pip install -e '.[serve]' (setup.sh does)"
    system = load_params(tiny_project / "params.yaml").data.system_prompt
    assert system, "the tiny pipeline writes data.system_prompt: both sides must get the same one"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        server = subprocess.Popen(
            [bin_path("transformers"), "serve", "models/merged", "--host", "127.0.0.1", "--port", str(port)],
            cwd=tiny_project, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy(),
        )
    try:
        # sftflow chat loads its own copy meanwhile: its system prompt is the same data.system_prompt
        chat = run([bin_path("sftflow"), "chat", "--model", "models/merged", "--prompt", PROMPT, "--greedy",
                    "--max-new-tokens", str(MAX_NEW_TOKENS)], tiny_project)
        wait_healthy(url, server, log)
        body = {
            "model": "models/merged",  # the served one (a server started with a model serves only it)
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": PROMPT}],
            "temperature": 0,  # greedy: the server turns sampling off
            "max_tokens": MAX_NEW_TOKENS,
        }
        request = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            answer = json.loads(r.read())
    finally:
        server.terminate()  # SIGTERM: uvicorn shuts down cleanly
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    served = answer["choices"][0]["message"]["content"]
    assert 0 < answer["usage"]["completion_tokens"] <= MAX_NEW_TOKENS, answer
    assert served.strip(), answer  # a reply, not whitespace: the trained tiny model answers in words
    assert served == chat.stdout.removesuffix("\n"), (served, chat.stdout)
    assert server.returncode is not None  # stopped
