"""Service settings, read from the environment (``IRCNN_`` prefix) by pydantic-settings.

Every limit an upload meets is here, so that an operator can see and change them in one place.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from detector.image import MAX_BYTES, MAX_PIXELS


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IRCNN_", extra="ignore", frozen=True)

    model: str | None = Field(None, description="model bundle directory; unset: torchvision's ImageNet GoogLeNet "
                              "(from torchvision's cache, as `ircnn classify` finds it)")
    device: str = Field("cpu", description="cpu or cuda[:N]")
    max_upload_bytes: int = Field(MAX_BYTES, ge=1, le=1 << 30, description="largest accepted image file")
    max_pixels: int = Field(MAX_PIXELS, ge=1, le=1 << 31, description="largest decoded image, width x height; "
                            "checked from the header, before any pixel is decoded")
    queue_size: int = Field(64, ge=1, le=100_000, description="jobs waiting for the networks; beyond it: 503")
    batch_wait_ms: float = Field(5.0, ge=0.0, le=10_000.0, description="how long the worker waits for more "
                                 "requests to batch with the first one")
    max_batch: int = Field(8, ge=1, le=1024, description="requests per batch (1 turns micro-batching off)")
    inference_batch_size: int = Field(32, ge=1, le=1024, description="crops per forward pass of a member")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: faster on CPUs with AMX/AVX-512-BF16 "
                                              "and on GPUs; probabilities differ by ~1e-2")
    backend: Literal["torch", "onnxruntime", "openvino"] = Field("torch", description="inference engine of the "
                                                                  "members (detector/backends.py)")
    selective_search: bool = Field(True, description="detection proposals from coarsened selective search "
                                   "(plus MultiBox when the bundle has one)")
    max_regions: int = Field(3000, ge=1, le=3000, description="proposals scored per image by the detector "
                             "(latency against recall; the paper's R-CNN scores about 2000)")
    api_token: SecretStr | None = Field(None, description="when set, every /v1 route needs "
                                        "`Authorization: Bearer <token>`")
    retry_after_s: int = Field(1, ge=1, le=3600, description="Retry-After of a 503 answer")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @field_validator("api_token")
    @classmethod
    def _token_not_blank(cls, token: SecretStr | None) -> SecretStr | None:
        # An empty secret equals the empty credentials of a request without a header: it would open the API.
        if token is not None and not token.get_secret_value().strip():
            raise ValueError("IRCNN_API_TOKEN is set but empty or whitespace; set a real token, or unset the "
                             "variable to serve without one")
        return token
