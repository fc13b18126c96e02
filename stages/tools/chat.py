"""`sftflow chat`: talk to the tuned model, with its own chat template and the training system prompt.

The prompt of every turn is the whole conversation rendered by the model's chat template,
with `data.system_prompt` put first exactly as prepare put it into the training chats, and the
generation prompt added: what the model saw in training before each reply. Replies stop at the
template's end-of-turn token and are streamed token by token (`TextIteratorStreamer`, with
`generate` in a worker thread). Generation settings default to the eval section's, so what
you read here is what eval scored.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.core.chats import with_system_prompt
from stages.core.errors import SftflowError
from stages.core.params import EvalParams

RESET, EXIT = "/reset", "/exit"


@dataclass(frozen=True)
class GenerationSettings:
    """How replies are decoded: eval's settings unless a flag overrides one."""

    max_new_tokens: int = EvalParams.max_new_tokens
    do_sample: bool = EvalParams.do_sample
    temperature: float = EvalParams.temperature
    top_p: float = EvalParams.top_p

    @classmethod
    def from_eval(cls, params: EvalParams, **overrides: Any) -> GenerationSettings:
        """eval's settings with the non-None overrides on top.

        >>> GenerationSettings.from_eval(EvalParams(max_new_tokens=40), temperature=None)
        GenerationSettings(max_new_tokens=40, do_sample=False, temperature=1.0, top_p=1.0)
        >>> GenerationSettings.from_eval(EvalParams(), temperature=0.7).do_sample  # a temperature samples
        True
        """
        values = {
            "max_new_tokens": params.max_new_tokens,
            "do_sample": params.do_sample,
            "temperature": params.temperature,
            "top_p": params.top_p,
        }
        values |= {k: v for k, v in overrides.items() if v is not None}
        if overrides.get("do_sample") is None and any(overrides.get(k) is not None for k in ("temperature", "top_p")):
            values["do_sample"] = True  # asking for a temperature or top_p means sampling
        return cls(**values)

    def generate_kwargs(self) -> dict[str, Any]:
        if not self.do_sample:
            return {"max_new_tokens": self.max_new_tokens, "do_sample": False}
        return {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
        }


def load_chat_model(
    model_dir: Path | None, base_dir: Path | None, adapter_dir: Path | None, device: str = "auto"
) -> tuple[Any, Any]:
    """(model, tokenizer): a merged folder, or a base with a PEFT adapter applied (not merged).

    The tokenizer comes from the merged folder or the adapter folder (train saves the one it
    trained with there), so the chat template is the training one.
    """
    from stages.core.devices import choose_placement, detect_hardware
    from stages.core.loading import load_causal_lm, load_tokenizer

    if (base_dir is None) != (adapter_dir is None):
        raise SftflowError("give --base and --adapter together (or --model for a merged folder)")
    placement = choose_placement("chat", detect_hardware(), device)
    if adapter_dir is not None and base_dir is not None:
        for d in (base_dir, adapter_dir):
            if not Path(d).is_dir():
                raise SftflowError("not a folder", path=d)
        from peft import PeftModel

        base = load_causal_lm(base_dir, placement.dtype, **placement.load_kwargs())
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        tok_dir = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_dir
    else:
        assert model_dir is not None
        if not Path(model_dir).is_dir():
            raise SftflowError("model folder not found (run `dvc repro` first, or pass --model)", path=model_dir)
        model = load_causal_lm(model_dir, placement.dtype, **placement.load_kwargs())
        tok_dir = model_dir
    model.eval()
    return model, load_tokenizer(tok_dir)


@dataclass
class ChatSession:
    """One conversation: the history, and replies streamed from the model."""

    model: Any
    tok: Any
    system_prompt: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    history: list[dict[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        from stages.core.turns import end_of_turn

        self.stop = end_of_turn(self.tok)
        ids = self.tok.encode(self.stop, add_special_tokens=False)
        eos = self.model.generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        # generate stops at the template's end of turn even when the model's config names only eos
        self.eos_ids = eos + [i for i in ids[:1] if len(ids) == 1 and i not in eos]

    def reset(self) -> None:
        self.history = []

    def prompt_ids(self, user_text: str) -> Any:
        """The token ids generate continues: the conversation so far plus this turn, templated."""
        messages = with_system_prompt([*self.history, {"role": "user", "content": user_text}], self.system_prompt)
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # the rendered text already holds the template's BOS (if any): add no second one
        return self.tok(text, return_tensors="pt", add_special_tokens=False)

    def stream(self, user_text: str) -> Iterator[str]:
        """Yield the reply's text piece by piece as it is decoded; the turn then joins the history."""
        import torch
        from transformers import TextIteratorStreamer

        from stages.core.devices import input_device

        inputs = self.prompt_ids(user_text).to(input_device(self.model))
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = {
            **inputs,
            **self.settings.generate_kwargs(),
            "streamer": streamer,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.tok.pad_token_id,
        }
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**kwargs)
            except BaseException as e:  # re-raised in the caller's thread, after the streamer ends
                failure.append(e)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        worker.join()
        if failure:
            raise failure[0]
        reply = "".join(pieces).strip()
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": reply}]

    def reply(self, user_text: str, on_piece: Callable[[str], None] = lambda _: None) -> str:
        """The whole reply (each piece also handed to on_piece as it arrives)."""
        for piece in self.stream(user_text):
            on_piece(piece)
        return self.history[-1]["content"]


def repl(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None]) -> int:
    """The interactive loop: read a line, stream the reply; /reset forgets, /exit or EOF ends.

    Returns how many turns were answered."""
    turns = 0
    write(f"sftflow chat: {RESET} forgets the conversation, {EXIT} (or Ctrl-D) ends it.\n")
    while True:
        try:
            line = read("you> ").strip()
        except EOFError:
            write("\n")
            return turns
        if not line:
            continue
        if line == EXIT:
            return turns
        if line == RESET:
            session.reset()
            write("(conversation reset)\n")
            continue
        write("model> ")
        for piece in session.stream(line):
            write(piece)
        write("\n")
        turns += 1
