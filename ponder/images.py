"""Images in events: camera frames and thermal snapshots, parsed once at decode.

An image field's value may be a data URL (`data:image/png;base64,...`), bare base64 of a PNG,
JPEG or WebP file, or a path to such a file inside one of the pipeline's `allowed_dirs` (its
symlinks and `..` resolved first, so no spelling of a path leaves them). Anything else, and any
image Pillow cannot decode in full, or larger than `max_bytes` or `max_pixels`, is refused with
an `ImageError` naming why: the decoder makes that record a dead letter.

A parsed `Image` keeps its bytes for the one request its event may become, and in the payload
its field is replaced by `Image.ref` (`image sha256:1a2b3c4d5e6f 64x48 png`), so pixels never
reach a key's context, the state store or a trace.

Near-identical frames. `Image.fingerprint` is the frame shrunk to 8x8 grey cells (box filter,
64 bytes, 0-255 each); two frames are near-identical at `threshold` when no cell differs by
more than `threshold` grey levels. Averaging over a cell (an 8x6-pixel block of a 64x48 frame)
takes out sensor noise, and the maximum over cells keeps a small change (a hot spot, an
object entering) visible, which a perceptual hash's bits over a flat scene do not promise.

>>> import base64, io
>>> from PIL import Image as P
>>> buf = io.BytesIO(); P.new("RGB", (64, 48), (40, 40, 40)).save(buf, "PNG")
>>> img = parse_image(base64.b64encode(buf.getvalue()).decode(), field="frame", allowed_dirs=(), max_bytes=10_000)
>>> img.ref.split()[2:], img.mime, img.near(img.fingerprint, 0)
(['64x48', 'png'], 'image/png', True)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import msgspec

__all__ = ["FINGERPRINT_SIDE", "MIMES", "Image", "ImageError", "ImagePolicy", "fingerprint_distance", "parse_image"]

# Pillow format -> MIME type: the only formats accepted (decoders that are common and
# maintained; GIF, BMP, TIFF and the rest are refused)
MIMES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
FINGERPRINT_SIDE = 8  # the fingerprint is FINGERPRINT_SIDE x FINGERPRINT_SIDE grey cells
MAX_FIELDS = 8  # image fields a pipeline may declare: each costs its key a frame memo
_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
# the first base64 characters of each accepted format's signature: bare base64 is told
# from a path by them (a JPEG's base64 starts with "/", like an absolute path)
_SIGNATURES = ("iVBORw0KGgo", "/9j/", "UklGR")
_REASON_VALUE = 160  # characters of a refused value a reason quotes (a path, a data URL's head)


class ImageError(ValueError):
    """An image field's value that cannot be an Image; the message says why."""


class Image(msgspec.Struct, frozen=True):
    """One decoded, validated image of an event.

    :param field: the event field it came from.
    :param mime: image/png, image/jpeg or image/webp (what the bytes are, not what a data URL
        claimed).
    :param data: the encoded file, as received.
    :param digest: sha256 of `data`, hex.
    :param fingerprint: 8x8 grey cells of the image (see the module docstring).
    """

    field: str
    mime: str
    data: bytes
    digest: str
    width: int
    height: int
    fingerprint: bytes = b""

    def __repr__(self) -> str:  # never the bytes: an event's repr lands in logs
        return f"Image({self.field!r}, {self.ref!r})"

    @property
    def ref(self) -> str:
        """What stands for the image in a payload, a context and a trace."""
        return f"image sha256:{self.digest[:12]} {self.width}x{self.height} {self.mime.split('/')[1]}"

    def data_url(self) -> str:
        return f"data:{self.mime};base64,{base64.b64encode(self.data).decode('ascii')}"

    def distance(self, other_fingerprint: bytes) -> int:
        """The largest grey-level difference of one cell between the two fingerprints (255
        when they cannot be compared)."""
        return fingerprint_distance(self.fingerprint, other_fingerprint)

    def near(self, other_fingerprint: bytes, threshold: int) -> bool:
        """Whether a frame with `other_fingerprint` is near-identical to this one."""
        return self.distance(other_fingerprint) <= threshold


def fingerprint_distance(a: bytes, b: bytes) -> int:
    """The largest grey-level difference of one cell (255: not comparable, as far apart as can be)."""
    if len(a) != FINGERPRINT_SIDE**2 or len(a) != len(b):
        return 255
    return max(abs(x - y) for x, y in zip(a, b))


@dataclass(frozen=True)
class ImagePolicy:
    """Which event fields carry images, and what an image may be.

    :param fields: event fields whose values are images.
    :param allowed_dirs: directories a path value may point into (after resolving symlinks and
        `..`); empty: no path is accepted.
    :param max_bytes: largest encoded image accepted.
    :param max_pixels: largest width x height accepted (checked before decoding).
    :param near_identical: grey levels (0-255) within which a key's frame counts as unchanged
        against the frame that began the run (see the module docstring); None: only a
        byte-identical frame does.
    :param tiers: tiers a decision's images may be sent to; None: every tier the privacy policy
        lets the event's data reach (as for its text). A tier left out gets the request
        without them, and the decision's trace says so.
    """

    fields: tuple[str, ...]
    allowed_dirs: tuple[str, ...] = ()
    max_bytes: int = 1_000_000
    max_pixels: int = 4_000_000
    near_identical: int | None = None
    tiers: tuple[str, ...] | None = None

    def problem(self) -> str | None:
        """What is wrong with the policy, naming its field; None when nothing is."""
        if not isinstance(self.fields, tuple) or not self.fields or not all(isinstance(f, str) and f for f in self.fields):
            return f"images.fields must be a non-empty tuple of field names, got {self.fields!r}"
        if len(set(self.fields)) != len(self.fields) or len(self.fields) > MAX_FIELDS:
            return f"images.fields must be unique and at most {MAX_FIELDS}, got {self.fields!r}"
        if not isinstance(self.allowed_dirs, tuple) or not all(isinstance(d, str) and d for d in self.allowed_dirs):
            return f"images.allowed_dirs must be a tuple of directory paths, got {self.allowed_dirs!r}"
        for d in self.allowed_dirs:
            if not os.path.isdir(d):
                return f"images.allowed_dirs: {d!r} is not a directory"
        for name in ("max_bytes", "max_pixels"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                return f"images.{name} must be an int >= 1, got {v!r}"
        t = self.near_identical
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or not 0 <= t <= 255):
            return f"images.near_identical must be None or an int of grey levels in [0, 255], got {t!r}"
        if self.tiers is not None and not (isinstance(self.tiers, tuple) and all(isinstance(x, str) for x in self.tiers)):
            return f"images.tiers must be None or a tuple of tier names, got {self.tiers!r}"
        return None

    @cached_property
    def resolved_dirs(self) -> tuple[Path, ...]:
        return tuple(Path(d).resolve() for d in self.allowed_dirs)

    def parse(self, value: object, field: str) -> Image:
        return parse_image(value, field=field, allowed_dirs=self.resolved_dirs, max_bytes=self.max_bytes,
                           max_pixels=self.max_pixels)


def _shown(value: str) -> str:
    return repr(value[:_REASON_VALUE] + ("…" if len(value) > _REASON_VALUE else ""))


def parse_image(value: object, *, field: str, allowed_dirs: tuple[str | Path, ...] | list[str | Path],
                max_bytes: int, max_pixels: int = 4_000_000) -> Image:
    """An event field's value as a validated Image, or ImageError saying why it is not one."""
    where = f"image field {field!r}"
    if not isinstance(value, str):
        msg = f"{where}: expected a data URL, base64 text or a file path, got {type(value).__name__}"
        raise ImageError(msg)
    if value.startswith("data:"):
        head, comma, b64 = value.partition(",")
        parts = head[len("data:"):].split(";")
        if not comma or parts[-1] != "base64":
            msg = f"{where}: a data URL must be data:<image type>;base64,<data>, got {_shown(value)}"
            raise ImageError(msg)
        declared = parts[0].lower()
        if declared not in MIMES.values():
            msg = f"{where}: data URL type {parts[0]!r} is not one of {', '.join(MIMES.values())}"
            raise ImageError(msg)
        data = _b64(b64, where, max_bytes)
        img = _decode(data, field, where, max_pixels)
        if img.mime != declared:
            msg = f"{where}: the data URL says {declared} but the data is {img.mime}"
            raise ImageError(msg)
        return img
    text = value.replace("\n", "").replace("\r", "")
    if text.startswith(_SIGNATURES) and _BASE64.fullmatch(text):
        return _decode(_b64(text, where, max_bytes), field, where, max_pixels)
    return _decode(_read(value, where, allowed_dirs, max_bytes), field, where, max_pixels)


def _b64(text: str, where: str, max_bytes: int) -> bytes:
    text = text.replace("\n", "").replace("\r", "")
    size = len(text) * 3 // 4 - len(text) + len(text.rstrip("="))  # before decoding: bounded work
    if size > max_bytes:
        msg = f"{where}: image of {size} bytes is larger than max_bytes={max_bytes}"
        raise ImageError(msg)
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        msg = f"{where}: not valid base64 ({e})"
        raise ImageError(msg) from None


def _read(value: str, where: str, allowed_dirs, max_bytes: int) -> bytes:
    if not allowed_dirs:
        msg = f"{where}: {_shown(value)} is neither a data URL nor base64 of a PNG, JPEG or WebP image, and file paths are not allowed (images.allowed_dirs is empty)"
        raise ImageError(msg)
    try:
        path = Path(value).resolve(strict=True)  # symlinks and `..` first: the real place counts
    except FileNotFoundError:
        msg = f"{where}: no such file {_shown(value)}"
        raise ImageError(msg) from None
    except (OSError, ValueError, RuntimeError) as e:  # NUL in the path, a symlink loop, no access
        msg = f"{where}: cannot resolve path {_shown(value)}: {type(e).__name__}"
        raise ImageError(msg) from None
    dirs = [Path(d).resolve() for d in allowed_dirs]
    if not any(path.is_relative_to(d) for d in dirs):
        msg = f"{where}: path {_shown(value)} resolves outside the allowed directories"
        raise ImageError(msg)
    try:
        with path.open("rb") as fh:
            if not path.is_file():
                msg = f"{where}: {_shown(value)} is not a regular file"
                raise ImageError(msg)
            data = fh.read(max_bytes + 1)  # bounded even if the file grew since it was named
    except OSError as e:
        msg = f"{where}: cannot read {_shown(value)}: {type(e).__name__}"
        raise ImageError(msg) from None
    if len(data) > max_bytes:
        msg = f"{where}: file {_shown(value)} is larger than max_bytes={max_bytes}"
        raise ImageError(msg)
    return data


def _decode(data: bytes, field: str, where: str, max_pixels: int) -> Image:
    from PIL import (
        Image as PILImage,  # deferred: only pipelines with images pay for Pillow
    )

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a decompression-bomb warning: the limit below decides
            with PILImage.open(io.BytesIO(data), formats=tuple(MIMES)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    msg = f"{where}: image of {w}x{h} pixels is more than max_pixels={max_pixels}"
                    raise ImageError(msg)
                fmt = im.format
                im.load()  # decode it all: a truncated or corrupt file fails here, not in a model
                grey = im.convert("L").resize((FINGERPRINT_SIDE, FINGERPRINT_SIDE), PILImage.Resampling.BOX)
                fp = grey.tobytes()
    except ImageError:
        raise
    except PILImage.UnidentifiedImageError:
        msg = f"{where}: not a PNG, JPEG or WebP image"
        raise ImageError(msg) from None
    except Exception as e:  # noqa: BLE001 - whatever a corrupt file makes a decoder raise
        msg = f"{where}: cannot decode the image: {type(e).__name__}: {str(e)[:120]}"
        raise ImageError(msg) from None
    if fmt not in MIMES or w < 1 or h < 1:
        msg = f"{where}: not a PNG, JPEG or WebP image"
        raise ImageError(msg)
    return Image(field, MIMES[fmt], data, hashlib.sha256(data).hexdigest(), w, h, fp)
