"""What the user asks to measure: the image (a file or a synthetic white page of a given size) and the
vendor's own knobs. Values derived from these (tiles, views, image tokens, prompt length) come from the
vendor's preprocessing, see `tracer.vendors`; this module only validates and holds the request."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from tracer.core.errors import FlopdiffError
from tracer.core.models import DEFAULT_MODEL

MAX_SIDE = 20_000  # px; larger pages are almost certainly a typo
MAX_PIXELS = 150_000_000  # an A0 sheet at 300 dpi is 139.5 Mpx; the decoded RGB page alone is 450 MB here
MAX_ASPECT = 100  # a page 100 times longer than wide is a typo (the vendors' resize would leave 0 px rows)
PATCH = 16  # both vendors' SAM patch size; the two stride-2 convs of the neck leave size / 64 features a side
MIN_VIEW = 64


@dataclass(frozen=True)
class Workload:
    """One request. `None` for a knob means "the vendor's default" (read from its processor)."""

    model: str = DEFAULT_MODEL
    image_wh: tuple[int, int] = (1000, 1400)
    image_path: str | None = None
    base_size: int | None = None
    tile_size: int | None = None
    crop_mode: bool = True
    text_tokens: int | None = None
    prompt: str | None = None
    tokenizer: str | None = None
    decode_steps: int = 1
    # how reports name the image when `image_path` is flopdiff's copy of a pipe (tracer.core.inputs); never in a cache key
    image_label: str | None = None

    @property
    def image_name(self) -> str | None:
        """The image as the user named it."""
        return self.image_label or self.image_path


def parse_image_shape(text: str) -> tuple[int, int]:
    """'1000x1400' -> (1000, 1400): width x height in pixels."""
    m = re.fullmatch(r"\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*", text)
    if not m:
        raise FlopdiffError(f"--image-shape {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1000x1400")
    return check_image_wh((int(m.group(1)), int(m.group(2))), f"--image-shape {text}")


def check_image_wh(wh: tuple[int, int], what: str) -> tuple[int, int]:
    """The one rule for page sizes, given as a shape or read from a file's header."""
    w, h = wh
    if w <= 0 or h <= 0:
        raise FlopdiffError(f"{what}: width and height must be positive (got {w}x{h})")
    if w > MAX_SIDE or h > MAX_SIDE or w * h > MAX_PIXELS:
        raise FlopdiffError(f"{what}: {w}x{h} exceeds {MAX_SIDE} px on a side or {MAX_PIXELS // 1_000_000} Mpx "
                            f"(an A0 sheet at 300 dpi is 140 Mpx); give the real page size")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise FlopdiffError(f"{what}: {w}x{h} is more than {MAX_ASPECT} times longer than wide; give the real page "
                            f"size")
    return w, h


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp", ".gif")
EXIF_ORIENTATION = 0x0112
TRANSPOSED = {5, 6, 7, 8}  # EXIF orientations that turn the stored image by 90 degrees: width and height swap


@contextmanager
def _opened(path: str | Path, what: str) -> Iterator[Any]:
    """The file opened by PIL, with flopdiff's size limit in place of PIL's decompression-bomb check (which raises at
    179 Mpx and warns from 89 Mpx); any reading failure is one FlopdiffError naming `what`."""
    from PIL import Image

    if not Path(path).exists():
        raise FlopdiffError(f"{what}: no such file")
    if Path(path).is_dir():
        raise FlopdiffError(f"{what}: is a folder; give an image file")
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings(), Image.open(path) as im:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield im
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # SyntaxError: PIL's parsers
        raise FlopdiffError(f"{what}: cannot read it as an image ({exc.__class__.__name__}: {exc})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _png_exif(path: str | Path) -> bytes | None:
    """A PNG's eXIf chunk, wherever it is (after the image data too, where PIL finds it only by decoding the whole
    image: 3 ms a page, 96% of a 2,000-page sweep's header reads), by walking the chunk headers."""
    with open(path, "rb") as f:
        f.seek(8)  # the signature
        while header := f.read(8):
            if len(header) < 8:
                return None
            length, kind = int.from_bytes(header[:4], "big"), header[4:]
            if kind == b"eXIf":
                return b"Exif\x00\x00" + f.read(length)  # as PIL's own PNG reader stores it
            if kind == b"IEND":
                return None
            f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return None


def _upright(im: Any, path: str | Path) -> tuple[int, int]:
    """The size of the page as the vendors load it: both apply EXIF orientation (PIL's `exif_transpose`: v1's
    `load_image`, transformers' `load_image`), so an orientation-6 photo stored 1000x1400 is a 1400x1000 page."""
    from PIL import Image

    if im.format == "PNG" and "exif" not in im.info:  # PIL would decode the image to look past its data
        exif = Image.Exif()
        if (data := _png_exif(path)) is not None:
            exif.load(data)
    else:
        exif = im.getexif()
    w, h = im.size
    return (h, w) if exif.get(EXIF_ORIENTATION) in TRANSPOSED else (w, h)


def image_size(path: str | Path, what: str) -> tuple[int, int]:
    """A file's page size from its header (nothing decoded; EXIF orientation applied), checked like any page size;
    `what` names the input."""
    with _opened(path, what) as im:
        size = _upright(im, path)
    return check_image_wh(size, what)


def load_image(workload: Workload) -> Any:
    """The PIL image the vendor preprocessing receives: the user's file upright (EXIF orientation applied, as the
    vendors' own loaders do) in RGB, or a white RGB page. A file's size is checked from its header, before
    decoding."""
    from PIL import Image, ImageOps

    if workload.image_path is None:
        return Image.new("RGB", workload.image_wh, (255, 255, 255))
    what = f"--image {workload.image_name}"
    with _opened(workload.image_path, what) as im:
        check_image_wh(_upright(im, workload.image_path), what)
        return ImageOps.exif_transpose(im).convert("RGB")


# the type each field must hold (the Python API gets no argparse): (types, what it must be); None always allowed
# where the default is None
TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "model": ((str,), "a model name"), "image_path": ((str,), "a path"), "base_size": ((int,), "an integer"),
    "tile_size": ((int,), "an integer"), "crop_mode": ((bool,), "True or False"),
    "text_tokens": ((int,), "an integer"), "prompt": ((str,), "a string"), "tokenizer": ((str,), "a path"),
    "decode_steps": ((int,), "an integer"), "image_label": ((str,), "a string"),
}
FLAGS = {"image_path": "--image", "image_wh": "--image-shape"}  # a field's flag when it is not --field-name


def _flag(name: str) -> str:
    return FLAGS.get(name, "--" + name.replace("_", "-"))


def _typed(workload: Workload) -> Workload:
    """Paths given as os.PathLike become strings; any other value of the wrong type is a FlopdiffError naming the
    parameter and its flag (a float step count failed 64 frames down in torch, a Path deep in a vendor)."""
    paths = {k: os.fspath(getattr(workload, k)) for k in ("image_path", "tokenizer")
             if isinstance(getattr(workload, k), os.PathLike)}
    if isinstance(workload.image_wh, list):
        paths["image_wh"] = tuple(workload.image_wh)
    workload = replace(workload, **paths) if paths else workload
    for f in fields(workload):
        value = getattr(workload, f.name)
        if f.name == "image_wh":
            ok = (isinstance(value, tuple) and len(value) == 2 and all(type(v) is int for v in value))
            kinds = "(width, height) in integers"
        else:
            types, kinds = TYPES[f.name]
            ok = (value is None and f.default is None) or (
                isinstance(value, types) and (bool in types or not isinstance(value, bool)))
        if not ok:
            raise FlopdiffError(f"Workload.{f.name} = {value!r} ({_flag(f.name)}): must be {kinds}")
    return workload


def validate(workload: Workload) -> Workload:
    """Reject knobs no vendor accepts, naming the flag; returns the workload (with the image file's upright size,
    read from its header, as `image_wh`)."""
    workload = _typed(workload)
    if workload.decode_steps < 0:
        raise FlopdiffError(f"--decode-steps {workload.decode_steps}: must be 0 or more")
    if workload.text_tokens is not None and workload.text_tokens < 0:
        raise FlopdiffError(f"--text-tokens {workload.text_tokens}: must be 0 or more")
    for flag, value in (("--base-size", workload.base_size), ("--tile-size", workload.tile_size)):
        if value is not None and not (MIN_VIEW <= value <= MAX_SIDE and value % PATCH == 0):
            raise FlopdiffError(f"{flag} {value}: must be a multiple of the patch size {PATCH} between {MIN_VIEW} and "
                                f"{MAX_SIDE} px (the vendors' modes use 512, 640, 768, 1024, 1280)")
    if workload.tokenizer is not None:
        if not Path(workload.tokenizer).exists():  # never a hub id: a typo must not send a request
            raise FlopdiffError(f"--tokenizer {workload.tokenizer}: no such file or folder (a local tokenizer folder "
                                f"or tokenizer.json)")
        if workload.text_tokens is not None:
            raise FlopdiffError(f"--text-tokens {workload.text_tokens}: give either --text-tokens or --tokenizer "
                                f"(which counts the --prompt's tokens), not both")
    elif workload.prompt is not None:
        raise FlopdiffError("--prompt: needs --tokenizer to count its tokens (or give the count with --text-tokens)")
    if workload.image_path is None:
        check_image_wh(workload.image_wh, "--image-shape")
        return workload
    return replace(workload, image_wh=image_size(workload.image_path, f"--image {workload.image_name}"))


@dataclass(frozen=True)
class Derived:
    """What the vendor's preprocessing made of the workload (reported as-is in report.json)."""

    image_wh: tuple[int, int]
    base_size: int
    tile_size: int
    views: int
    crop_grid_wh: tuple[int, int]
    image_tokens: int
    prompt_len: int
    extra: dict = field(default_factory=dict)
