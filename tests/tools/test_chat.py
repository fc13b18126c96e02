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


VLM_TURNS = ["What colour is it?", "And this one?", "Say something."]


@pytest.fixture(scope="module")
def vlm_chat_dir(vlm_base: Path, images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A merged tiny Qwen2.5-VL (one LoRA + projector step on image chats, merged by the merge
    stage), its adapter, two images and a params.yaml with training's image bounds."""
    import shutil as sh

    from stages.core.params import MergeParams
    from stages.merge.fold import merge
    from stages.train.trainer import train
    from tests.vlm import BOUNDS, chats_in_each_shape, prepare_rows, train_params

    root = tmp_path_factory.mktemp("vlm_chat")
    record = chats_in_each_shape(str(images))
    prepare_rows(root / "p", vlm_base, [record["llamafactory"], record["hf_parts"]] * 2, eval_fraction=0.25)
    params = train_params(max_steps=1, batch_size=2, save_steps=0, report_to=[], vision={"tune_projector": True})
    train(params, vlm_base, root / "p" / "out", root / "adapter", root / "ckpt", root / "loss.csv")
    merge(MergeParams(), vlm_base, root / "adapter", root / "p" / "out", root / "merged")
    for name in ("wide.png", "small.png"):
        sh.copy(images / name, root / name)
    image = {"min_pixels": BOUNDS.min_pixels, "max_pixels": BOUNDS.max_pixels}
    (root / "params.yaml").write_text(json.dumps({"data": {"image": image}, "eval": {"max_new_tokens": 6}}))
    return root


def vlm_session(root: Path, seed: int | None = 0, base: Path | None = None) -> Any:
    from transformers import set_seed

    from stages.tools.chat import ChatSession, GenerationSettings, load_chat_images, load_chat_model
    from tests.vlm import BOUNDS

    model_dir, adapter = (None, root / "adapter") if base else (root / "merged", None)
    model, tok = load_chat_model(model_dir, base, adapter)
    processor = load_chat_images([adapter, base or model_dir], BOUNDS.min_pixels, BOUNDS.max_pixels)
    if seed is not None:
        set_seed(seed)
    return ChatSession(model, tok, None, GenerationSettings(max_new_tokens=6, do_sample=True), image_processor=processor)


def test_vlm_turn_carries_its_images(vlm_chat_dir: Path) -> None:
    """A merged VLM loads with its image-text-to-text class and processor; a turn with an image
    puts the template's image slot, expanded to the image's token count, and the pixels into the
    prompt; the image stays in the history; the first reply token depends on the pixels."""
    import torch

    from tests.vlm import PAD

    s = vlm_session(vlm_chat_dir)
    assert type(s.model).__name__ == "Qwen2_5_VLForConditionalGeneration" and s.image_processor is not None
    wide, small = str(vlm_chat_dir / "wide.png"), str(vlm_chat_dir / "small.png")
    inputs = s.prompt_ids(VLM_TURNS[0], [wide])
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(PAD) == 8 and inputs["image_grid_thw"].tolist() == [[1, 4, 8]]  # 100x60 -> 112x56
    assert torch.equal(inputs["mm_token_type_ids"][0], (inputs["input_ids"][0] == PAD).int())
    pieces: list[str] = []
    first = s.reply(VLM_TURNS[0], pieces.append, images=[wide])
    assert "".join(pieces).strip() == first and len([p for p in pieces if p]) > 1
    inputs = s.prompt_ids(VLM_TURNS[1], [small])  # the first turn's image is still in the prompt
    assert inputs["input_ids"][0].tolist().count(PAD) == 8 + 4 and inputs["image_grid_thw"].tolist() == [[1, 4, 8], [1, 4, 4]]
    assert first in s.tok.decode(inputs["input_ids"][0])
    with torch.no_grad():
        seen = s.model(**s.prompt_ids(VLM_TURNS[0], [wide])).logits[0, -1]
        blind = s.model(**s.prompt_ids(VLM_TURNS[0], [small])).logits[0, -1]
    assert not torch.allclose(seen, blind)
    s.reset()
    text_only = s.prompt_ids(VLM_TURNS[2])
    assert set(text_only) == {"input_ids", "attention_mask", "mm_token_type_ids"} and PAD not in text_only["input_ids"][0]


def test_vlm_base_and_adapter_chat_with_images(vlm_chat_dir: Path, vlm_base: Path) -> None:
    s = vlm_session(vlm_chat_dir, base=vlm_base)
    assert type(s.model.get_base_model()).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert s.image_processor is not None
    assert s.reply(VLM_TURNS[0], images=[str(vlm_chat_dir / "wide.png")])


def test_images_are_checked(vlm_chat_dir: Path, chat_dir: Path, images: Path) -> None:
    """A missing or unreadable image, or an image for a text model: a clear error, no traceback,
    before any model loads."""
    base = [bin_path("sftflow"), "chat", "--prompt", "hi"]
    cases = [
        (["--model", str(vlm_chat_dir / "merged"), "--image", str(vlm_chat_dir / "nope.png")], "nope.png: image file not found"),
        (["--model", str(vlm_chat_dir / "merged"), "--image", str(images / "notes.png")], "notes.png: not a readable image"),
        (["--model", str(chat_dir / "merged"), "--image", str(vlm_chat_dir / "wide.png")], "--image: this model reads no images"),
    ]
    for args, message in cases:
        proc = subprocess.run([*base, *args], capture_output=True, text=True, env=os.environ.copy())
        assert proc.returncode != 0 and message in proc.stderr + proc.stdout, (args, proc.stderr)
        assert "Traceback" not in proc.stderr


def expected_vlm_replies(root: Path) -> list[str]:
    s = vlm_session(root)
    first = s.reply(VLM_TURNS[0], images=[str(root / "wide.png")])
    second = s.reply(VLM_TURNS[1], images=[str(root / "small.png")])
    s.reset()
    return [first, second, s.reply(VLM_TURNS[2])]


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (Debian: apt-get install tmux)")
def test_vlm_with_images_in_a_real_terminal(vlm_chat_dir: Path) -> None:
    """In a tmux terminal: `--image` on the first turn, `/image PATH` for the second, a missing
    image (an error line, the chat goes on), /reset, a text-only turn; the streamed replies read
    off the screen equal the in-process ones with the same seed, images and history."""
    want = expected_vlm_replies(vlm_chat_dir)
    name = f"sftflow-vlm-chat-{os.getpid()}"
    env = " ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ("PYTHONPATH", "HF_HUB_OFFLINE") if k in os.environ)
    cmd = (f"cd {shlex.quote(str(vlm_chat_dir))} && env {env} {shlex.quote(bin_path('sftflow'))} chat --model merged"
           f" --params params.yaml --sample --seed 0 --image wide.png; echo CHAT-ENDED-$?; sleep 30")
    tmux("new-session", "-d", "-s", name, "-x", "200", "-y", "50", cmd)
    try:
        wait_for(name, "you> ", 1)
        tmux("send-keys", "-t", name, VLM_TURNS[0], "Enter")
        wait_for(name, "you> ", 2)
        tmux("send-keys", "-t", name, "/image small.png", "Enter")
        wait_for(name, "(image attached to your next message: small.png)", 1)
        tmux("send-keys", "-t", name, VLM_TURNS[1], "Enter")
        wait_for(name, "you> ", 4)
        tmux("send-keys", "-t", name, "/image missing.png", "Enter")
        wait_for(name, "error: missing.png: image file not found", 1)
        tmux("send-keys", "-t", name, "/reset", "Enter")
        wait_for(name, "(conversation reset)", 1)
        tmux("send-keys", "-t", name, VLM_TURNS[2], "Enter")
        wait_for(name, "you> ", 7)
        tmux("send-keys", "-t", name, "/exit", "Enter")
        screen = wait_for(name, "CHAT-ENDED-", 1)
    finally:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)
    assert "/image PATH attaches an image" in screen
    replies = re.findall(r"model> (.*?)\n(?=you> )", screen, flags=re.S)
    assert [normalise(r) for r in replies] == [normalise(w) for w in want], screen
    assert "CHAT-ENDED-0" in screen and "Traceback" not in screen


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
