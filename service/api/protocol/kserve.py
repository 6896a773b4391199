"""Request and response bodies of the KServe v2 / Open Inference Protocol (``/v2``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from service.api.protocol.native import MAX_K, Int

KSERVE_DEFAULT_K = 5
KSERVE_MAX_K = MAX_K


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] | None = None


class _StrictRequest(BaseModel):
    # Strict types (a shape of ["3"] or [true] is an error, not [3] / [1]); integral floats count.
    model_config = ConfigDict(strict=True)


class InferInputTensor(_StrictRequest):
    name: str
    shape: list[Int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: Any = None


class InferRequestedOutput(_StrictRequest):
    name: str
    parameters: dict[str, Any] | None = None


class InferRequest(_StrictRequest):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferInputTensor] = Field(min_length=1)
    outputs: list[InferRequestedOutput] | None = None


class InferOutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = None


class InferResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    model_version: str
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferOutputTensor]
