"""The response models: the OpenAPI schema of every route and its examples."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable reason, e.g. not_an_image, too_large, queue_full")
    message: str = Field(description="what went wrong and what to do, for people")


class ErrorResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"error": {"code": "not_an_image", "message": "not a supported image (JPEG, PNG, WebP, BMP or TIFF "
                   "expected)"}}]})
    error: ErrorDetail


class ClassPrediction(BaseModel):
    index: int = Field(description="row of the network's output (0..999 for ILSVRC's classes)")
    wnid: str
    name: str
    prob: float = Field(description="softmax probability averaged over crops and ensemble members")


class ClassifyResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"image": "cat.jpg", "width": 500, "height": 375, "crops": 10, "members": 1,
         "top_k": [{"index": 281, "wnid": "n02123045", "name": "tabby", "prob": 0.61},
                   {"index": 282, "wnid": "n02123159", "name": "tiger cat", "prob": 0.22}]}]})
    image: str | None = Field(None, description="the uploaded file's name (multipart), else null")
    width: int
    height: int
    crops: int
    members: int
    top_k: list[ClassPrediction]


class FailedImage(BaseModel):
    image: str | None = Field(None, description="the uploaded file's name")
    status: int = Field(description="the HTTP status a request with this image alone would have got")
    error: ErrorDetail


class ClassifyResults(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [
        {"image": "cat.jpg", "width": 500, "height": 375, "crops": 1, "members": 1,
         "top_k": [{"index": 281, "wnid": "n02123045", "name": "tabby", "prob": 0.61}]},
        {"image": "notes.txt", "status": 415, "error": {"code": "not_an_image", "message": "not a supported image "
                                                        "(JPEG, PNG, WebP, BMP or TIFF expected)"}}]}]})
    results: list[ClassifyResponse | FailedImage] = Field(description="one per `image` field, in the order sent")


class Detection(BaseModel):
    box: list[float] = Field(min_length=4, max_length=4, description="x1, y1, x2, y2 in pixels of the image")
    det_id: int = Field(description="ILSVRC DET class id, 1..200")
    wnid: str
    name: str
    score: float


class DetectResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"image": "birds.jpg", "width": 640, "height": 480, "detections": [
            {"box": [12.0, 40.5, 230.0, 310.0], "det_id": 26, "wnid": "n01503061", "name": "bird", "score": 0.91}]}]})
    image: str | None = Field(None, description="the uploaded file's name (multipart), else null")
    width: int
    height: int
    detections: list[Detection]


class DetectResults(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"results": [
        {"image": "birds.jpg", "width": 640, "height": 480, "detections": [
            {"box": [12.0, 40.5, 230.0, 310.0], "det_id": 26, "wnid": "n01503061", "name": "bird", "score": 0.91}]},
        {"image": "half.jpg", "status": 400, "error": {"code": "truncated", "message": "image data is truncated: "
                                                       "Corrupt JPEG data: premature end of data segment"}}]}]})
    results: list[DetectResponse | FailedImage] = Field(description="one per `image` field, in the order sent")


class ModelInfo(BaseModel):
    task: str = Field(description="cls1000, det200, det200-from-cls1000 or classes")
    serves: list[str] = Field(description="the /v1 routes this bundle answers")
    members: int
    classes: int
    arch: dict[str, Any] | list[dict[str, Any]] = Field(description="one object for all members, or one per member")
    preprocess: dict[str, Any]
    member_sizes: list[int] = Field(description="each member's input side in px, in member order")
    multibox: str | None
    provenance: dict[str, Any]
    path: str | None


class ModelsResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"models": [
        {"task": "cls1000", "serves": ["classify", "detect"], "members": 1, "classes": 1000,
         "arch": {"variant": "torchvision", "width": 1.0, "num_classes": 1000, "aux_logits": False},
         "preprocess": {"size": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
         "member_sizes": [224], "multibox": None, "provenance": {"source": "torchvision"}, "path": None}]}]})
    models: list[ModelInfo]


class HealthResponse(BaseModel):
    status: str = "ok"


class ReadyResponse(BaseModel):
    ready: bool
    detail: str = Field(description="warming up, ready, or why not")
    queue_depth: int
