"""What every reader of eval's files shares: numbered text lines and whole files read within bounds, JSON parsed
with a nesting limit, and the checks of the values those files hold.

Every reader raises ValueError naming the file, the line (or the JSON entry) and what is wrong: numbers are
checked for range (image indices 1..``MAX_IMAGE_INDEX``, DET ids 1..200, coordinates finite within
``eval.boxes.MAX_COORD``, scores finite), and JSON for its nesting depth before it is parsed (``parse_json``).

Every file is read within bounds (the ``MAX_*`` constants below): a line-by-line reader (``text_lines``) refuses a
line longer than its format's bound without reading the rest of it, and any file larger than its format's total
bound; a whole-file reader (``read_bounded``) refuses a regular file by its size before reading it and anything
else (a pipe, ``/dev/zero``) once the bound is passed. A message quotes at most ``excerpt`` of the input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
from collections.abc import Iterator

import numpy as np

from eval.classes import det200

# Image indices (imagesets, blacklists, submissions, COCO ids) above this are refused: ILSVRC's largest set has
# about 500,000 images, and the devkit reads them as MATLAB int32.
MAX_IMAGE_INDEX = 2**31 - 1
# Deepest nesting of JSON arrays and objects read from a file (ours need 4); Python's parser recurses once per
# level, and a few thousand levels end in RecursionError instead of a message.
MAX_JSON_DEPTH = 32

# ---- bounds on what a reader takes in (one place for every reader of eval) ----
# Longest line (in characters, line end excluded) of the whitespace-separated text formats: devkit submissions
# (under 100 characters a line), imagesets, blacklists, classification labels and text predictions (an image name
# or path and a few words).
MAX_TEXT_LINE_CHARS = 64 << 10
# Longest line of the JSON-lines formats: one `ircnn detect` record holds up to 10,000 detections (--max-detections'
# ceiling) of about 160 characters each; an `ircnn classify --json` line at most 1000 ranked classes.
MAX_JSON_LINE_CHARS = 4 << 20
# Largest file read line by line (whose rows are kept): a devkit submission of ILSVRC DET val, 20,000 images with
# a few hundred detections each, is a few hundred MB; as detect records about twice that.
MAX_LINES_FILE_BYTES = 4 << 30
# Largest whole-file JSON document (COCO ground truth and results lists, parsed in memory at several times their
# size): COCO results for ILSVRC DET val are a few hundred MB.
MAX_JSON_FILE_BYTES = 2 << 30
# Largest annotation XML: an ILSVRC annotation is a few KB.
MAX_XML_BYTES = 10 << 20
# How much of an offending value a message quotes.
EXCERPT_CHARS = 80

_READ_CHUNK = 16 << 20  # bytes per read of a whole-file reader


def excerpt(value) -> str:
    """What a message quotes of an input value: ``repr(value)``, or when longer than ``EXCERPT_CHARS`` its first
    ``EXCERPT_CHARS`` characters and ``... (N characters)``, N the length of the string (of the repr otherwise)."""
    if isinstance(value, str):
        quoted, length = repr(value[:EXCERPT_CHARS + 1]), len(value)  # never the repr of a long string
        if length <= EXCERPT_CHARS and len(quoted) <= EXCERPT_CHARS + 2:
            return quoted
    else:
        quoted = repr(value)
        length = len(quoted)
        if length <= EXCERPT_CHARS + 2:
            return quoted
    return f"{quoted[:EXCERPT_CHARS]}... ({length:,} characters)"


def _size(n: int) -> str:
    """``n`` bytes in words: ``10 MB``, ``2 GB``, ``65,536 bytes``."""
    for shift, unit in ((30, "GB"), (20, "MB"), (10, "KB")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:,} bytes"


def _regular_size(f) -> int | None:
    """The size of an open regular file; None for anything else (a pipe, a device such as ``/dev/zero``)."""
    st = os.fstat(f.fileno())
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def _too_big(path: str, max_bytes: int, kind: str, advice: str) -> str:
    return f"{path}: over {_size(max_bytes)}, the most {kind} may be; {advice}"


def text_lines(path: str, kind: str = "a text file", max_line: int | None = None, max_bytes: int | None = None
               ) -> Iterator[tuple[int, str]]:
    """(1-based line number, line with its line end) for every line of a UTF-8 text file, empty ones included.

    A line longer than ``max_line`` characters (default ``MAX_TEXT_LINE_CHARS``) raises ValueError ``path:line:
    line longer than ...`` once its first ``max_line + 1`` characters are read (the rest never is: ``/dev/zero`` is
    refused at once), and a file of more than ``max_bytes`` (default ``MAX_LINES_FILE_BYTES``; a regular file by
    its size, before reading, anything else once that many characters have been read) ``path: over ...``. ``kind``
    names the format in the messages (``a devkit submission``).
    """
    max_line = MAX_TEXT_LINE_CHARS if max_line is None else max_line
    max_bytes = MAX_LINES_FILE_BYTES if max_bytes is None else max_bytes
    with open(path, encoding="utf-8") as f:
        size = _regular_size(f)
        if size is not None and size > max_bytes:
            raise ValueError(_too_big(path, max_bytes, kind, "is this the right file?"))
        readline, limit, total, number = f.readline, max_line + 1, 0, 0
        while True:
            try:
                line = readline(limit)
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} near line {number + 1}); is it {kind}?") from None
            if not line:
                return
            number += 1
            if len(line) == limit and not line.endswith("\n"):
                raise ValueError(f"{path}:{number}: line longer than {max_line:,} characters, the most a line of "
                                 f"{kind} may have (it starts {repr(line[:EXCERPT_CHARS])[:EXCERPT_CHARS]}...); is "
                                 "this the right file?")
            total += len(line)
            if total > max_bytes:
                raise ValueError(_too_big(path, max_bytes, kind, "is this the right file?"))
            yield number, line


def numbered_lines(path: str, kind: str = "a text file", max_line: int | None = None
                   ) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) for each non-empty line of a text file, within bounds (``text_lines``)."""
    for number, line in text_lines(path, kind, max_line):
        line = line.strip()
        if line:
            yield number, line


def json_lines(path: str, kind: str) -> Iterator[tuple[int, str]]:
    """``numbered_lines`` of a JSON-lines file: lines of up to ``MAX_JSON_LINE_CHARS``."""
    return numbered_lines(path, kind, MAX_JSON_LINE_CHARS)


def line_batches(path: str, kind: str = "a text file", max_chars: int = 8 << 20
                 ) -> Iterator[tuple[int, list[str]]]:
    """``text_lines`` in batches of consecutive lines of about ``max_chars`` characters together (at most
    ``max_chars + MAX_TEXT_LINE_CHARS``): (number of the batch's first line, its lines, line ends kept). For
    readers that parse many lines in one call (``np.loadtxt``) without holding the whole file as text."""
    batch: list[str] = []
    first = chars = 0
    for number, line in text_lines(path, kind):
        if not batch:
            first = number
        batch.append(line)
        chars += len(line)
        if chars >= max_chars:
            yield first, batch
            batch, chars = [], 0
    if batch:
        yield first, batch


def read_bounded(path: str, max_bytes: int, kind: str, advice: str = "is this the right file?", *,
                 text: bool = True) -> bytearray:
    """The bytes of a whole file of at most ``max_bytes``, or ValueError ``path: over <bound>, the most <kind> may
    be; <advice>``: a regular file is refused by its size before it is read, anything else (a pipe, a device) once
    ``max_bytes`` have come. ``text``: a NUL byte, which no JSON or UTF-8 text file holds, is refused as soon as it
    is read (so ``/dev/zero`` is refused at once, not after ``max_bytes``)."""
    with open(path, "rb") as f:
        size = _regular_size(f)
        if size is not None and size > max_bytes:
            raise ValueError(_too_big(path, max_bytes, kind, advice))
        data = bytearray()
        while len(data) <= max_bytes:
            chunk = f.read(min(_READ_CHUNK, max_bytes + 1 - len(data)))
            if not chunk:
                return data
            if text and b"\x00" in chunk:
                raise ValueError(f"{path}: holds a NUL byte (byte {len(data) + chunk.index(0):,}), so it is not "
                                 f"{kind} (a text file); is this the right file?")
            data += chunk
    raise ValueError(_too_big(path, max_bytes, kind, advice))


def fields(path: str, count: int, expected: str, kind: str = "a text file") -> Iterator[tuple[str, list[str]]]:
    """(``path:line``, the line's whitespace-separated fields) for each non-empty line of a text file (lines of at
    most ``MAX_TEXT_LINE_CHARS``; ``kind`` names the format in messages).

    A line without exactly ``count`` fields raises ValueError ``path:line: expected <expected>, got '<line>'``.
    """
    for number, line in numbered_lines(path, kind):
        where = f"{path}:{number}"
        yield where, split_fields(line, count, expected, where)


def split_fields(line: str, count: int, expected: str, where: str) -> list[str]:
    """The whitespace-separated fields of a line, or ValueError ``where: expected <expected>, got '<line>'``
    (an ``excerpt``) if there are not ``count`` of them."""
    tokens = line.split()
    if len(tokens) != count:
        raise ValueError(f"{where}: expected {expected}, got {excerpt(line.strip())}")
    return tokens


@contextlib.contextmanager
def located(where: str) -> Iterator[None]:
    """Put ``where: `` before the message of a ValueError raised inside (the message says what, this says where)."""
    try:
        yield
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def whole_number(text: str, name: str) -> int:
    """A whole number written as an integer or a float (``12``, ``12.0``, ``1.2e1``) -> int.

    Raises ValueError ``<name> is '<text>', not a whole number`` (or ``not a number``); callers add the location.
    """
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} is {excerpt(text)}, not a number") from None
    if not value.is_integer():  # also inf and nan
        raise ValueError(f"{name} is {excerpt(text)}, not a whole number")
    return int(value)


def check_index(index: int, name: str = "image index") -> None:
    """Refuse an image index outside 1..``MAX_IMAGE_INDEX`` (ValueError without a location; callers add it)."""
    if index < 1:
        raise ValueError(f"{name} {index} must be >= 1")
    if index > MAX_IMAGE_INDEX:
        raise ValueError(f"{name} {index:.6g} is more than {MAX_IMAGE_INDEX} (2^31 - 1)")


def parse_index(token: str) -> int:
    """An image index written as a decimal integer (imagesets, blacklists) -> int, checked by ``check_index``."""
    try:
        index = int(token)
    except ValueError:
        raise ValueError(f"image index {excerpt(token)} is not an integer") from None
    check_index(index)
    return index


# ---- JSON ------------------------------------------------------------------------------------------------


def load_json(path: str, kind: str = "a JSON file", advice: str = "is this the right file?"):
    """The JSON document in a file of at most ``MAX_JSON_FILE_BYTES`` (``read_bounded``, ``parse_json``); invalid
    JSON raises ValueError naming the file and line, a larger file ``path: over <bound>, the most <kind> may be;
    <advice>``."""
    data = read_bounded(path, MAX_JSON_FILE_BYTES, kind, advice)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start:,}); is it {kind}?") from None
    del data
    try:
        return parse_json(text, path)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')


def parse_json(text: str, where: str = "", max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)`` once its arrays and objects are known to nest at most ``max_depth`` deep.

    Deeper input raises ValueError starting with ``where`` (a file, or ``file:line`` for one line of a JSON-lines
    file; nothing when empty) and, in a text of several lines, the line where the limit is passed; invalid JSON
    raises ``json.JSONDecodeError`` as ``json.loads`` does. Brackets inside strings do not count.
    """
    if text.count("[") + text.count("{") > max_depth:  # else it cannot nest that deep
        stripped = _JSON_STRING.sub("", text)  # JSON strings hold no raw newlines: line numbers survive
        data = np.frombuffer(stripped.encode("utf-8", "replace"), np.uint8)
        opens = (data == ord("[")) | (data == ord("{"))
        at = np.flatnonzero(opens | (data == ord("]")) | (data == ord("}")))  # [B] every bracket
        over = np.flatnonzero(np.cumsum(np.where(opens[at], 1, -1)) > max_depth)
        if over.size:
            line = 1 + int(np.count_nonzero(data[: at[over[0]]] == ord("\n")))
            if "\n" in text.strip():
                where = f"{where}:{line}" if where else f"line {line}"
            raise ValueError(f"{where}{': ' if where else ''}JSON nested more than {max_depth} levels deep "
                             "(arrays and objects); not a file this program writes")
    return json.loads(text)


def json_int(value, name: str, where: str) -> int:
    """A JSON integer field ``name`` (not a bool, not a float), or ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}: {name!r} must be an integer, got {excerpt(value)}")
    return value


def json_index(value, name: str, where: str) -> int:
    """A JSON image index field ``name`` in 1..``MAX_IMAGE_INDEX``."""
    index = json_int(value, name, where)
    with located(where):
        check_index(index, repr(name))
    return index


def json_det_id(value, where: str) -> int:
    """A JSON DET id 1..200 (COCO ``category_id``, our records' ``det_id``)."""
    det_id = json_int(value, "category_id", where)
    if det_id not in det200().row_of_id:
        raise ValueError(f"{where}: category_id {det_id} is not a DET id 1..200")
    return det_id


def json_score(value, where: str) -> float:
    """A finite JSON number ``score``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= _MAX_FLOAT:  # NaN too
        raise ValueError(f"{where}: 'score' must be a finite number, got {excerpt(value)}")
    return float(value)


_MAX_FLOAT = 1.7976931348623157e308  # sys.float_info.max: a JSON integer beyond it is not a float either


def dataclass_fields(cls, d, what: str, fields: str) -> dict:
    """``d`` checked as the JSON object of dataclass ``cls`` (a dict with no key that is not one of its fields), as
    a new dict: ``ValueError`` "``what`` must be a JSON object" or "unknown ``fields`` field(s) [...]; known: [...]"."""
    if not isinstance(d, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown {fields} field(s) {sorted(unknown)}; known: {sorted(known)}")
    return dict(d)
