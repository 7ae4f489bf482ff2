"""Batch detection over files and directories: the single-machine runner behind ``ircnn detect``, and its output
files, written so that an interrupted run resumes without loss or duplicates.

The pieces are separate so that the Ray engine (``service.ray_engine``) reuses them: its actors run
``detect_paths`` and ``run_batch`` writes the records they send back, as it writes the local engine's.

- ``detect_one(detector, path) -> record``: read, propose, score. A file that cannot be used gives the error record
  ``{"image", "error"}`` instead of raising. ``prepare`` (decode + proposals) and ``finish`` (networks + NMS) are
  its two halves; ``detect_paths`` runs them one image apart, so that decoding and selective search of image i+1
  (OpenCV in its own worker process; the waiting thread holds no GIL) overlap the networks scoring image i.
- ``DetectOutput``: every record is appended to a JSON-lines *journal* and flushed at once. For ``jsonl`` the
  journal is the output itself; for ``coco`` and ``ilsvrc`` it is ``OUT.partial.jsonl``, the source of truth from
  which ``finish`` writes OUT atomically (temporary file + ``os.replace``) at the end of the run, plus
  ``OUT.images.json``, the image id of every input. ``resume=True`` keeps the journal: images it already holds
  (detections or error lines) are skipped, and a last line cut off by a crash is dropped, so the image is redone;
  with ``retry_errors`` its error records are dropped too, so those images are tried again.
  An image is the same across runs when its absolute path is (``path_key``: ``photos/a.jpg`` typed in ``/data``
  and ``/data/photos/a.jpg`` are one image); records keep the path as it was given.
- ``run_batch``: the loop of ``ircnn detect``: input list, image ids, resume, progress bar, ``--save-vis``.

Image ids of ``coco`` and ``ilsvrc`` files: the imageset index when an imageset is given (ILSVRC ``val.txt``;
an image matches the entry named by its path relative to the imageset's root, without suffix, else by file name as
``ircnn eval det`` matches), otherwise the 1-based position in the input list (``list_images`` order: arguments in
the order given, directories sorted), so resuming needs the same PATH arguments.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from detector.files import write_text_atomic
from detector.image import IMAGE_SUFFIXES, list_images, read_image
from detector.progress import progress
from eval.annotations import ImageLookup, read_imageset
from eval.coco import coco_categories, write_coco_results
from eval.records import detection_record, error_record, record_table, write_record
from eval.submission import write_submission
from service import paths
from service.journal import atomic_write, check_run, journal_offsets, path_key, read_records, repair_journal
from service.paths import check_paths

if TYPE_CHECKING:
    from detector.config import DetectConfig

FORMATS = ("jsonl", "coco", "ilsvrc")
JOURNAL_SUFFIX = ".partial.jsonl"  # beside a coco / ilsvrc output
RUN_SUFFIX = ".run.json"  # beside the journal: the arguments that decide its records, for --resume
IMAGES_SUFFIX = ".images.json"  # beside a coco / ilsvrc output: file_name -> id, width, height


# ---- one image -------------------------------------------------------------------------------------------


@dataclass
class Result:
    """``record`` as written to the output; ``image`` uint8 ``[H, W, 3]`` (None for an error record)."""

    record: dict
    image: np.ndarray | None
    seconds: dict[str, float] = field(default_factory=dict)
    regions: int = 0  # proposals the networks scored


def to_result(result) -> Result:
    """A ``detector.pipeline.detector.ImageResult`` as the record the output holds."""
    if result.error is not None:
        return Result(error_record(result.source, result.error), None, result.seconds)
    dets = result.detections
    h, w = result.image.shape[:2]
    record = detection_record(result.source, w, h, dets.boxes, dets.scores, dets.det_ids)
    return Result(record, result.image, result.seconds, dets.regions)


def detect_paths(detector, paths: Iterable[str | os.PathLike]) -> Iterator[Result]:
    """The records of ``paths``, in order: ``Detector.detect_many`` (the next image decoded and proposed while
    the networks score the current one)."""
    for result in detector.detect_many(paths):
        yield to_result(result)


def detect_one(detector, path: str | os.PathLike) -> dict:
    """The record of one file: ``{"image", "width", "height", "detections": [...]}`` or ``{"image", "error"}``."""
    return next(detect_paths(detector, [path])).record


# ---- the journal -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageId:
    id: int  # COCO image_id / devkit image_index
    file_name: str  # imageset name, or path relative to the inputs' common folder


class DetectOutput:
    """Where the records of a run go (module docstring): ``out`` None writes JSON lines to stdout.

    ``done`` holds the images recorded by an earlier run (with ``resume``), as recorded; with ``retry_errors``
    the error records of that run are dropped from the journal, and their images, in ``retried``, are not in
    ``done``. ``write`` appends one record and flushes it; ``finish`` writes a coco / ilsvrc file from the journal.
    """

    def __init__(self, out: str | os.PathLike | None, fmt: str = "jsonl", resume: bool = False,
                 retry_errors: bool = False) -> None:
        if fmt not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
        if out is None and (fmt != "jsonl" or resume):
            raise ValueError(f"{'--resume' if resume else '--format ' + fmt} needs --out FILE")
        self.out, self.format = (None if out is None else str(out)), fmt
        self.done: set[str] = set()
        self.failed_before: set[str] = set()  # images of ``done`` with an error record
        self.retried: set[str] = set()  # images whose error records were dropped (``retry_errors``)
        if out is None:
            self.journal_path, self._file = None, sys.stdout
            return
        if os.path.isdir(self.out):
            raise ValueError(f"--out {self.out} is a directory; give a file name")
        if os.path.exists(self.out) and not os.path.isfile(self.out):  # /dev/zero, a FIFO: never read or written
            raise ValueError(f"--out {self.out} is not a regular file; give a file name")
        parent = os.path.dirname(os.path.abspath(self.out))
        if not os.path.isdir(parent):
            raise ValueError(f"--out {self.out}: folder {parent} does not exist")
        self.journal_path = self.out if fmt == "jsonl" else self.out + JOURNAL_SUFFIX
        if resume and os.path.exists(self.journal_path):
            self.done, self.failed_before = repair_journal(self.journal_path, drop_errors=retry_errors)
            if retry_errors:
                self.done, self.retried, self.failed_before = self.done - self.failed_before, self.failed_before, set()
        elif resume and fmt != "jsonl" and os.path.exists(self.out):
            raise ValueError(f"cannot resume {self.out}: its journal {self.journal_path} is gone; leave out --resume "
                             "to start over")
        self._file = open(self.journal_path, "a" if resume else "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        write_record(self._file, record)
        self._file.flush()

    def close(self) -> None:
        if self._file is not sys.stdout and not self._file.closed:
            self._file.close()

    def __enter__(self) -> DetectOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def finish(self, ids: dict[str, ImageId]) -> dict:
        """Write the coco / ilsvrc file (and ``OUT.images.json``) from the journal, for the images in ``ids``
        (input path -> id; a record matches by ``path_key``); a no-op for jsonl. Returns counts of what was
        written."""
        self.close()
        if self.format == "jsonl":
            return {}
        images, failed = [], []
        # Written in input order, whichever order the journal has (the Ray engine's: as its workers finished).
        offsets: dict[str, int] = {}
        for image, start in journal_offsets(self.journal_path).items():
            offsets.setdefault(path_key(image), start)  # the first record of a file however it was spelled
        wanted = [(image_id, offsets[path_key(p)]) for p, image_id in ids.items() if path_key(p) in offsets]
        skipped = len(offsets) - len(wanted)  # recorded by a run over other inputs

        def tables():
            """The detections of each image of ``wanted``, in that order, one journal record at a time."""
            records = read_records(self.journal_path, (start for _, start in wanted))
            for (image_id, start), record in zip(wanted, records):
                entry = {"id": image_id.id, "file_name": image_id.file_name, "path": record["image"]}
                if "error" in record:
                    failed.append({**entry, "error": record["error"]})
                    continue
                images.append({**entry, "width": record["width"], "height": record["height"]})
                yield record_table(record, image_id.id, f"{self.journal_path} (byte {start})")

        writer = write_coco_results if self.format == "coco" else write_submission
        rows = 0

        def write(f) -> None:
            nonlocal rows
            rows = writer(f, tables())

        atomic_write(self.out, write)
        images.sort(key=lambda e: e["id"])
        failed.sort(key=lambda e: e["id"])
        # A COCO ground-truth skeleton: read_coco_gt reads it, a user fills in "annotations" or matches by name.
        atomic_write(self.out + IMAGES_SUFFIX, lambda f: json.dump(
            {"images": images, "failed": failed, "annotations": [], "categories": coco_categories()}, f))
        return {"rows": rows, "images_file": self.out + IMAGES_SUFFIX, "journal_records_not_in_inputs": skipped}


# ---- inputs ----------------------------------------------------------------------------------------------


def input_files(inputs: list[str | os.PathLike]) -> list[Path]:
    """``list_images`` of the PATH arguments, each file once (the first spelling kept); ``check_paths`` first."""
    check_paths(inputs)
    seen: set[str] = set()
    out = []
    for p in list_images(inputs):
        key = path_key(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def relative_names(inputs: list[str | os.PathLike], files: list[Path]) -> dict[str, str]:
    """Each file's path relative to the common folder of the inputs (directories, and files' folders), '/'-joined:
    ``photos/`` gives ``a/b.jpg``; ``photos/ more/`` gives ``photos/a/b.jpg`` and ``more/c.png``."""
    if not files:
        return {}
    roots = [os.path.abspath(p) if os.path.isdir(p) else os.path.dirname(os.path.abspath(p)) for p in inputs]
    common = os.path.commonpath(roots)
    return {str(f): Path(os.path.relpath(os.path.abspath(f), common)).as_posix() for f in files}


def position_ids(files: list[Path], names: dict[str, str]) -> dict[str, ImageId]:
    return {str(f): ImageId(i, names[str(f)]) for i, f in enumerate(files, 1)}


def imageset_ids(files: list[Path], imageset_path: str) -> dict[str, ImageId]:
    """Imageset index of every file: the entry named by the path's trailing components without suffix, longest
    first (``.../Data/DET/val/x.JPEG`` -> ``val/x`` in ``val.txt``), else by file name (``ImageLookup``).

    Raises ValueError if a file is not in the imageset or two files are the same entry.
    """
    imageset = read_imageset(imageset_path)
    lookup = ImageLookup(imageset)
    index_name = {i: n for n, i in imageset.items()}
    ids: dict[str, ImageId] = {}
    missing = []
    owner: dict[int, str] = {}
    for f in files:
        parts = list(Path(f).with_suffix("").parts)
        index = next((imageset["/".join(parts[k:])] for k in range(len(parts)) if "/".join(parts[k:]) in imageset),
                     None)
        if index is None:
            index = lookup(str(f))
        if index < 0:
            missing.append(str(f))
            continue
        if index in owner:
            raise ValueError(f"{f} and {owner[index]} are both image {index_name[index]!r} of {imageset_path}")
        owner[index] = str(f)
        ids[str(f)] = ImageId(index, index_name[index])
    if missing:
        raise ValueError(f"{len(missing)} of {len(files)} images are not in --imageset {imageset_path} (first: "
                         f"{missing[0]}); give only the imageset's images, or leave out --imageset to number images "
                         "by their position")
    return ids



@dataclass(frozen=True)
class DetectorSpec:
    """How ``ircnn detect`` builds its ``Detector``: small and picklable, so that each Ray worker builds its own
    from the bundle's path (``service.ray_engine``) exactly as the local engine builds one in this process."""

    model: str | None  # bundle directory; None: torchvision's ImageNet GoogLeNet (``resolve_bundle``)
    config: DetectConfig  # proposals, NMS, threshold, cap, ensemble batch size and precision

    def load(self, device: str = "cpu"):
        """The bundle, its members on ``device``."""
        from detector.bundle.importers import resolve_bundle

        return resolve_bundle(self.model, device=device)

    def build(self, bundle):
        """A ``Detector`` over ``bundle`` (loaded by ``load``) with these options."""
        from detector.pipeline.detector import Detector

        return Detector.from_bundle(bundle, self.config)


def local_engine(make_detector: Callable[[], object], todo: list[Path]) -> Generator[Result, None, None]:
    """``run_batch``'s default engine: one detector in this process, ``detect_paths`` over ``todo`` in order."""
    detector = make_detector()
    try:
        yield from detect_paths(detector, todo)
    finally:
        detector.close()


# ---- the run ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchConfig:
    out: str | None = None  # None: JSON lines to stdout
    format: str = "jsonl"  # one of FORMATS
    resume: bool = False  # skip images already in the output (or its journal)
    retry_errors: bool = False  # with resume: detect the images with an error record again
    imageset: str | None = None  # ILSVRC val.txt: image ids of coco / ilsvrc outputs
    save_vis: str | None = None  # folder for copies of the images with their detections drawn
    vis_threshold: float = 0.3  # draw detections scoring at least this
    progress: bool = False  # tqdm bar on stderr
    report_errors: bool = True  # "path: error: message" on stderr for each failed image

    def __post_init__(self) -> None:
        if not 0.0 <= self.vis_threshold <= 1.0:
            raise ValueError(f"vis_threshold must be in 0..1, got {self.vis_threshold}")


@dataclass
class BatchSummary:
    images: int  # inputs
    skipped: int  # already in the output (resume)
    detected: int  # run now, including failures
    failed: int  # error records written now
    failed_before: int  # error records of skipped images
    detections: int  # written now
    seconds: float
    stage_seconds: dict[str, float]
    out: str | None
    format: str
    files: dict = field(default_factory=dict)
    regions: int = 0  # proposals scored by the networks, all images of this run
    retried: int = 0  # images with an error record from before, detected again (retry_errors)
    vis: dict | None = None  # --save-vis: {"dir", "pictures", "boxes", "threshold", "best_score"}

    def to_json(self) -> dict:
        return {"images": self.images, "skipped": self.skipped, "detected": self.detected, "failed": self.failed,
                "failed_before": self.failed_before, "detections": self.detections,
                "seconds": round(self.seconds, 3),
                "images_per_s": round(self.detected / self.seconds, 4) if self.seconds > 0 else None,
                "seconds_per_image_by_stage": {k: round(v / max(1, self.detected), 4)
                                               for k, v in self.stage_seconds.items()},
                "regions_per_image": round(self.regions / max(1, self.detected - self.failed), 1),
                "regions_per_s_networks": (round(self.regions / self.stage_seconds["networks"], 1)
                                           if self.stage_seconds.get("networks") else None),
                "retried": self.retried, "out": self.out, "format": self.format, **self.files,
                **({"vis": self.vis} if self.vis is not None else {})}


def journal_of(config: BatchConfig) -> str | None:
    """The file the records go to as they come: ``out`` for jsonl, ``OUT.partial.jsonl`` beside coco / ilsvrc."""
    if config.out is None:
        return None
    return str(config.out) if config.format == "jsonl" else str(config.out) + JOURNAL_SUFFIX


def output_files(config: BatchConfig) -> list[str]:
    """The files a run writes: ``config.out``, the run's arguments beside its journal and, for coco / ilsvrc,
    the journal and the image table."""
    if config.out is None:
        return []
    out, journal = str(config.out), journal_of(config)
    return [out, journal + RUN_SUFFIX] if config.format == "jsonl" else [
        out, journal, journal + RUN_SUFFIX, out + IMAGES_SUFFIX]


def check_resume(config: BatchConfig, run: dict) -> None:
    """Raise ValueError if ``--resume`` would add records made with other arguments than the journal's (see
    ``service.journal.check_run``)."""
    journal = journal_of(config)
    if config.resume and journal is not None:
        check_run(journal + RUN_SUFFIX, run, config.out)


def write_run(config: BatchConfig, run: dict) -> None:
    """Record ``run`` beside the journal (not when resuming a journal that has it already)."""
    journal = journal_of(config)
    if journal is not None and not (config.resume and os.path.isfile(journal + RUN_SUFFIX)):
        write_text_atomic(journal + RUN_SUFFIX, json.dumps(run, indent=1, sort_keys=True) + "\n")


def check_outputs(files: list[Path], config: BatchConfig, reads: dict[str, Iterable[str | os.PathLike]]) -> None:
    """Raise ValueError if an output file of the run is one of the input ``files``, its imageset or a file of
    ``reads`` (what -> paths: the bundle's files), whatever path or link names it."""
    if config.out is None:
        return
    reads = {**({"--imageset": [config.imageset]} if config.imageset else {}), **reads}
    paths.check_outputs("--out", config.out, output_files(config), files, reads)


def run_batch(make_detector: Callable[[], object] | None, inputs: list[str], config: BatchConfig,
              engine: Callable[[list[Path]], Generator[Result, None, None]] | None = None,
              reads: dict[str, Iterable[str | os.PathLike]] | None = None, run: dict | None = None) -> BatchSummary:
    """``ircnn detect``: every image under ``inputs`` -> one record in ``config.out`` (module docstring).

    ``make_detector()`` returns a ``detector.pipeline.detector.Detector`` (closed at the end); it is called only when there is
    an image left to detect. ``engine(todo)``, when given, replaces that in-process loop (``local_engine``): it
    yields the ``Result`` of every path of ``todo`` (the inputs not in the output yet), in any order
    (``service.ray_engine.RayEngine``); ``make_detector`` is then not used. Raises ValueError before any work for
    bad inputs (a path that does not exist, no images, an image outside the imageset, a --save-vis copy that would
    overwrite an input, an output that is an input or a file of ``reads``, an output --resume cannot continue or
    would continue with other arguments: ``run``, what decides the records, is kept beside the journal).
    """
    files = input_files(inputs)
    note = ""
    if config.save_vis:  # earlier drawn copies (`ircnn detect . --save-vis vis`) are not inputs
        vis_root = os.path.join(os.path.abspath(config.save_vis), "")
        files = [f for f in files if not os.path.abspath(f).startswith(vis_root)]
        note = "; files inside the --save-vis folder are left out"
    if not files:
        raise ValueError(f"no images found in {' '.join(map(str, inputs))} (looked for "
                         f"{', '.join(IMAGE_SUFFIXES)}{note})")
    check_outputs(files, config, reads or {})
    if run is not None:
        check_resume(config, run)
    names = relative_names(inputs, files)
    ids = None
    if config.format != "jsonl":
        ids = imageset_ids(files, config.imageset) if config.imageset else position_ids(files, names)
    vis = None
    if config.save_vis:
        from service.vis import VisWriter

        vis = VisWriter(config.save_vis, names, files, config.vis_threshold)
    stages: dict[str, float] = {}
    regions = 0
    with DetectOutput(config.out, config.format, config.resume, config.retry_errors) as output:
        if run is not None:
            write_run(config, run)
        done = {path_key(image) for image in output.done}
        todo = [f for f in files if path_key(f) not in done]
        failed = detections = 0
        start = time.perf_counter()
        if todo:
            bar = _progress_bar(len(todo), len(files) - len(todo), config.progress)
            results = engine(todo) if engine is not None else local_engine(make_detector, todo)
            try:
                for result in results:
                    record = result.record
                    output.write(record)
                    for k, v in result.seconds.items():
                        stages[k] = stages.get(k, 0.0) + v
                    regions += result.regions
                    if "error" in record:
                        failed += 1
                        if config.report_errors:
                            _message(f"{record['image']}: error: {record['error']}", bar)
                    else:
                        detections += len(record["detections"])
                        if vis is not None:  # an engine elsewhere (Ray) sends records, not pixels
                            vis.write(record, read_image(record["image"]) if result.image is None else result.image)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(failed=failed, refresh=False)
            finally:
                results.close()  # the local engine closes its detector; Ray stops the workers
                if bar is not None:
                    bar.close()
        seconds = time.perf_counter() - start
        files_written = output.finish(ids) if ids is not None else {}
    if config.format != "jsonl":
        files_written = {"journal": output.journal_path, **files_written}
    input_keys = set(map(path_key, files))
    return BatchSummary(images=len(files), skipped=len(files) - len(todo), detected=len(todo), failed=failed,
                        failed_before=len({path_key(i) for i in output.failed_before} & input_keys),
                        detections=detections, seconds=seconds, stage_seconds=stages, out=config.out,
                        format=config.format, files=files_written, regions=regions,
                        retried=len({path_key(i) for i in output.retried} & input_keys),
                        vis=vis.summary() if vis is not None else None)


def _progress_bar(total: int, skipped: int, enabled: bool):
    """A bar on a terminal, a plain line every half minute in a log (``detector.progress``); None when off."""
    desc = f"detect ({skipped} done before)" if skipped else "detect"
    return progress(total, desc, "img", show=enabled)


def _message(text: str, bar) -> None:
    if bar is not None:
        bar.write(text, file=sys.stderr)
    else:
        print(text, file=sys.stderr, flush=True)
