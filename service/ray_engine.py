"""``ircnn detect PATH --engine ray``: the batch runner's per-image work on a Ray cluster.

Everything except *where* the images are detected is the local engine's, in ``service.batch.run_batch``: the input
list, image ids, which images ``--resume`` skips, the journal and the jsonl / coco / ilsvrc writers, the summary.
This module is the ``engine`` that ``run_batch`` takes instead of its in-process loop:

- **Ray Data** reads the list of ``(index, path)`` of the images not in the output yet, in blocks of at most
  ``images_per_block``.
- **An actor pool** of ``DetectWorker``: each worker builds its ``Detector`` once, from the bundle's *path*
  (``DetectorSpec.load``, the options the CLI parsed), and runs ``service.batch.detect_paths`` over each block:
  the same per-image function as the local engine, with the next image's decoding and selective search
  overlapping the networks. So the bundle directory and the images must be readable at the same paths on every
  node (a shared filesystem, or copies at the same paths); relative paths are taken from the driver's working
  directory, which each worker enters when its node has it.
- **Results stream back** to the driver as the workers finish them (only paths and JSON records travel, never
  pixels), where ``run_batch`` appends each record to the journal and flushes it. A run stopped at any point
  (Ctrl-C, a lost node, a killed driver) keeps every record it received; ``--resume`` skips those and redoes the
  rest, so nothing is lost or written twice.

Order: a jsonl output (the journal itself) holds the records in the order workers finished them, not input order.
coco and ilsvrc files are written from the journal at the end in input order (``DetectOutput.finish``), so the two
engines write the same files.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

from service.batch import DetectorSpec, Result, detect_paths

INSTALL_HINT = "pip install 'inception-rcnn[ray]' (or: pip install 'ray[data]')"


class RayEngineError(RuntimeError):
    """Ray is missing, the cluster cannot be reached or cannot run the workers, or a worker failed."""


@dataclass(frozen=True)
class RayConfig:
    address: str | None = None  # an existing cluster ("auto", "10.0.0.1:6379", "ray://head:10001"); None: the
    #                             RAY_ADDRESS environment variable if set (Ray's convention), else a local instance
    #                             started for this run and stopped at its end
    workers: int | None = None  # actor pool size; None: as many as the cluster's CPUs (or GPUs) hold
    cpus_per_worker: float = 1.0  # Ray CPUs a worker reserves; Ray sets its torch/OpenMP threads to match
    gpus_per_worker: float = 0.0  # Ray GPUs a worker reserves (0.25: four workers share a GPU); > 0 runs the
    #                               networks on the GPU Ray assigns
    images_per_block: int = 8  # most images per Ray Data block (one worker call; fewer when there are few images
    #                            per worker); a worker streams each record back as soon as it is done
    local_cpus: int | None = None  # local instance only: CPUs Ray may use (None: all of this machine's)
    local_object_store_mb: int = 200  # local instance only: paths and JSON records are all that pass through it

    def __post_init__(self) -> None:
        if self.workers is not None and not 1 <= self.workers <= 100_000:
            raise ValueError(f"Ray workers must be in 1..100000, got {self.workers}")
        if not 0 < self.cpus_per_worker <= 1024:
            raise ValueError(f"CPUs per Ray worker must be in (0, 1024], got {self.cpus_per_worker}")
        if not 0 <= self.gpus_per_worker <= 64:
            raise ValueError(f"GPUs per Ray worker must be in 0..64, got {self.gpus_per_worker}")
        if not 1 <= self.images_per_block <= 4096:
            raise ValueError(f"images per Ray block must be in 1..4096, got {self.images_per_block}")
        if self.local_cpus is not None and not 1 <= self.local_cpus <= 4096:
            raise ValueError(f"CPUs of the local Ray instance must be in 1..4096, got {self.local_cpus}")
        if not 75 <= self.local_object_store_mb <= 1_000_000:  # Ray's own minimum is 75 MB
            raise ValueError(f"object store of the local Ray instance must be 75..1000000 MB, got "
                             f"{self.local_object_store_mb}")


class DetectWorker:
    """One actor of the pool: loads the bundle once, then detects the images of each block it is given.

    ``batch`` is a Ray Data block as numpy columns ``index`` int64 ``[B]`` and ``path`` str ``[B]``. Yields one
    output batch per image, as soon as it is done (``index`` ``[1]`` and ``result``: the ``service.batch.Result`` as
    JSON, without its pixels), which Ray Data sends on as its own block (``RayEngine._run``).
    """

    def __init__(self, spec: DetectorSpec, device: str, cwd: str) -> None:
        if os.path.isdir(cwd):  # relative input paths mean the driver's folder (same path on shared storage)
            os.chdir(cwd)
        self.detector = spec.build(spec.load(device))

    def __call__(self, batch: dict) -> Iterator[dict]:
        results = detect_paths(self.detector, [str(p) for p in batch["path"]])
        for index, result in zip(batch["index"], results):
            yield {"index": [int(index)], "result": [json.dumps(_without_image(result))]}

    def __del__(self) -> None:
        detector = getattr(self, "detector", None)
        if detector is not None:
            detector.close()  # the selective search process; it also exits by itself when the actor dies


class RayEngine:
    """``engine(todo)`` for ``service.batch.run_batch``: ``todo`` (the inputs not in the output yet) -> the
    ``Result`` of each, in the order workers finish them (``Result.image`` is None: pixels stay on the workers).

    ``device`` is the networks' device in the workers: "cpu", or "cuda" for the GPU Ray assigns each worker
    (needs ``gpus_per_worker > 0``).
    """

    def __init__(self, spec: DetectorSpec, config: RayConfig = RayConfig(), device: str = "cpu") -> None:
        if device not in ("cpu", "cuda"):
            raise ValueError(f"--device for --engine ray is cpu or cuda (each worker uses the GPU Ray gives it), "
                             f"got {device!r}")
        if device == "cuda" and config.gpus_per_worker == 0:
            raise ValueError("--device cuda with --engine ray needs --ray-gpus-per-worker > 0, so that Ray gives "
                             "each worker a GPU")
        self.spec, self.config = spec, config
        self.device = "cuda" if config.gpus_per_worker > 0 else device

    def __call__(self, todo: list[Path]) -> Iterator[Result]:
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            self._init(ray)
        try:
            yield from self._run(ray, todo)
        finally:
            if started:
                ray.shutdown()

    def _init(self, ray) -> None:
        cfg = self.config
        address = cfg.address or os.environ.get("RAY_ADDRESS") or None
        try:
            if address is None:
                ray.init(num_cpus=cfg.local_cpus or os.cpu_count() or 1, include_dashboard=False,
                         log_to_driver=False, object_store_memory=cfg.local_object_store_mb * 2**20,
                         logging_level=logging.WARNING)
            else:
                ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            where = "start a local Ray instance" if address is None else f"connect to Ray at {address}"
            raise RayEngineError(f"could not {where}: {e}") from None

    def _layout(self, ray, images: int) -> tuple[int, int]:
        """(actor pool size, images per block) for ``images`` images: the workers the cluster holds (or
        ``workers``), no more than there are images, and blocks small enough that every worker gets several."""
        cfg = self.config
        if cfg.workers is not None:
            fit = cfg.workers
        elif cfg.gpus_per_worker > 0:
            gpus = ray.cluster_resources().get("GPU", 0)
            fit = int(gpus / cfg.gpus_per_worker)
            if fit < 1:
                raise RayEngineError(f"the Ray cluster has {gpus:g} GPUs, fewer than --ray-gpus-per-worker "
                                     f"{cfg.gpus_per_worker:g}")
        else:
            fit = int(ray.cluster_resources().get("CPU", 0) / cfg.cpus_per_worker)
        workers = max(1, min(fit, images))
        return workers, max(1, min(cfg.images_per_block, -(-images // (4 * workers))))

    def _run(self, ray, todo: list[Path]) -> Iterator[Result]:
        import ray.data

        cfg = self.config
        ctx = ray.data.DataContext.get_current()  # this process's; put back as it was at the end
        saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order,
                 ctx.target_max_block_size)
        data_log = logging.getLogger("ray.data")
        saved_level = data_log.level
        data_log.setLevel(logging.ERROR)  # not "progress bars disabled", "execution finished" on every run
        ctx.enable_progress_bars = False  # run_batch draws its own bar
        ctx.print_on_execution_start = False
        ctx.execution_options.preserve_order = False  # records as they finish; the journal needs no order
        # Every output batch (one record) becomes a block of its own and goes to the driver at once, instead of
        # waiting in the worker for 128 MB of records: what an interrupted run keeps is what was done.
        ctx.target_max_block_size = 1
        workers, per_block = self._layout(ray, len(todo))
        rows = [{"index": i, "path": str(p)} for i, p in enumerate(todo)]
        try:
            ds = ray.data.from_items(rows, override_num_blocks=-(-len(todo) // per_block)).map_batches(
                DetectWorker, batch_size=per_block,
                fn_constructor_kwargs={"spec": self.spec, "device": self.device, "cwd": os.getcwd()},
                compute=ray.data.ActorPoolStrategy(size=workers),
                num_cpus=cfg.cpus_per_worker, num_gpus=cfg.gpus_per_worker or None)
            for row in ds.iter_rows():
                result = Result(image=None, **json.loads(row["result"]))
                if result.record["image"] != str(todo[row["index"]]):  # the path it was given, as run_batch keys it
                    raise RayEngineError(f"a worker answered image {result.record['image']!r} for input "
                                         f"{str(todo[row['index']])!r}")
                yield result
        except ray.exceptions.RayError as e:
            raise RayEngineError(
                f"a Ray worker failed ({_last_line(e)}); every node must read the bundle and the images at the same "
                "paths as this one. The records received so far are in the output: fix the cause and run the same "
                "command with --resume") from e
        finally:
            (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.execution_options.preserve_order,
             ctx.target_max_block_size) = saved
            data_log.setLevel(saved_level)


def _without_image(result: Result) -> dict:
    """``Result`` fields but the pixels (the driver reads the file again if it draws ``--save-vis`` copies)."""
    return {f.name: getattr(result, f.name) for f in fields(Result) if f.name != "image"}


def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (ray without the [data] extra has no ray.data)
    except ImportError as e:
        raise RayEngineError(f"--engine ray needs Ray Data ({e}): {INSTALL_HINT}") from None
    return ray


def _last_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:500] if text else type(e).__name__
