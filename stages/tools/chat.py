"""`sftflow chat`: talk to the tuned model, with its own chat template and the training system prompt.

The prompt of every turn is the whole conversation rendered by the model's chat template,
with `data.system_prompt` put first exactly as prepare put it into the training chats, and the
generation prompt added: what the model saw in training before each reply. Replies stop at the
template's end-of-turn token and are streamed token by token (`TextIteratorStreamer`, with
`generate` in a worker thread). Generation settings default to the eval section's, so what
you read here is what eval scored.

A vision-language model (any family in stages/core/vlm_families.py: base, merged, or base +
adapter) loads with its image-text-to-text class and its processor, resizing as in training.
Images join a turn as content parts before its text — `--image PATH` (repeatable) for the first
turn, `/image PATH` in the loop for the next one — and stay in the history, so later turns still
see them: each prompt carries the pixels of every image in the conversation so far, with the
template's placeholder per image replaced by the processor's text for that image. Text-only turns
on a VLM need no image.
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

RESET, EXIT, IMAGE = "/reset", "/exit", "/image"


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
    from stages.core.vision import is_vision_model, load_vlm

    if (base_dir is None) != (adapter_dir is None):
        raise SftflowError("give --base and --adapter together (or --model for a merged folder)")
    placement = choose_placement("chat", detect_hardware(), device)
    load = load_vlm if is_vision_model(Path(base_dir or model_dir or ".")) else load_causal_lm
    if adapter_dir is not None and base_dir is not None:
        for d in (base_dir, adapter_dir):
            if not Path(d).is_dir():
                raise SftflowError("not a folder", path=d)
        from peft import PeftModel

        from stages.core.integrity import verify_dir

        verify_dir(Path(adapter_dir))
        base = load(base_dir, placement.dtype, **placement.load_kwargs())
        model = PeftModel.from_pretrained(base, str(adapter_dir))
        tok_dir = adapter_dir if (Path(adapter_dir) / "tokenizer_config.json").exists() else base_dir
    else:
        assert model_dir is not None
        if not Path(model_dir).is_dir():
            raise SftflowError("model folder not found (run `dvc repro` first, or pass --model)", path=model_dir)
        model = load(model_dir, placement.dtype, **placement.load_kwargs())
        tok_dir = model_dir
    model.eval()
    return model, load_tokenizer(tok_dir)


def load_chat_images(folders: list[Path | None], min_pixels: int | None, max_pixels: int | None) -> Any:
    """The processor of a VLM (from the first of `folders` holding one, else the model's own),
    resizing within data.image's bounds as training did; None for a text model. The last
    folder is the model's own (merged, or the base under an adapter)."""
    from stages.core.vision import is_vision_model, load_processor, model_family

    dirs = [Path(d) for d in folders if d is not None]
    if not dirs or not is_vision_model(dirs[-1]):
        return None
    saved = any((dirs[0] / f).is_file() for f in ("processor_config.json", "preprocessor_config.json"))
    if saved and dirs[0] != dirs[-1]:  # an adapter's processor (transformers 5 saves processor_config.json)
        from transformers import AutoProcessor

        from stages.core.loading import trust_remote_code

        processor = AutoProcessor.from_pretrained(str(dirs[0]), trust_remote_code=trust_remote_code(dirs[-1]))
        if model_family(dirs[-1]).pixel_bounds and (min_pixels or max_pixels):
            processor.image_processor.size = {"shortest_edge": min_pixels or processor.image_processor.size["shortest_edge"],
                                              "longest_edge": max_pixels or processor.image_processor.size["longest_edge"]}
        return processor
    return load_processor(dirs[-1], min_pixels, max_pixels)


def check_image(path: str | Path) -> str:
    """The path of a readable image file, or a SftflowError naming what is wrong with it."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path).expanduser()
    if not p.is_file():
        raise SftflowError("image file not found", path=p)
    try:
        with Image.open(p) as im:
            im.load()
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise SftflowError(f"not a readable image: {e}", path=p) from None
    return str(p)


def user_message(text: str, images: list[str]) -> dict[str, Any]:
    """A user turn: plain text, or the images as content parts before the text.

    >>> user_message("Hi", [])
    {'role': 'user', 'content': 'Hi'}
    >>> user_message("What colour?", ["a.png"])["content"]
    [{'type': 'image', 'image': 'a.png'}, {'type': 'text', 'text': 'What colour?'}]
    """
    if not images:
        return {"role": "user", "content": text}
    return {"role": "user", "content": [*({"type": "image", "image": p} for p in images), {"type": "text", "text": text}]}


def message_images(messages: list[dict[str, Any]]) -> list[str]:
    """The image paths of a conversation, in the order the template renders them.

    >>> message_images([user_message("a", ["x.png", "y.png"]), {"role": "assistant", "content": "b"},
    ...                 user_message("c", ["z.png"])])
    ['x.png', 'y.png', 'z.png']
    """
    return [part["image"] for m in messages if not isinstance(m["content"], str)
            for part in m["content"] if part.get("type") == "image"]


@dataclass
class ChatSession:
    """One conversation: the history, and replies streamed from the model.

    `image_processor` is set for a vision-language model (`load_chat_images`): turns may then
    carry images."""

    model: Any
    tok: Any
    system_prompt: str | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)
    history: list[dict[str, Any]] = field(default_factory=list)
    image_processor: Any = None

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

    def prompt_ids(self, user_text: str, images: list[str] | None = None) -> Any:
        """The inputs generate continues: the conversation so far plus this turn, templated; for
        a VLM also the pixels and grids of every image in it, and `mm_token_type_ids`."""
        images = [check_image(p) for p in images or []]
        if images and self.image_processor is None:
            kind = getattr(self.model.config, "model_type", "?")
            raise SftflowError(f"this model ({kind}) reads no images: chat with a vision-language model's folder",
                               field="--image")
        messages = with_system_prompt([*self.history, user_message(user_text, images)], self.system_prompt)
        text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        paths = message_images(messages)
        if not paths and self.image_processor is None:
            return self.tok(text, return_tensors="pt", add_special_tokens=False)
        from PIL import Image

        from stages.core.vision import ImageTokens, VisionCollator
        from stages.core.vlm_families import family_of

        family = family_of(self.model.config.to_dict())
        sizes = []
        for p in paths:
            with Image.open(p) as im:
                sizes.append((im.width, im.height))
        text = ImageTokens(self.image_processor, family).expand(text, sizes)[0]
        # the rendered text already holds the template's BOS (if any): add no second one
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        images = [{"path": p, "size": list(s)} for p, s in zip(paths, sizes)]
        batch = VisionCollator(self.image_processor, family, self.tok.pad_token_id, packing=False)(
            [{"input_ids": ids, "labels": ids, "images": images}]
        )
        batch.pop("labels")
        return batch

    def stream(self, user_text: str, images: list[str] | None = None) -> Iterator[str]:
        """Yield the reply's text piece by piece as it is decoded; the turn (with its images)
        then joins the history."""
        import torch
        from transformers import TextIteratorStreamer

        from stages.core.devices import input_device

        images = [check_image(p) for p in images or []]
        device = input_device(self.model)
        inputs = {k: v.to(device) for k, v in self.prompt_ids(user_text, images).items()}
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
        self.history += [user_message(user_text, images), {"role": "assistant", "content": reply}]

    def reply(self, user_text: str, on_piece: Callable[[str], None] = lambda _: None,
              images: list[str] | None = None) -> str:
        """The whole reply (each piece also handed to on_piece as it arrives)."""
        for piece in self.stream(user_text, images):
            on_piece(piece)
        return self.history[-1]["content"]


def repl(session: ChatSession, read: Callable[[str], str], write: Callable[[str], None],
         images: list[str] | None = None) -> int:
    """The interactive loop: read a line, stream the reply; /reset forgets, /exit or EOF ends;
    on a VLM `/image PATH` attaches an image to the next message (`images`: to the first).

    Returns how many turns were answered."""
    turns = 0
    pending = list(images or [])
    extra = f", {IMAGE} PATH attaches an image to your next message" if session.image_processor is not None else ""
    write(f"sftflow chat: {RESET} forgets the conversation, {EXIT} (or Ctrl-D) ends it{extra}.\n")
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
            pending = []
            write("(conversation reset)\n")
            continue
        if line == IMAGE or line.startswith(IMAGE + " "):
            try:
                if session.image_processor is None:
                    raise SftflowError("this model reads no images", field=IMAGE)
                given = line[len(IMAGE):].strip().strip("'\"")
                if not given:
                    raise SftflowError("give the image's path", field=f"{IMAGE} PATH")
                path = check_image(given)
            except SftflowError as e:
                write(f"error: {e}\n")
                continue
            pending.append(path)
            write(f"(image attached to your next message: {path})\n")
            continue
        write("model> ")
        for piece in session.stream(line, pending):
            write(piece)
        write("\n")
        pending = []
        turns += 1
