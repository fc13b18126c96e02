"""`sftflow chat`: the prompt is the conversation in the model's own template, replies stream,
history carries across turns, /reset forgets; and it works for a person in a real terminal (tmux).

The tiny model is random, so its greedy replies degenerate to whitespace; the tests sample with
a seed instead (random subwords, the same in every process), which makes each reply distinct.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import bin_path
from tests.evaluate.test_evaluate import tiny_model_dir

SYSTEM = "You are a helpful assistant."
TURNS = ["Who are you?", "Tell me more."]


@pytest.fixture(scope="module")
def chat_dir(smollm_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("chat")
    tiny_model_dir(smollm_tokenizer_dir, root / "merged", seed=0)
    (root / "params.yaml").write_text(
        json.dumps({"data": {"system_prompt": SYSTEM}, "eval": {"max_new_tokens": 6, "temperature": 1.0}})
    )
    return root


def session(model_dir: Path, seed: int | None = 0) -> Any:
    from transformers import set_seed

    from stages.tools.chat import ChatSession, GenerationSettings, load_chat_model

    model, tok = load_chat_model(model_dir, None, None)
    if seed is not None:
        set_seed(seed)
    return ChatSession(model, tok, SYSTEM, GenerationSettings(max_new_tokens=6, do_sample=True))


def expected_replies(model_dir: Path) -> list[str]:
    s = session(model_dir)
    return [s.reply(t) for t in TURNS]


def test_prompt_is_the_history_in_the_models_template(chat_dir: Path) -> None:
    s = session(chat_dir / "merged")
    pieces: list[str] = []
    first = s.reply(TURNS[0], pieces.append)
    assert len([p for p in pieces if p]) > 1, pieces  # streamed piece by piece, not in one go
    assert "".join(pieces).strip() == first
    ids = s.prompt_ids(TURNS[1])["input_ids"][0].tolist()
    history = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": TURNS[0]},
        {"role": "assistant", "content": first},
        {"role": "user", "content": TURNS[1]},
    ]
    want = s.tok.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    assert s.tok.decode(ids) == want  # the earlier turn and the system prompt are in the prompt
    assert want.count("<|im_start|>system") == 1 and want.endswith("<|im_start|>assistant\n")
    s.reset()
    ids = s.prompt_ids(TURNS[1])["input_ids"][0].tolist()
    assert TURNS[0] not in s.tok.decode(ids)


def test_stops_at_the_end_of_turn_token(chat_dir: Path) -> None:
    s = session(chat_dir / "merged")
    im_end = s.tok.convert_tokens_to_ids("<|im_end|>")
    assert im_end in s.eos_ids


def normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_one_answer_with_prompt(chat_dir: Path) -> None:
    proc = subprocess.run(
        [bin_path("sftflow"), "chat", "--model", str(chat_dir / "merged"), "--params", str(chat_dir / "params.yaml"),
         "--sample", "--seed", "0", "--prompt", TURNS[0]],
        capture_output=True, text=True, env=os.environ.copy(), check=True,
    )
    assert normalise(proc.stdout) == normalise(expected_replies(chat_dir / "merged")[0])


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def wait_for(pane: str, pattern: str, count: int, timeout: float = 240.0) -> str:
    """The pane's text once `pattern` appears `count` times (the model loads, then replies)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        screen = tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", pane)
        if screen.count(pattern) >= count:
            return screen
        time.sleep(0.5)
    raise AssertionError(f"{pattern!r} did not appear {count} times in {timeout} s:\n{screen}")


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian: apt-get install tmux)")
def test_two_turns_in_a_real_terminal(chat_dir: Path) -> None:
    """Type two messages at the prompt in a tmux terminal, read the streamed replies off the
    screen: each equals the in-process reply with the same seed and the same history."""
    want = expected_replies(chat_dir / "merged")
    name = f"sftflow-chat-{os.getpid()}"
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH", "HF_HUB_OFFLINE") if k in os.environ)
    cmd = (f"cd {shlex.quote(str(chat_dir))} && env {env} {shlex.quote(bin_path('sftflow'))} chat --model merged"
           f" --params params.yaml --sample --seed 0; echo CHAT-ENDED-$?; sleep 30")
    tmux("new-session", "-d", "-s", name, "-x", "200", "-y", "50", cmd)
    try:
        wait_for(name, "you> ", 1)
        tmux("send-keys", "-t", name, TURNS[0], "Enter")
        wait_for(name, "you> ", 2)
        tmux("send-keys", "-t", name, TURNS[1], "Enter")
        screen = wait_for(name, "you> ", 3)
        tmux("send-keys", "-t", name, "/reset", "Enter")
        wait_for(name, "(conversation reset)", 1)
        tmux("send-keys", "-t", name, "/exit", "Enter")
        screen = wait_for(name, "CHAT-ENDED-", 1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    replies = re.findall(r"model> (.*?)\n(?=you> )", screen, flags=re.S)
    assert [normalise(r) for r in replies] == [normalise(w) for w in want], screen
    assert f"you> {TURNS[0]}" in screen and f"you> {TURNS[1]}" in screen
    assert "CHAT-ENDED-0" in screen  # /exit leaves with status 0


def test_base_and_adapter_need_each_other(chat_dir: Path) -> None:
    from stages.core.errors import SftflowError
    from stages.tools.chat import load_chat_model

    with pytest.raises(SftflowError, match="--base and --adapter together"):
        load_chat_model(None, chat_dir / "merged", None)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
