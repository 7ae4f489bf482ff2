"""A bundle's int8 models as they are loaded: ``int8/int8.json`` read and checked (``read_int8_manifest``) and each
quantised model verified against the member weights and export it was made from (``load_int8``). Making them is
``detector.runtimes.calibrate``'s job."""

from __future__ import annotations

import os
from pathlib import Path

from detector.bundle.format import Bundle, BundleError
from detector.files import file_sha256
from detector.runtimes.export import export_key
from eval.parsing import parse_json

INT8_DIR = "int8"  # inside the bundle
INT8_MANIFEST = "int8.json"
FORMAT = 1
MAX_MANIFEST_BYTES = 1_000_000


class Int8Error(BundleError):
    """The bundle's int8 models are missing, stale or damaged; the message says what to run."""


def read_int8_manifest(bundle_dir: str | os.PathLike) -> dict:
    """``int8/int8.json`` of a bundle, checked for shape (not yet against the members: ``load_int8``)."""
    path = Path(bundle_dir) / INT8_DIR / INT8_MANIFEST
    hint = f"run `ircnn model quantize {bundle_dir} --images DIR` to make them"
    if not path.is_file():
        raise Int8Error(f"{bundle_dir} has no int8 models ({INT8_DIR}/{INT8_MANIFEST} is missing); {hint}")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise Int8Error(f"{path} is larger than {MAX_MANIFEST_BYTES:,} bytes; {hint}")
    try:
        doc = parse_json(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise Int8Error(f"{path} is not valid JSON ({e}); {hint}") from None
    members = doc.get("members") if isinstance(doc, dict) else None
    if (not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("size"), int)
            or not isinstance(members, list)
            or not all(isinstance(m, dict) and all(isinstance(m.get(k), str) for k in ("file", "sha256", "export_key"))
                       for m in members)):
        raise Int8Error(f"{path} is not an int8 manifest of format {FORMAT}; {hint}")
    for m in members:
        if Path(m["file"]).name != m["file"] or not m["file"].endswith(".onnx"):
            raise Int8Error(f"{path}: member file {m['file']!r} must be a plain .onnx file name in {INT8_DIR}/")
    return doc


def check_one_size(bundle: Bundle) -> None:
    """Refuse a bundle whose members take different input sizes: int8 models are calibrated at one size."""
    sizes = bundle.input_sizes
    if len(set(sizes)) > 1:
        raise Int8Error(f"int8 models are made for members of one input size; this bundle's members take "
                        f"{', '.join(map(str, sizes))} px: run it with precision fp32 or bf16, or quantize and run "
                        "the single-size bundles it was merged from")


def load_int8(bundle: Bundle) -> list[Path]:
    """The int8 model of each member of ``bundle``, checked (module docstring); raises ``Int8Error`` saying
    what to run when they are missing, stale or damaged, or the members take different input sizes."""
    check_one_size(bundle)
    if bundle.path is None:
        raise Int8Error("int8 models live in a bundle's directory; this bundle was not loaded from disk")
    root = Path(bundle.path)
    doc = read_int8_manifest(root)
    hint = f"run `ircnn model quantize {root} --images DIR` again"
    pre = bundle.preprocess
    if doc["size"] != pre.size or len(doc["members"]) != len(bundle.members):
        raise Int8Error(f"the int8 models in {root / INT8_DIR} are for {len(doc['members'])} member(s) at "
                        f"{doc['size']} px, the bundle has {len(bundle.members)} at {pre.size} px; {hint}")
    paths = []
    for i, (entry, member) in enumerate(zip(doc["members"], bundle.members)):
        path = root / INT8_DIR / entry["file"]
        if path.is_symlink() or not path.is_file():
            raise Int8Error(f"{path} is missing (or a link); {hint}")
        if entry["export_key"] != export_key(member, pre.mean, pre.std, pre.size):
            raise Int8Error(f"the int8 model of member {i} was calibrated for other weights than member {i} has "
                            f"now; {hint}")
        if file_sha256(path) != entry["sha256"]:
            raise Int8Error(f"{path} does not match its SHA-256 in {INT8_MANIFEST} (damaged or changed); {hint}")
        paths.append(path)
    return paths


