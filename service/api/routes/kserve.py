"""KServe v2 / Open Inference Protocol under ``/v2`` (what ``tritonclient.http`` and KServe speak).

Health, server and model metadata, readiness, and inference: the input is a ``BYTES`` tensor of
texts (any name; ``text`` by convention) of shape ``[N]`` or ``[N, 1]``; a request parameter ``k``
(default 5, 1..100) picks how many words come back; boolean parameters ``filter`` and
``corrections`` (default true) are /v1/predict's fields. Outputs, shape ``[N, k]``: ``words``
(``BYTES``, the model words, most likely first) and ``probabilities`` (``FP32``), with /v1/predict's
keyboard semantics (text ending inside a word asks for completions of it). Two more outputs are
returned when the request names them (so existing clients get the tensors they expect):
``display`` (``BYTES``, each word as written here, /v1/predict's ``display``) and ``correction``
(``BOOL``, offered as a typo correction). A row with fewer than ``k`` eligible words (a rare
prefix) is padded with ``""``, ``0.0`` and ``false`` so the tensor stays rectangular.

Both JSON tensor data and the *binary tensor data* extension are supported, in both directions
(``tritonclient.http`` sends and asks for binary by default): a request body may be a JSON header of
``Inference-Header-Content-Length`` bytes followed by the raw tensors (inputs with
``parameters.binary_data_size``); outputs are returned binary when the request asks
(``parameters.binary_data_output`` or an output's ``parameters.binary_data``).

Sequences (Triton's sequence extension): request parameters ``sequence_id`` (a positive integer
or a string), ``sequence_start`` and ``sequence_end`` map onto a server-held session
(``/v1/sessions``), so each request of a sequence carries only the new text (one text, shape
``[1]``) and costs one batched recurrent step for it, never a re-read of the history. The answer is
what ``/v1/predict`` would give for the sequence's whole text so far. ``sequence_start`` begins
(or restarts) the sequence on the request's model version; ``sequence_end`` ends it after
answering; a sequence left idle ends after ``NEXTWORD_SESSION_TTL_SECONDS``, and continuing an
unknown or ended one is a 400. The id is scoped by model name.

Not supported, and rejected with 400 rather than silently ignored: shared-memory tensors and
classification outputs. ``priority`` and ``timeout`` are accepted and ignored.
Errors are ``{"error": "<message>"}`` (see ``service/api/errors.py``).
"""

from __future__ import annotations

import contextlib
import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from service.api.access import principal
from service.api.body import BinaryBodyRoute, json_too_deep
from service.api.deps import PredictorDep, RepositoryDep, SessionsDep, SettingsDep
from service.api.limits import check_batch_items
from service.api.protocol.kserve import (
    KSERVE_DEFAULT_K,
    KSERVE_MAX_K,
    InferOutputTensor,
    InferRequest,
    InferResponse,
    ModelMetadata,
    ServerMetadata,
    TensorMetadata,
)
from service.api.protocol.native import integral
from service.config import Settings
from service.engine import LoadedVersion, ModelRepository, Prediction, Predictor, PredictQuery, SuggestOptions
from service.engine.errors import InvalidInputError, ModelNotFoundError, VersionNotFoundError
from service.sessions import SessionManager, SessionResult
from service.sessions.errors import SessionExpiredError, SessionNotFoundError

router = APIRouter(prefix="/v2", tags=["kserve-v2"], route_class=BinaryBodyRoute)

SERVER_NAME = "nextword"
EXTENSIONS = ["binary_tensor_data", "sequence"]
PLATFORM = "onnxruntime_onnx"
HEADER_LENGTH = "Inference-Header-Content-Length"
WORDS = "words"
PROBABILITIES = "probabilities"
DISPLAY = "display"
CORRECTION = "correction"
INPUTS = [TensorMetadata(name="text", datatype="BYTES", shape=[-1])]
OUTPUTS = [TensorMetadata(name=WORDS, datatype="BYTES", shape=[-1, -1]),
           TensorMetadata(name=PROBABILITIES, datatype="FP32", shape=[-1, -1]),
           TensorMetadata(name=DISPLAY, datatype="BYTES", shape=[-1, -1]),
           TensorMetadata(name=CORRECTION, datatype="BOOL", shape=[-1, -1])]
DATATYPES = {o.name: o.datatype for o in OUTPUTS}
MAX_SEQUENCE_ID_CHARS = 256
_ERROR = {"content": {"application/json": {"example": {"error": "model 'x' is not loaded"}}}}


class KServeInputError(InvalidInputError):
    """A malformed inference request (answered 400 ``{"error": ...}``)."""


# --- health and metadata --------------------------------------------------------------------------


@router.get("", response_model=ServerMetadata)
async def server_metadata(request: Request) -> ServerMetadata:
    return ServerMetadata(name=SERVER_NAME, version=request.app.version, extensions=EXTENSIONS)


@router.get("/health/live")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/health/ready", responses={400: {"description": "Not ready (no model loaded)"}})
async def server_ready(request: Request) -> JSONResponse:
    """200 when a model can answer and the process is not draining (service/api/shutdown.py); 400
    otherwise (the protocol's "4xx means false")."""
    engine = request.app.state.engine
    ready = engine.started and engine.repository.ready and not request.app.state.drain.draining
    return JSONResponse({"ready": ready}, status_code=200 if ready else 400)


def _resolve(repository: ModelRepository, name: str, version: str | None) -> LoadedVersion:
    if version is None:
        return repository.resolve(name)
    if not version.isdigit() or int(version) < 1:
        raise VersionNotFoundError(name, 0, f"{version!r} is not a version number")
    return repository.resolve(name, int(version))


def _metadata(repository: ModelRepository, lv: LoadedVersion, version: str | None) -> ModelMetadata:
    if version is None:
        versions = [str(info.version) for info in repository.status(lv.name).get(lv.name, [])
                    if info.status != "failed"]
    else:
        versions = [str(lv.version)]
    return ModelMetadata(name=lv.name, versions=versions, platform=PLATFORM, inputs=INPUTS, outputs=OUTPUTS,
                         parameters={"k": {"default": KSERVE_DEFAULT_K, "max": KSERVE_MAX_K},
                                     "filter": {"default": True}, "corrections": {"default": True}})


@router.get("/models/{name}", response_model=ModelMetadata, responses={404: _ERROR})
async def model_metadata(name: str, repository: RepositoryDep) -> ModelMetadata:
    return _metadata(repository, _resolve(repository, name, None), None)


@router.get("/models/{name}/versions/{version}", response_model=ModelMetadata, responses={404: _ERROR})
async def model_version_metadata(name: str, version: str, repository: RepositoryDep) -> ModelMetadata:
    return _metadata(repository, _resolve(repository, name, version), version)


def _ready(repository: ModelRepository, name: str, version: str | None) -> JSONResponse:
    """200 when ready; 400 for a version that exists but failed to load; 404 for a model or
    version there is no such thing as (any non-200 is "not ready" to tritonclient)."""
    try:
        lv = _resolve(repository, name, version)
    except ModelNotFoundError:
        return JSONResponse({"name": name, "ready": False}, status_code=404)
    except VersionNotFoundError as exc:
        failed = any(info.version == exc.version and info.status == "failed"
                     for info in repository.status(name).get(name, []))
        return JSONResponse({"name": name, "ready": False}, status_code=400 if failed else 404)
    return JSONResponse({"name": lv.name, "ready": True})


_READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "Not ready (the version failed to load)"},
    404: {"description": "No such model or version (not ready)"},
}


@router.get("/models/{name}/ready", responses=_READY_RESPONSES)
async def model_ready(name: str, repository: RepositoryDep) -> JSONResponse:
    return _ready(repository, name, None)


@router.get("/models/{name}/versions/{version}/ready", responses=_READY_RESPONSES)
async def model_version_ready(name: str, version: str, repository: RepositoryDep) -> JSONResponse:
    return _ready(repository, name, version)


# --- inference ------------------------------------------------------------------------------------


def _split_body(request: Request, body: bytes) -> tuple[dict[str, Any], bytes]:
    header = request.headers.get(HEADER_LENGTH)
    if header is None:
        json_part, binary = body, b""
    else:
        if not header.isdigit() or int(header) > len(body):
            raise KServeInputError(f"{HEADER_LENGTH} {header!r} does not fit a body of {len(body)} bytes")
        json_part, binary = body[: int(header)], body[int(header):]
    too_deep = json_too_deep(json_part)
    if too_deep:
        raise KServeInputError(f"the inference request header is not valid: {too_deep}")
    try:
        document = json.loads(json_part.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise KServeInputError(f"the inference request header is not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise KServeInputError("the inference request must be a JSON object")
    return document, binary


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item))
    return out


def _decode_bytes_tensor(raw: bytes, name: str) -> list[bytes]:
    """The binary BYTES layout: each element a little-endian uint32 length, then its bytes."""
    items, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise KServeInputError(f"input {name!r}: truncated BYTES element length")
        (size,) = struct.unpack_from("<I", raw, at)
        at += 4
        if at + size > len(raw):
            raise KServeInputError(f"input {name!r}: BYTES element longer than the data")
        items.append(raw[at: at + size])
        at += size
    return items


def _texts(request_doc: InferRequest, binary: bytes) -> list[str]:
    """The texts of the single BYTES input, from JSON data or the binary section."""
    if len(request_doc.inputs) != 1:
        names = [t.name for t in request_doc.inputs]
        raise KServeInputError(f"expected exactly one input (a BYTES tensor of texts), got {names}")
    tensor = request_doc.inputs[0]
    params = tensor.parameters or {}
    if tensor.datatype != "BYTES":
        raise KServeInputError(f"input {tensor.name!r} must have datatype BYTES, not {tensor.datatype}")
    if not (len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)) or tensor.shape[0] < 0:
        raise KServeInputError(f"input {tensor.name!r} must have shape [N] or [N, 1], not {tensor.shape}")
    if "shared_memory_region" in params:
        raise KServeInputError("shared-memory tensors are not supported")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or size < 0 or size != len(binary):
            raise KServeInputError(f"input {tensor.name!r}: binary_data_size {size} but {len(binary)} bytes follow")
        raw_items = _decode_bytes_tensor(binary, tensor.name)
        try:
            texts = [item.decode("utf-8") for item in raw_items]
        except UnicodeDecodeError:
            raise KServeInputError(f"input {tensor.name!r}: texts must be UTF-8") from None
    else:
        if binary:
            raise KServeInputError("binary data follows the header but no input declares binary_data_size")
        if tensor.data is None:
            raise KServeInputError(f"input {tensor.name!r} has no data")
        texts = _flatten(tensor.data)
        if not all(isinstance(t, str) for t in texts):
            raise KServeInputError(f"input {tensor.name!r}: BYTES data must be strings")
    if len(texts) != tensor.shape[0]:
        raise KServeInputError(f"input {tensor.name!r}: shape {tensor.shape} but {len(texts)} elements")
    return texts


def _k(request_doc: InferRequest) -> int:
    params = request_doc.parameters or {}
    k = integral(params.get("k", KSERVE_DEFAULT_K))
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= KSERVE_MAX_K:
        raise KServeInputError(f"parameter k must be an integer between 1 and {KSERVE_MAX_K}")
    return k


def _options(request_doc: InferRequest) -> SuggestOptions:
    params = request_doc.parameters or {}
    values = {}
    for name in ("filter", "corrections"):
        value = params.get(name, True)
        if not isinstance(value, bool):
            raise KServeInputError(f"parameter {name} must be a boolean")
        values[name] = value
    return SuggestOptions(**values)


@dataclass(frozen=True)
class SequenceStep:
    id: int | str
    start: bool
    end: bool


def _sequence(request_doc: InferRequest) -> SequenceStep | None:
    """The request's place in a sequence, or None for a stateless request (``sequence_id`` absent,
    0 or "", as Triton's clients send when there is no sequence)."""
    params = request_doc.parameters or {}
    seq = integral(params.get("sequence_id"))
    start, end = params.get("sequence_start", False), params.get("sequence_end", False)
    for name, value in (("sequence_start", start), ("sequence_end", end)):
        if not isinstance(value, bool):
            raise KServeInputError(f"parameter {name} must be a boolean")
    if seq is None or (seq in (0, "") and not isinstance(seq, bool)):  # false is not 0: a bool is refused
        if start or end:
            raise KServeInputError("sequence_start and sequence_end need a sequence_id")
        return None
    valid = (isinstance(seq, int) and not isinstance(seq, bool) and 0 < seq < 2**64) or (
        isinstance(seq, str) and len(seq) <= MAX_SEQUENCE_ID_CHARS
    )
    if not valid:
        raise KServeInputError(
            f"parameter sequence_id must be a positive 64-bit integer or a string of at most "
            f"{MAX_SEQUENCE_ID_CHARS} characters"
        )
    return SequenceStep(seq, start, end)


async def sequence_session_id(sessions: SessionManager, model: str, sequence_id: int | str, owner: str = "") -> str:
    """The session behind a sequence, keyed by the model name and the client's id (integer 5 and
    string "5" are different sequences, as in Triton), and the API key (``owner``: each key has its
    own sequence ids). It is an HMAC under the server's secret: a plain hash of these public
    values let anyone read or delete another client's sequence."""
    return await sessions.derived_id("kserve-", owner, model, type(sequence_id).__name__, str(sequence_id))


_GONE = (SessionNotFoundError, SessionExpiredError)


async def _sequence_step(sessions: SessionManager, lv: LoadedVersion, step: SequenceStep, text: str,
                         k: int, owner: str, options: SuggestOptions) -> SessionResult:
    sid = await sequence_session_id(sessions, lv.name, step.id, owner)
    if step.start:
        with contextlib.suppress(*_GONE):  # a restart replaces the old sequence
            await sessions.delete(sid)
        result = await sessions.create(lv.name, lv.version, text, k, session_id=sid, owner=owner, options=options)
    else:
        try:
            result = await sessions.update(sid, text=text, k=k, transport="kserve", owner=owner,
                                           filter=options.filter, corrections=options.corrections)
        except _GONE:
            raise KServeInputError(
                f"sequence {step.id!r} is not active for model {lv.name!r}: start it with sequence_start=true "
                "(an idle sequence ends after NEXTWORD_SESSION_TTL_SECONDS)"
            ) from None
    if step.end:
        with contextlib.suppress(*_GONE):
            await sessions.delete(sid)
    return result


def _wanted_outputs(request_doc: InferRequest) -> list[tuple[str, bool]]:
    """``(name, binary)`` for each output to return, in order."""
    default_binary = bool((request_doc.parameters or {}).get("binary_data_output", False))
    if not request_doc.outputs:
        return [(WORDS, default_binary), (PROBABILITIES, default_binary)]
    wanted = []
    for out in request_doc.outputs:
        params = out.parameters or {}
        if out.name not in DATATYPES:
            raise KServeInputError(f"unknown output {out.name!r}; the outputs are {', '.join(DATATYPES)}")
        if params.get("classification"):
            raise KServeInputError("classification outputs are not supported")
        if "shared_memory_region" in params:
            raise KServeInputError("shared-memory tensors are not supported")
        wanted.append((out.name, bool(params.get("binary_data", default_binary))))
    return wanted


def _encode_bytes_tensor(values: list[str]) -> bytes:
    parts = []
    for value in values:
        data = value.encode("utf-8")
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


async def _infer(request: Request, name: str, version: str | None, predictor: Predictor,
                 settings: Settings, sessions: SessionManager) -> Response:
    body = await request.body()
    document, binary = _split_body(request, body)
    try:
        request_doc = InferRequest.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        raise KServeInputError(f"invalid inference request: {where}: {first.get('msg')}") from None
    k = _k(request_doc)
    options = _options(request_doc)
    sequence = _sequence(request_doc)
    wanted = _wanted_outputs(request_doc)
    texts = _texts(request_doc, binary)
    check_batch_items(len(texts), settings, "texts", None)
    lv = _resolve(predictor.repository, name, version)  # an unknown model or version: 404 before any work
    # Only a version the client named is pinned: one resolved here may be swapped out before the
    # work is submitted, and the swap retry (service/engine/swap.py) must then find its successor.
    pinned = None if version is None else lv.version
    served = lv.version
    predictions: list[Prediction] | list[SessionResult]
    if sequence is not None:
        if len(texts) != 1:
            raise KServeInputError(f"a sequence request carries exactly one text (shape [1]), got {len(texts)}")
        step = await _sequence_step(sessions, lv, sequence, texts[0], k, principal(request.scope), options)
        predictions, served = [step], step.record.version
    elif texts:
        predictions = await predictor.predict_many(
            [PredictQuery(t, k, lv.name, pinned, options=options) for t in texts],
            item_field=request_doc.inputs[0].name,
        )
        served = predictions[0].version
    else:
        predictions = []
    probs = np.zeros((len(texts), k), dtype=np.float32)
    fixes = np.zeros((len(texts), k), dtype=bool)
    for i, p in enumerate(predictions):
        probs[i, : len(p.candidates)] = [c.probability for c in p.candidates]
        fixes[i, : len(p.candidates)] = [c.correction for c in p.candidates]

    def strings(attr: str) -> list[str]:
        padded = ([getattr(c, attr) for c in p.candidates] + [""] * (k - len(p.candidates)) for p in predictions)
        return [s for row in padded for s in row]

    outputs: list[InferOutputTensor] = []
    chunks: list[bytes] = []
    for out_name, as_binary in wanted:
        shape = [len(texts), k]
        datatype = DATATYPES[out_name]
        if out_name in (WORDS, DISPLAY):
            values: list[Any] = strings("word" if out_name == WORDS else "display")
            raw = _encode_bytes_tensor(values) if as_binary else b""
        elif out_name == PROBABILITIES:
            values = [float(x) for x in probs.reshape(-1)]
            raw = probs.astype("<f4").tobytes()
        else:
            values = [bool(x) for x in fixes.reshape(-1)]
            raw = fixes.astype(np.uint8).tobytes()  # BOOL: one byte per element
        if as_binary:
            chunks.append(raw)
            outputs.append(InferOutputTensor(name=out_name, shape=shape, datatype=datatype,
                                             parameters={"binary_data_size": len(raw)}))
        else:
            outputs.append(InferOutputTensor(name=out_name, shape=shape, datatype=datatype, data=values))
    response = InferResponse(model_name=lv.name, model_version=str(served), id=request_doc.id, outputs=outputs)
    header = response.model_dump_json(exclude_none=True).encode("utf-8")
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(header + b"".join(chunks), media_type="application/octet-stream",
                    headers={HEADER_LENGTH: str(len(header))})


_TEXTS: dict[str, Any] = {"type": "array", "items": {"type": "string"}}
# The JSON inference request as this server reads it: the protocol's InferRequest narrowed to what
# is served (one BYTES input of shape [N] or [N, 1], the two outputs, the parameters it reads).
# Not stated here (a schema cannot): shape[0] is the number of texts in data, and sequence_start /
# sequence_end need a sequence_id.
_INFER_REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "id": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        "parameters": {"anyOf": [{"type": "null"}, {
            "type": "object",
            "properties": {
                "k": {"type": "integer", "minimum": 1, "maximum": KSERVE_MAX_K, "default": KSERVE_DEFAULT_K},
                "sequence_id": {"anyOf": [  # 0, "" or null: no sequence
                    {"type": "integer", "minimum": 0, "maximum": 2**64 - 1},
                    {"type": "string", "maxLength": MAX_SEQUENCE_ID_CHARS},
                    {"type": "null"},
                ]},
                "sequence_start": {"type": "boolean"},
                "sequence_end": {"type": "boolean"},
            },
        }]},
        "inputs": {"type": "array", "minItems": 1, "maxItems": 1, "items": {
            "type": "object",
            "required": ["name", "shape", "datatype", "data"],
            "properties": {
                "name": {"type": "string"},
                "datatype": {"const": "BYTES"},
                "shape": {"type": "array", "minItems": 1, "prefixItems": [  # [N] or [N, 1]
                    {"type": "integer", "minimum": 0}, {"const": 1},
                ], "items": False},
                "data": {"anyOf": [
                    {"type": "string"}, {"type": "array", "items": {"anyOf": [{"type": "string"}, _TEXTS]}},
                ]},
                "parameters": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            },
        }},
        "outputs": {"anyOf": [{"type": "null"}, {"type": "array", "items": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"enum": [WORDS, PROBABILITIES]},
                "parameters": {"anyOf": [{"type": "object"}, {"type": "null"}]},
            },
        }}]},
    },
}
_INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        # The binary tensor extension (application/octet-stream: a JSON header, then raw tensors)
        # is described here rather than listed as a media type: its schema would be "any bytes",
        # which documents nothing and lets a client generated from the document send garbage.
        "description": "An inference request (JSON). With the binary tensor data extension the body is "
        f"instead application/octet-stream: this JSON, {HEADER_LENGTH} bytes long (that header gives "
        "the length), followed by the raw tensors.",
        "content": {
            "application/json": {
                "schema": _INFER_REQUEST_SCHEMA,
                "example": {
                    "id": "1", "parameters": {"k": 3},
                    "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["the quick ", "the qu"]}],
                },
            },
        },
    }
}
_INFER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"model": InferResponse, "description": "Inference response (binary tensors appended when requested)"},
    400: _ERROR, 404: _ERROR, 413: _ERROR, 503: _ERROR, 504: _ERROR,
}


@router.post("/models/{name}/infer", openapi_extra=_INFER_DOC, responses=_INFER_RESPONSES)
async def infer(name: str, request: Request, predictor: PredictorDep, settings: SettingsDep,
                sessions: SessionsDep) -> Response:
    """Top-k next words (or completions of the word being typed) for a batch of texts, or for one
    step of a sequence (``sequence_id``)."""
    return await _infer(request, name, None, predictor, settings, sessions)


@router.post("/models/{name}/versions/{version}/infer", openapi_extra=_INFER_DOC, responses=_INFER_RESPONSES)
async def infer_version(name: str, version: str, request: Request, predictor: PredictorDep,
                        settings: SettingsDep, sessions: SessionsDep) -> Response:
    return await _infer(request, name, version, predictor, settings, sessions)
