"""Service settings, read from the environment (``IRCNN_`` prefix) by pydantic-settings.

Every limit an upload meets is here, so that an operator can see and change them in one place.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from detector.config import DetectConfig
from detector.image import MAX_BYTES, MAX_PIXELS
from detector.runtimes import AUTO, RUNTIMES
from proposals.config import MergeConfig, ProposalConfig


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IRCNN_", extra="ignore", frozen=True)

    model: str | None = Field(None, description="model bundle directory; unset: torchvision's ImageNet GoogLeNet "
                              "(from torchvision's cache, as `ircnn classify` finds it)")
    device: str = Field("cpu", description="cpu or cuda[:N]")
    max_upload_bytes: int = Field(MAX_BYTES, ge=1, le=1 << 30, description="largest accepted image file")
    max_pixels: int = Field(MAX_PIXELS, ge=1, le=1 << 31, description="largest decoded image, width x height; "
                            "checked from the header, before any pixel is decoded")
    max_pixels_in_flight: int = Field(2 * MAX_PIXELS, ge=1, le=1 << 34, description="decoded pixels that the "
                                      "requests being decoded, queued or run may hold together (3 bytes each once "
                                      "decoded, about 8 while decoding); counted from the headers before "
                                      "decoding; beyond it: 503. At least max_pixels")
    max_images: int = Field(16, ge=1, le=256, description="image fields in one multipart request (together "
                            "within max_upload_bytes and max_pixels)")
    upload_timeout_s: float = Field(60.0, gt=0.0, le=3600.0, description="longest time to receive a request "
                                    "body (20 MB in 60 s is 2.8 Mbit/s); slower: 408")
    limit_concurrency: int = Field(128, ge=1, le=100_000, description="uvicorn: a request that arrives while this "
                                   "many connections are open (or requests in progress) gets 503")
    max_header_bytes: int = Field(16 * 1024, ge=1024, le=1 << 20, description="uvicorn (h11): most bytes of "
                                  "unfinished request line and headers buffered per connection; beyond: 400")
    timeout_keep_alive_s: int = Field(5, ge=1, le=3600, description="uvicorn: an idle keep-alive connection is "
                                      "closed after this many seconds")
    queue_size: int = Field(64, ge=1, le=100_000, description="jobs waiting for the networks; beyond it: 503")
    batch_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0, description="how long the worker waits for more "
                                 "requests to batch with the first one")
    max_batch: int = Field(8, ge=1, le=1024, description="requests per batch (1 turns micro-batching off)")
    inference_batch_size: int = Field(32, ge=1, le=1024, description="crops per forward pass of a member")
    precision: Literal["fp32", "bf16", "int8"] = Field("fp32", description="bf16: faster only where bf16 is "
                                                      "native (AMX/AVX-512-BF16 CPUs, GPUs), slower elsewhere; "
                                                      "probabilities differ by ~1e-2; with backend auto it allows "
                                                      "bf16 candidates; int8: the bundle's int8 models (`ircnn "
                                                      "model quantize`) on onnxruntime")
    backend: str = Field("auto", description=f"runtime of the members, one of {', '.join((AUTO,) + tuple(RUNTIMES))}; "
                         "auto: the fastest that matches torch fp32, measured once per member architecture on this "
                         "machine and cached")
    selective_search: bool = Field(ProposalConfig.selective_search, description="detection proposals from "
                                   "coarsened selective search (plus MultiBox when the bundle has one)")
    max_regions: int = Field(MergeConfig.max_proposals, ge=1, le=MergeConfig.max_proposals,
                             description="proposals scored per image by the detector (latency against recall; the "
                             "paper's R-CNN scores about 2000); `ircnn detect --max-regions` is the same dial")
    nms_iou: float = Field(DetectConfig.nms_iou, gt=0.0, le=1.0, description="detection: per-class NMS overlap "
                           "(R-CNN's 0.3); `ircnn detect --nms-iou`")
    coarsen: float | None = Field(None, gt=0.0, le=16.0, description="detection: selective search's Felzenszwalb k "
                                  "and min size multiplier (unset: the paper's 2); `ircnn detect --coarsen`")
    multibox: bool = Field(ProposalConfig.multibox, description="detection: add the bundle's MultiBox boxes to "
                           "the proposals when it has a MultiBox network; `ircnn detect --multibox`")
    scoring: Literal["warped", "shared-trunk"] = Field("warped", description="detection: warped (every region "
                                                       "through the whole networks, the paper's) or shared-trunk "
                                                       "(each member's trunk once per image, faster, a few mAP "
                                                       "points lower); `ircnn detect --scoring`")
    cascade: int | None = Field(None, ge=1, le=10_000, description="detection: score every region with the first "
                                "member and only the N least likely background with the rest; unset: all members "
                                "score every region; `ircnn detect --cascade`")
    whole_objects: Literal["auto", "on", "off"] = Field("auto", description="prefer whole objects over their parts "
                                                        "(agreement of overlapping regions + part suppression); auto: "
                                                        "on for det200-from-cls1000 bundles, off for det200")
    agreement: float = Field(DetectConfig.agreement, ge=0.0, le=4.0, description="whole objects: the power of the "
                             "agreement factor (0: off); `ircnn detect --agreement`")
    context_frames: int = Field(DetectConfig.context_frames, ge=0, le=10_000, description="whole objects: regions "
                                "also scored on their surrounding frame (0: off); `ircnn detect --context-frames`")
    person_evidence: bool = Field(DetectConfig.person_evidence, description="det200-from-cls1000 bundles: clothing "
                                  "only people wear counts for DET person; `ircnn detect --person-evidence`")
    image_context: bool = Field(DetectConfig.image_context, description="weigh each class by the whole image's "
                                "probability of it (10 crops); `ircnn detect --image-context`")
    api_token: SecretStr | None = Field(None, description="when set, every /v1 route needs "
                                        "`Authorization: Bearer <token>`")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a 503 answer")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @model_validator(mode="after")
    def _budget_fits_an_image(self) -> Settings:
        if self.max_pixels_in_flight < self.max_pixels:
            raise ValueError(f"max_pixels_in_flight ({self.max_pixels_in_flight:,}) must be at least max_pixels "
                             f"({self.max_pixels:,}), or the largest accepted image could never be admitted; raise "
                             f"IRCNN_MAX_PIXELS_IN_FLIGHT with IRCNN_MAX_PIXELS")
        return self

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        if backend != AUTO and backend not in RUNTIMES:
            raise ValueError(f"IRCNN_BACKEND must be one of {', '.join((AUTO,) + tuple(RUNTIMES))}, got {backend!r}")
        return backend

    @field_validator("api_token")
    @classmethod
    def _token_not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty secret equals the empty credentials of a request without a header: it would open the API.
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("IRCNN_API_TOKEN is set but empty or whitespace; set a real token, or unset the "
                             "variable to serve without one")
        return token
