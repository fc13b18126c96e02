"""Generated image files through the image reader vision prepare and eval use, and image chats
through vision prepare: truncated, empty, huge (a header claiming 40000x40000), 1-pixel strips,
CMYK, 16-bit, palette, EXIF-rotated, paths out of the data folder, symlinks out and in loops.

Properties: a file is accepted (its size read right) or refused with file:line: field: reason,
never an exception of another kind; an intact image is never refused; an accepted image resizes
to the grid the train collator computes from its pixels, or is refused by prepare as a bad
record; prepare's report accounts for every record and the rejects name each bad one.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from stages.core.errors import SftflowError
from stages.core.image_chats import ImageReader
from stages.core.params import DataParams, SourceParams
from stages.core.vision import ImageTokens, load_processor, model_family, pixel_inputs
from tests.properties import budget, named_examples, tried
from tests.vlm import BOUNDS

# (mode, formats that store it)
MODES = {
    "RGB": ("PNG", "JPEG", "WEBP", "BMP", "TIFF"),
    "RGBA": ("PNG", "WEBP", "TIFF"),
    "L": ("PNG", "JPEG", "BMP", "TIFF"),
    "LA": ("PNG",),
    "P": ("PNG", "GIF", "BMP"),
    "1": ("PNG", "BMP", "TIFF"),
    "CMYK": ("JPEG", "TIFF"),
    "I;16": ("PNG", "TIFF"),
    "I": ("TIFF",),
    "F": ("TIFF",),
}
SIZES = st.one_of(
    st.tuples(st.integers(1, 64), st.integers(1, 64)),
    st.sampled_from([(1, 1), (1, 40000), (40000, 1), (300, 1), (1, 201), (200, 1), (3, 600)]),
)


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height over a few bytes of pixels (a decompression bomb's
    header, or a 0-pixel image)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def make_image(mode: str, fmt: str, size: tuple[int, int], orientation: int = 0, damage: str = "none", at: int = 0, junk: bytes = b"") -> tuple[bytes, tuple[int, int] | None, str]:
    """(file bytes, the size when the file is intact, what it is); `at` places a cut or a flipped byte."""
    from PIL import Image

    if damage == "claims":  # a header only: the size is what it says, the pixels are not there
        return png_claiming(*size), None, f"PNG header claiming {size[0]}x{size[1]}"
    im = Image.new(mode, size, 7)
    kwargs: dict[str, Any] = {}
    if orientation:  # EXIF orientation: the reader and the collator both use the pixels as stored
        exif = im.getexif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif
    buf = io.BytesIO()
    im.save(buf, fmt, **kwargs)
    data = buf.getvalue()
    what = f"{mode} {fmt} {size[0]}x{size[1]} {damage}"
    if damage == "none":
        return data, size, what
    if damage == "cut":
        return data[: at % len(data)], None, what
    if damage == "empty":
        return b"", None, what
    if damage == "garbage":
        return junk, None, what
    at %= len(data)
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :], None, what


@st.composite
def image_file(draw: Any) -> tuple[bytes, tuple[int, int] | None, str]:
    mode = draw(st.sampled_from(sorted(MODES)))
    fmt = draw(st.sampled_from(MODES[mode]))
    size = draw(SIZES)
    if size[0] * size[1] > 2000 and fmt != "PNG" and "PNG" in MODES[mode]:
        fmt = "PNG"  # WebP, GIF and BMP have smaller size limits than a 1x40000 strip
    damage = draw(st.sampled_from(["none", "none", "cut", "empty", "garbage", "claims", "flip"]))
    if damage == "claims":
        size = draw(st.sampled_from([(40000, 40000), (0, 10), (10, 0), (2**31 - 1, 1), (1, 40000)]))
    orientation = draw(st.integers(1, 8)) if fmt == "JPEG" and draw(st.booleans()) else 0
    return make_image(mode, fmt, size, orientation, damage, draw(st.integers(0, 1 << 16)), draw(st.binary(max_size=64)))


# the named cases run in every profile, before the generated ones
NAMED = [
    make_image("RGB", "PNG", (64, 48), damage="cut", at=300),  # a PNG cut in half
    make_image("RGB", "PNG", (1, 1), damage="empty"),  # 0 bytes
    make_image("RGB", "PNG", (1, 40000)),  # 40,000 pixels tall
    make_image("RGB", "PNG", (40000, 1)),
    make_image("RGB", "PNG", (40000, 40000), damage="claims"),  # over PIL's decompression-bomb limit
    make_image("RGB", "PNG", (0, 10), damage="claims"),  # zero-size
    make_image("CMYK", "JPEG", (30, 20)),
    make_image("I;16", "PNG", (30, 20)),  # 16-bit
    make_image("P", "PNG", (30, 20)),  # palette
    make_image("RGB", "JPEG", (30, 20), orientation=6),  # EXIF: rotated 90 degrees
]


@pytest.fixture(scope="module")
def processor(vlm_base: Path) -> Any:
    return load_processor(vlm_base, BOUNDS.min_pixels, BOUNDS.max_pixels)


@pytest.fixture(scope="module")
def image_tokens(processor: Any, vlm_base: Path) -> ImageTokens:
    return ImageTokens(processor, model_family(vlm_base))


@budget(60)
@given(image=image_file())
@named_examples("image", NAMED)
def test_image_reader_accepts_intact_images_and_names_the_rest(image: tuple, processor: Any,
                                                               image_tokens: ImageTokens) -> None:
    tried("image files")
    data, size, what = image
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "im.img").write_bytes(data)
        chats = Path(d) / "chats.jsonl"
        try:
            ref = ImageReader().read("im.img", chats, 7, "images[0]")
        except SftflowError as e:
            assert size is None, f"an intact image was refused ({what}): {e}"
            assert str(e).startswith(f"{chats}:7: images[0]: "), str(e)
            return
        if size is not None:
            assert (ref.width, ref.height) == size, what
        try:  # the image's text as prepare counts it, from its size alone
            (text,) = image_tokens.expansions([(ref.width, ref.height)])
        except ValueError:  # prepare refuses it as a bad record (test below); no train step sees it
            assert max(ref.width, ref.height) / min(ref.width, ref.height) > 200, what
            return
        pads = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert set(pads) == {processor.image_token_id}, what
        # what the train collator computes from the pixels is what prepare counted (pixel_inputs checks
        # the token count; the grid is the patches those tokens merge)
        row = {"input_ids": pads, "images": [{"path": ref.path, "size": [ref.width, ref.height]}]}
        out = pixel_inputs([row], processor, image_tokens.family)
        ((t, h, w),) = out["image_grid_thw"].tolist()
        assert t * h * w // processor.image_processor.merge_size**2 == len(pads), what
        assert out["pixel_values"].shape[0] == t * h * w, what


PATHS = st.sampled_from(
    ["ok", "ok", "ok", "../outside.png", "../../etc/passwd", "/etc/hostname", "sub/../ok.png", "link_out.png",
     "loop_a.png", "missing.png", "a\x00b.png", "x" * 300 + ".png", "https://example.com/a.png", "", "sub/"]
)


@budget(3)
@given(
    refs=st.lists(st.tuples(PATHS, image_file()), min_size=2, max_size=5),
    shape=st.sampled_from(["llamafactory", "hf_parts", "minicpmv"]),
)
def test_vision_prepare_accounts_for_every_image_chat(refs: list, shape: str, vlm_base: Path) -> None:
    tried("image chats (vision prepare)")
    from stages.prepare.shards import prepare

    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "data"
        (root / "sub").mkdir(parents=True)
        (Path(d) / "outside.png").write_bytes(b"")
        (root / "link_out.png").symlink_to(Path(d) / "outside.png")
        (root / "loop_a.png").symlink_to(root / "loop_b.png")
        (root / "loop_b.png").symlink_to(root / "loop_a.png")
        lines, valid = [], {}
        for n, (ref, (data, size, _)) in enumerate(refs, start=1):
            if ref == "ok":
                ref = f"im{n}.png"
                (root / ref).write_bytes(data)
            elif ref == "sub/../ok.png":
                ref = f"sub/../ok{n}.png"
                (root / f"ok{n}.png").write_bytes(data)
            inside = ref in (f"im{n}.png", f"sub/../ok{n}.png")
            # True: must be kept; False: must be refused; None: a damaged file that may still be an image
            if not inside or not data:
                valid[n] = False
            elif size is None:
                valid[n] = None
            else:
                valid[n] = max(size) / min(size) <= 200
            lines.append(json.dumps(chat_with_image(shape, ref)))
        raw = root / "chats.jsonl"
        raw.write_text("\n".join(lines) + "\n")
        params = DataParams(sources=(SourceParams(path=str(raw)),), image=BOUNDS, on_bad_record="skip")
        rejects_path = Path(d) / "rejects.jsonl"
        try:
            report = prepare(params, vlm_base, Path(d) / "out", rejects_path=rejects_path)
        except SftflowError as e:
            assert True not in valid.values() and "no training samples left" in str(e), str(e)
            return
        source = report["sources"][str(raw)]
        assert source["read"] == len(lines) == source["kept"] + sum(source["skipped"].values()) + sum(source["dropped"].values())
        rejects = [json.loads(x) for x in rejects_path.read_text().splitlines()]
        assert len(rejects) == len(lines) - source["kept"]
        for r in rejects:
            assert valid[r["line"]] is not True, f"a valid image chat was refused: {r}"
            if "detail" in r:
                assert r["detail"].startswith(f"{raw}:{r['line']}: "), r
        assert sum(v is True for v in valid.values()) <= source["kept"] <= sum(v is not False for v in valid.values())
        params = DataParams(sources=(SourceParams(path=str(raw)),), image=BOUNDS, on_bad_record="error")
        if rejects:
            with pytest.raises(SftflowError, match=f"^{raw}:[0-9]+: "):
                prepare(params, vlm_base, Path(d) / "out-error")


def chat_with_image(shape: str, ref: str) -> dict[str, Any]:
    if shape == "llamafactory":
        return {"conversations": [{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "A."}], "images": [ref]}
    if shape == "hf_parts":
        return {"messages": [{"role": "user", "content": [{"type": "image", "image": ref}, {"type": "text", "text": "What?"}]},
                             {"role": "assistant", "content": "A."}]}
    return {"image": ref, "conversations": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "A."}]}

