"""What every reader of eval's files shares: numbered text lines, JSON parsed with a nesting limit, and the checks
of the values those files hold.

Every reader raises ValueError naming the file, the line (or the JSON entry) and what is wrong: numbers are
checked for range (image indices 1..``MAX_IMAGE_INDEX``, DET ids 1..200, coordinates finite within
``eval.boxes.MAX_COORD``, scores finite), and JSON for its nesting depth before it is parsed (``parse_json``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import re
from collections.abc import Iterator

import numpy as np

from eval.classes import det200

# Image indices (imagesets, blacklists, submissions, COCO ids) above this are refused: ILSVRC's largest set has
# about 500,000 images, and the devkit reads them as MATLAB int32.
MAX_IMAGE_INDEX = 2**31 - 1
# Deepest nesting of JSON arrays and objects read from a file (ours need 4); Python's parser recurses once per
# level, and a few thousand levels end in RecursionError instead of a message.
MAX_JSON_DEPTH = 32


def numbered_lines(path: str) -> Iterator[tuple[int, str]]:
    """(1-based line number, stripped line) for each non-empty line of a text file."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield number, line


def fields(path: str, count: int, expected: str) -> Iterator[tuple[str, list[str]]]:
    """(``path:line``, the line's whitespace-separated fields) for each non-empty line of a text file.

    A line without exactly ``count`` fields raises ValueError ``path:line: expected <expected>, got '<line>'``.
    """
    for number, line in numbered_lines(path):
        where = f"{path}:{number}"
        tokens = line.split()
        if len(tokens) != count:
            raise ValueError(f"{where}: expected {expected}, got {line!r}")
        yield where, tokens


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
        raise ValueError(f"{name} is {text!r}, not a number") from None
    if not value.is_integer():  # also inf and nan
        raise ValueError(f"{name} is {text!r}, not a whole number")
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
        raise ValueError(f"image index {token!r} is not an integer") from None
    check_index(index)
    return index


# ---- JSON ------------------------------------------------------------------------------------------------


def load_json(path: str):
    """The JSON document in a file (``parse_json``); invalid JSON raises ValueError naming the file and line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
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
        raise ValueError(f"{where}: {name!r} must be an integer, got {value!r}")
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
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{where}: 'score' must be a finite number, got {value!r}")
    return float(value)


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
