"""The app's state and the worker thread's side: the models, loaded once, and the functions that run one batch
of classify or detect jobs on them (``MicroBatcher``'s handlers)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import anyio
import numpy as np
import torch

from detector.pipeline.classify import Classifier
from service.api.errors import NON_FINITE, ModelOutputError
from service.batching import Job, MicroBatcher
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("ircnn.service")

DECODE_THREADS = 4  # concurrent decodes: each may hold a max_pixels image, so this bounds memory too
MAX_DETECTIONS = 1000  # the loaded detector's cap per image; a request asks for its max_detections best of them


@dataclass
class ClassifyJob:
    image: np.ndarray  # uint8 [H, W, 3]
    crops: int
    top_k: int


@dataclass
class DetectJob:
    image: np.ndarray  # uint8 [H, W, 3]
    score_threshold: float
    max_detections: int


class Service:
    """The app's state: settings, models (loaded once), the batcher whose thread owns them, the decoded pixels
    that requests hold (touched on the event loop only), metrics."""

    def __init__(self, settings: Settings, classifier: Classifier | None = None, detector=None) -> None:
        self.settings = settings
        self.classifier = classifier
        self.detector = detector
        self.bundle = None  # the loaded Bundle, for /v1/models and the model_info metric
        self.metrics = Metrics()
        self.batcher = MicroBatcher({"classify": self._classify_batch, "detect": self._detect_batch},
                                    queue_size=settings.queue_size, max_batch=settings.max_batch,
                                    batch_wait_ms=settings.batch_wait_ms, observer=self.metrics)
        self.metrics.watch(self.batcher)
        self.decode_limiter = anyio.CapacityLimiter(DECODE_THREADS)
        self.pixels_in_flight = 0
        self.metrics.pixels_in_flight.set_function(lambda: self.pixels_in_flight)

    # -- lifecycle (lifespan) --

    def load(self) -> None:
        """Load the bundle unless models were injected; runs once, in a thread, before the app takes requests."""
        if self.classifier is None and self.detector is None:
            from detector.bundle.importers import resolve_bundle
            from detector.pipeline.ensemble import EnsembleConfig

            self.bundle = bundle = resolve_bundle(self.settings.model, device=self.settings.device)
            s = self.settings
            ensemble = EnsembleConfig(batch_size=s.inference_batch_size, precision=s.precision, backend=s.backend)
            why = {}
            try:
                self.classifier = Classifier(bundle, ensemble)
            except ValueError as e:  # e.g. a det200 bundle: no 1000-way head
                why["classify"] = str(e)
                log.info("classification off: %s", e)
            self.detector = _detector_of(bundle, ensemble, self.settings, why)
            if self.classifier is None and self.detector is None:  # say why, whole, where the user looks
                raise ValueError("the model bundle can neither classify nor detect: " + "; ".join(
                    f"{task}: {reason}" for task, reason in why.items()))
        if self.classifier is None and self.detector is None:
            raise ValueError("the service has neither a classifier nor a detector")
        if self.bundle is None:  # injected models: the classifier knows its bundle
            self.bundle = getattr(self.classifier, "bundle", None) or getattr(self.detector, "bundle", None)
        info = self.bundle.describe() if self.bundle is not None else {}
        arch = info.get("arch", {})
        archs = arch if isinstance(arch, list) else [arch]  # one object, or one per member (a mixed ensemble)
        variants = ",".join(dict.fromkeys(str(a.get("variant")) for a in archs))  # each once, in member order
        # No bundle path here: /metrics is open to scrapers, /v1/models (behind the token) names it.
        self.metrics.model_info.info({"task": str(info.get("task")), "members": str(info.get("members")),
                                      "variant": variants,
                                      "serves": ",".join(self.serves())})

    def serves(self) -> list[str]:
        return [name for name, part in (("classify", self.classifier), ("detect", self.detector)) if part]

    def warmup(self) -> None:
        """One forward per model on a synthetic image, in the worker thread (first-call allocations, the
        selective search process start) so that /readyz means a request will not pay for them; an error here
        (e.g. non-finite output) keeps /readyz failing."""
        y, x = np.mgrid[0:96, 0:128]
        image = np.stack([x * 2, y * 2, np.full_like(x, 128)], axis=-1).astype(np.uint8)  # smooth: noise would
        image[30:60, 40:90] = (200, 40, 40)  # make selective search slow for nothing
        results = []
        if self.classifier is not None:
            results += self._classify_batch([Job("classify", ClassifyJob(image, 1, 1))])
        if self.detector is not None:
            results += self._detect_batch([Job("detect", DetectJob(image, 1.0, 1))])
            # NMS drops NaN scores silently, so look at the scores of one region before it (test doubles may have
            # no scorer)
            scorer = getattr(self.detector, "scorer", None)
            if scorer is not None and not torch.isfinite(scorer(image, torch.tensor([[0.0, 0.0, 128.0, 96.0]]))).all():
                raise ModelOutputError(NON_FINITE)
        for result in results:
            if isinstance(result, Exception):
                raise result

    def close(self) -> None:
        self.batcher.stop()
        close = getattr(self.detector, "close", None)
        if close is not None:
            close()

    # -- worker thread: one batch of jobs -> one result each --

    def _classify_batch(self, jobs: list[Job]) -> list[dict | Exception]:
        """All jobs with the same crop count go through the ensemble in one forward."""
        clf = self.classifier
        out: list[dict | Exception | None] = [None] * len(jobs)
        by_crops: dict[int, list[int]] = {}
        for i, job in enumerate(jobs):
            by_crops.setdefault(job.payload.crops, []).append(i)
        for crops, rows in by_crops.items():
            start = time.perf_counter()
            probs = clf.probabilities([jobs[i].payload.image for i in rows], crops)  # [len(rows), K]
            seconds = time.perf_counter() - start
            finite = torch.isfinite(probs).all(dim=1)  # [len(rows)]
            for r, i in enumerate(rows):
                self.metrics.stage.labels("classify", "network").observe(seconds)
                if not finite[r]:
                    out[i] = ModelOutputError(NON_FINITE)
                    continue
                top = clf.top_k(probs[r:r + 1], jobs[i].payload.top_k)[0]
                out[i] = {"crops": crops, "members": clf.members, "top_k": top}
        return out

    def _detect_batch(self, jobs: list[Job]) -> list[list[dict] | Exception]:
        """The batch's images through ``Detector.detect_many``, the path ``ircnn detect`` and Ray take too (the
        next image proposed while the networks score this one). An image's own problem (``ImageError``,
        ``ProposalError``) is its answer alone; any other error is a bug, answered 500."""
        out: list[list[dict] | Exception] = []
        for job, result in zip(jobs, self.detector.detect_many([job.payload.image for job in jobs])):
            p: DetectJob = job.payload
            if result.error is not None:
                out.append(result.error)
                continue
            dets = result.detections
            if not torch.isfinite(dets.scores).all():
                out.append(ModelOutputError(NON_FINITE))
                continue
            for stage, seconds in result.seconds.items():
                self.metrics.stage.labels("detect", stage).observe(seconds)
            keep = (dets.scores >= p.score_threshold).nonzero().flatten()[: p.max_detections]  # best first
            dets = replace(dets, boxes=dets.boxes[keep], scores=dets.scores[keep], det_ids=dets.det_ids[keep])
            out.append(dets.to_json())
        return out


def _detector_of(bundle, ensemble, settings: Settings, why: dict | None = None):
    """A Detector for det200 / det200-from-cls1000 bundles, else None (that bundle only classifies; the reason
    goes into ``why["detect"]``)."""
    from detector.config import detect_config
    from detector.pipeline.detector import Detector

    s = settings
    try:
        config = detect_config(device=s.device, backend=ensemble.backend, precision=ensemble.precision,
                               batch_size=ensemble.batch_size, scoring=s.scoring,
                               selective_search=s.selective_search, coarsen=s.coarsen, multibox=s.multibox,
                               max_detections=MAX_DETECTIONS, nms_iou=s.nms_iou, max_regions=s.max_regions,
                               cascade_top_k=s.cascade, whole_objects=s.whole_objects, agreement=s.agreement,
                               context_frames=s.context_frames, person_evidence=s.person_evidence,
                               image_context=s.image_context)
        return Detector.from_bundle(bundle, config)
    except ValueError as e:
        log.info("detection off: %s", e)
        if why is not None:
            why["detect"] = str(e)
        return None
