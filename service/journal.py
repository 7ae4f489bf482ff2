"""The journal of a batch run: one JSON line per image, flushed as it is written, so that an interrupted run
loses at most the line being written. Reading it back (``iter_journal``, ``journal_offsets``, ``read_records``),
repairing it for ``--resume`` (``repair_journal``: a cut last line dropped, repeated images kept once), and the
small pieces the batch runner shares with it (``path_key``, atomic writes, comparing a run's arguments)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator

from detector.files import atomic_path
from eval.parsing import EXCERPT_CHARS, MAX_JSON_LINE_CHARS, excerpt, parse_json
from eval.records import write_record


def path_key(path: str | os.PathLike) -> str:
    """What makes two spellings of an input one image (for ``--resume`` and de-duplication): its absolute path,
    relative paths taken from the current directory. Records keep the path as given."""
    return os.path.abspath(path)


def _check_record(doc, where: str) -> str:
    if not (isinstance(doc, dict) and isinstance(doc.get("image"), str)
            and ("error" in doc or isinstance(doc.get("detections"), list))):
        raise ValueError(f"{where}: not an `ircnn detect` record ({{\"image\", \"detections\"}} or "
                         "{\"image\", \"error\"}); --resume continues only files that `ircnn detect` wrote: pass "
                         "another --out, or leave out --resume to start over")
    return doc["image"]


def iter_journal(path: str | os.PathLike) -> Iterator[dict]:
    """The records of a JSON-lines detections file in file order, the first of each image only.

    A last line without its newline (a crash mid-write) is skipped; a complete line that is not a detect record
    raises ValueError naming the file and line.
    """
    return (doc for _, doc in _journal_records(path))


def _journal_lines(path: str | os.PathLike, hint: str = "") -> Iterator[tuple[int, int, str, dict]]:
    """``(start, end, image, record)`` of every complete line of a journal, repeats included; stops at a last
    line without its newline. A line that is not a detect record raises ValueError naming the file, the line and
    ``hint``."""
    offset, number = 0, 0
    with open(path, "rb") as f:
        while line := _bounded_line(f, path, number + 1):
            number += 1
            if not line.endswith(b"\n"):
                break
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                doc = parse_json(line.decode("utf-8"), where)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where}: invalid JSON ({e}){hint}") from None
            yield start, offset, _check_record(doc, where), doc


def _journal_records(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """``iter_journal`` with the byte offset of each record's line."""
    seen: set[str] = set()
    for start, _, image, doc in _journal_lines(path):
        if image not in seen:
            seen.add(image)
            yield start, doc


def journal_offsets(path: str | os.PathLike) -> dict[str, int]:
    """Image -> byte offset of its record (``iter_journal``'s) in a journal: one int per image, not the records."""
    return {doc["image"]: start for start, doc in _journal_records(path)}


def read_records(path: str | os.PathLike, offsets: Iterable[int]) -> Iterator[dict]:
    """The records at ``offsets`` (from ``journal_offsets``) of a journal, in that order."""
    with open(path, "rb") as f:
        for start in offsets:
            f.seek(start)
            yield json.loads(_bounded_line(f, path, None))


def _bounded_line(f, path, number: int | None) -> bytes:
    """The next line of a journal opened in binary, at most ``MAX_JSON_LINE_CHARS`` bytes (the largest record
    of 10,000 detections is about 1.6 MB): a longer one is no record of ours, and is not read on."""
    line = f.readline(MAX_JSON_LINE_CHARS + 1)
    if len(line) > MAX_JSON_LINE_CHARS:
        where = f"{path}:{number}" if number is not None else str(path)
        raise ValueError(f"{where}: line longer than {MAX_JSON_LINE_CHARS:,} bytes (it starts "
                         f"{excerpt(line[:EXCERPT_CHARS].decode('utf-8', 'replace'))}); not a journal of `ircnn "
                         "detect`: pass another --out, or leave out --resume to start over")
    return line


def repair_journal(path: str | os.PathLike, drop_errors: bool = False) -> tuple[set[str], set[str]]:
    """Make a journal appendable after a crash: cut a partial last line and drop repeated images (first kept);
    with ``drop_errors`` drop the error records too, so that their images are detected again.

    Returns (images recorded, those of them with an error record), as recorded; with ``drop_errors`` the second
    set is no longer in the journal. Reads line by line: a journal of millions of images is never held in memory,
    only the set of its image names.
    """
    images: set[str] = set()
    failed: set[str] = set()
    complete = 0  # bytes up to the end of the last complete record (a cut line or trailing blank lines go)
    duplicates = False
    hint = ("; --resume continues only files that `ircnn detect` wrote: pass another --out, or leave out --resume "
            "to start over")
    for _, complete, image, doc in _journal_lines(path, hint):
        if image in images:
            duplicates = True
            continue
        images.add(image)
        if "error" in doc:
            failed.add(image)
    if duplicates or (drop_errors and failed):  # duplicates: not one run of ours (two runs into one file?)
        atomic_write(path, lambda f: [write_record(f, r) for r in iter_journal(path)
                                       if not (drop_errors and "error" in r)])
    elif complete < os.path.getsize(path):
        os.truncate(path, complete)
    return images, failed


def atomic_write(path: str | os.PathLike, write: Callable) -> None:
    """Write a file through ``write(file)`` into a temporary beside it, synced, then renamed over ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


# ---- the arguments that made the records -----------------------------------------------------------------


def check_run(path: str, run: dict, out) -> None:
    """Raise ValueError if ``run`` (what decides the records: the model, the detection settings) differs from what
    the run that began the journal wrote to ``path``, naming each difference. No file there (a journal written
    before it existed) is continued as it is."""
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            before = parse_json(f.read(1_000_000), path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot resume {out}: {e}; leave out --resume to start over") from None
    now, was = _flatten(json.loads(json.dumps(run))), _flatten(before if isinstance(before, dict) else {})
    changed = [k for k in sorted(set(now) | set(was)) if now.get(k) != was.get(k)]
    if changed:
        shown = "; ".join(f"{k}: {_short(was.get(k))} then, {_short(now.get(k))} now" for k in changed[:6])
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise ValueError(f"--resume would mix records made with other arguments into {out}: {shown}{more}. "
                         "Run with the arguments of the run that began it, or leave out --resume to start over")


def _flatten(doc: dict, prefix: str = "") -> dict:
    """Nested settings as one level, ``{"detect.ensemble.backend": ...}``, so a difference is named by its path."""
    out = {}
    for k, v in doc.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
