"""A synthetic detection set in the real ILSVRC DET layout, made offline from photographs scikit-image ships.

What it is for: offline tests, training smoke runs, coverage figures and end-to-end learning checks (a detector
trained on it should score it well; ``ircnn eval det`` with its own ground truth as predictions gives mAP 1.0).
What it is not: a stand-in for ILSVRC. It has at most five classes, pasted objects and no real context.

Layout written under ``out`` (the real ILSVRC 2014 DET layout, flat per split)::

    Data/DET/{train,val}/ILSVRC2014_synth_00000001.JPEG
    Annotations/DET/{train,val}/ILSVRC2014_synth_00000001.xml   PASCAL VOC-style, object name = DET WNID
    ImageSets/DET/{train,val}.txt                               "<split>/<stem> <index>", index 1-based per file
    synth.json                                                  seed, classes and their photos, counts

Images are numbered 1..N across both splits; the last ``round(N * val_fraction)`` (at least one when the fraction is
positive) form ``val``.

The images are drawn by ``eval.synth_render`` from the photos of ``eval.synth_photos``.
"""

from __future__ import annotations

import json
import os
import shutil

import cv2

from eval.annotations import write_annotation, write_imageset
from eval.classes import det200
from eval.parsing import parse_json
from eval.synth_config import SynthConfig
from eval.synth_photos import BACKGROUNDS, CLASSES, DISTRACTORS, load_sources
from eval.synth_render import jpeg_quality, render

FORMAT = "ircnn-synth-det"  # synth.json "format": marks a directory this module may replace




def image_name(index: int) -> str:
    return f"ILSVRC2014_synth_{index:08d}"


def _owned_paths(out: str) -> list[str]:
    """Everything a synthetic set consists of: what replacing one removes."""
    paths = [os.path.join(out, top, "DET", split) for top in ("Data", "Annotations") for split in ("train", "val")]
    paths += [os.path.join(out, "ImageSets", "DET", f"{split}.txt") for split in ("train", "val")]
    return paths + [os.path.join(out, "synth.json")]


def _is_synth_set(out: str) -> bool:
    try:
        with open(os.path.join(out, "synth.json"), encoding="utf-8") as f:
            return parse_json(f.read()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _prepare_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out):
        if not (overwrite or _is_synth_set(out)):
            raise ValueError(f"--out {out} is not empty and holds no synthetic set (no synth.json from `ircnn data "
                             "synth`); choose an empty or new directory, or pass --overwrite to replace "
                             "Data/DET/{train,val}, Annotations/DET/{train,val}, ImageSets/DET/{train,val}.txt "
                             "and synth.json there")
        for path in _owned_paths(out):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path)
            elif os.path.lexists(path):
                os.remove(path)
    for split in ("train", "val"):
        os.makedirs(os.path.join(out, "Data", "DET", split), exist_ok=True)
        os.makedirs(os.path.join(out, "Annotations", "DET", split), exist_ok=True)
    os.makedirs(os.path.join(out, "ImageSets", "DET"), exist_ok=True)


def _split_of(config: SynthConfig, index: int) -> str:
    return "train" if index <= config.images - config.val_images else "val"


def _write_one(job: tuple[str, SynthConfig, int]) -> list[str]:
    """Render, encode and write image ``index`` and its annotation; returns the WNIDs of its objects."""
    out, config, index = job
    image, objects = render(config, index)
    split, name = _split_of(config, index), image_name(index)
    ok, jpeg = cv2.imencode(".JPEG", image[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality(config, index)])
    if not ok:
        raise OSError(f"OpenCV could not encode {name} as JPEG")
    with open(os.path.join(out, "Data", "DET", split, name + ".JPEG"), "wb") as f:
        f.write(jpeg.tobytes())
    write_annotation(os.path.join(out, "Annotations", "DET", split, name + ".xml"), folder=split, filename=name,
                     width=image.shape[1], height=image.shape[0], objects=objects)
    return [wnid for wnid, _ in objects]


def _init_worker() -> None:
    cv2.setNumThreads(1)  # one process per core already
    load_sources()


def write_synth_set(out: str, config: SynthConfig, *, workers: int = 1, overwrite: bool = False) -> dict:
    """Write the set ``config`` describes under ``out`` (module docstring) and return the synth.json document.

    ``out`` must be new, empty, or hold an earlier synthetic set (which is replaced); ``overwrite=True`` also
    replaces the paths a set consists of in any other directory, leaving everything else there alone.
    The files do not depend on ``workers``.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    _prepare_out(out, overwrite)
    _write_json(out, {"format": FORMAT, "note": "incomplete: being written, or the writer stopped"})
    jobs = ((out, config, i) for i in range(1, config.images + 1))
    workers = min(workers, max(1, config.images // 64))  # starting a process costs about 50 images
    if workers == 1:
        found = [_write_one(job) for job in jobs]
    else:
        import multiprocessing

        # spawn, not fork: the CLI process may hold torch's thread pools, which do not survive a fork.
        with multiprocessing.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            found = list(pool.imap(_write_one, jobs, chunksize=16))

    splits = {s: [i for i in range(1, config.images + 1) if _split_of(config, i) == s] for s in ("train", "val")}
    for split, indices in splits.items():
        write_imageset(os.path.join(out, "ImageSets", "DET", f"{split}.txt"),
                       [f"{split}/{image_name(i)}" for i in indices])
    doc = summarize(config, found)
    _write_json(out, doc)
    return doc


def _write_json(out: str, doc: dict) -> None:
    with open(os.path.join(out, "synth.json"), "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def summarize(config: SynthConfig, found: list[list[str]]) -> dict:
    """The synth.json document: settings, classes with their photos, and counts per split.

    ``found[i]`` lists the WNIDs of the objects in image ``i + 1``.
    """
    vocab = det200()
    counts = {s: {"images": 0, "objects": 0, "images_without_objects": 0} for s in ("train", "val")}
    per_class = {c.wnid: {"train": 0, "val": 0} for c in CLASSES[:config.classes]}
    for index, wnids in enumerate(found, 1):
        split = _split_of(config, index)
        counts[split]["images"] += 1
        counts[split]["objects"] += len(wnids)
        counts[split]["images_without_objects"] += not wnids
        for wnid in wnids:
            per_class[wnid][split] += 1
    classes = []
    for c in CLASSES[:config.classes]:
        row = vocab.row_of_wnid[c.wnid]
        classes.append({"det_id": vocab.ids[row], "wnid": c.wnid, "name": vocab.names[row],
                        "photos": [f"skimage.data.{p}" for p in c.photos], "cut_out": c.note,
                        "objects": per_class[c.wnid]})
    return {
        "format": FORMAT,
        "generator": "eval.synth (ircnn data synth)",
        "seed": config.seed,
        "images": config.images,
        "val_fraction": config.val_fraction,
        "size": config.size,
        "min_object": config.min_object,
        "min_visible": config.min_visible,
        "splits": counts,
        "classes": classes,
        "distractors": list(DISTRACTORS),
        "backgrounds": list(BACKGROUNDS),
        "note": "Synthetic: photo cut-outs pasted on textures. For tests and smoke runs; not a stand-in for ILSVRC.",
    }
