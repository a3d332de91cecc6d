"""The HTTP API: FastAPI routes over a ``JobService``.

    POST   /v1/images/generations   OpenAI images API (waits for the images)
    POST   /v1/jobs                 queue one image with any generate option (answers at once)
    GET    /v1/jobs/{id}            the job, its result or error
    GET    /v1/jobs/{id}/events     its progress as server-sent events
    DELETE /v1/jobs/{id}            cancel it
    GET    /v1/files/{name}         an image the server wrote
    GET    /v1/models               the loaded model, OpenAI style
    GET    /openapi.json            the schema of every request field
    GET    /health                  the only route that needs no token

Every error a client can cause is answered with a 4xx status and one sentence, in the
OpenAI error shape ``{"error": {"message": ..., "type": ...}}``; a bug answers 500 with one
sentence and leaves its traceback in the server log.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import operator
import re
import secrets
import time
import types
import typing
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, create_model
from pydantic import Field as PydanticField
from starlette.exceptions import HTTPException

from pascaline.errors import PascalineError, RequestError
from pascaline.runtime.requests import parse_request, request_fields
from pascaline.serve.store import DONE, ERROR, Job
from pascaline.serve.worker import JobFinishedError, JobNotFoundError, JobService, log

FILE_NAME = re.compile(r"^[0-9a-f]{32}\.png$")  # <job id>.png: the only names /v1/files serves
MAX_IMAGES = 10  # OpenAI's own limit on n
MAX_BODY_BYTES = 48 << 20  # a request with a base64 init image of 32 MiB still fits
_STRICT = ConfigDict(extra="forbid", strict=True)


def _json_type(annotation: Any) -> Any:
    """``annotation`` as JSON carries it: a tuple arrives as a list (``parse_request`` makes the tuple;
    pydantic's strict mode would refuse every list sent for a tuple field)."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return functools.reduce(operator.or_, (_json_type(a) for a in args))
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return list[_json_type(args[0])]
    return annotation


def _fields_model(name: str, exclude: tuple[str, ...] = (), base: type[BaseModel] | None = None):
    """A pydantic model of the request fields (the OpenAPI schema, and the first check of each)."""
    fields = {
        f.name: (_json_type(f.annotation), ... if f.required else f.default)
        for f in request_fields().values()
        if f.name not in exclude
    }
    if base is None:
        return create_model(name, __config__=_STRICT, **fields)
    return create_model(name, __base__=base, **fields)


class _OpenAIBase(BaseModel):
    model_config = _STRICT
    n: int = PydanticField(1, ge=1, le=MAX_IMAGES)
    size: str = "1024x1024"
    response_format: Literal["b64_json", "url"] = "b64_json"
    output_format: Literal["png"] = "png"
    model: str | None = None  # one model is loaded: any name is accepted (clients send "dall-e-2")
    quality: str | None = None
    style: str | None = None
    user: str | None = None
    background: str | None = None
    moderation: str | None = None
    output_compression: int | None = None


JobBody = _fields_model("JobRequest")
# OpenAI's own fields, then every generate option but width/height (``size`` stands for them)
ImagesBody = _fields_model(
    "ImageGenerationRequest", ("width", "height", *_OpenAIBase.model_fields), _OpenAIBase
)


# ---------------------------------------------------------------------------- errors


def error_response(status: int, message: str, kind: str = "invalid_request_error", headers=None):
    body = {"error": {"message": message, "type": kind, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS = {JobNotFoundError: (404, "not_found_error"), JobFinishedError: (409, "conflict_error")}
_BOUNDS = {"greater_than_equal": ("at least", "ge"), "less_than_equal": ("at most", "le")}
_EXPECTED = {"int_type": "a whole number", "int_from_float": "a whole number", "float_type": "a number",
             "string_type": "text", "bool_type": "true or false", "list_type": "a list",
             "literal_error": None}  # fmt: skip


def validation_sentence(errors: list[dict[str, Any]], accepted: list[str]) -> str:
    """The first pydantic error of a request body as one sentence (``accepted``: the field names)."""
    error = errors[0]
    kind, where = error["type"], [str(p) for p in error["loc"] if p != "body"]
    name = ".".join(where)
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "it cannot be parsed")
        return f"the request body is not valid JSON ({reason}); send a JSON object."
    if kind in ("model_attributes_type", "dict_type", "model_type") or (kind == "missing" and not name):
        return "the request body must be a JSON object sent as application/json."
    if kind == "extra_forbidden":
        return f"unknown field {name!r}; the accepted fields are {', '.join(accepted)}."
    if kind == "missing":
        return f"the field {name!r} is required."
    if kind in _BOUNDS:
        words, key = _BOUNDS[kind]
        return f"{name} must be {words} {error['ctx'][key]}, not {_short(error.get('input'))}."
    if kind in _EXPECTED:
        expected = _EXPECTED[kind] or error["msg"].removeprefix("Input should be ")
        return f"{name} must be {expected}, not {_short(error.get('input'))}."
    return f"{name}: {error['msg'][:1].lower()}{error['msg'][1:]}."


def _short(value: Any) -> str:
    try:
        text = json.dumps(value)
    except TypeError:
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        body = ImagesBody if request.url.path == "/v1/images/generations" else JobBody
        return error_response(400, validation_sentence(list(exc.errors()), list(body.model_fields)))

    @app.exception_handler(PascalineError)
    async def _user_error(request: Request, exc: PascalineError):
        status, kind = _STATUS.get(type(exc), (400, "invalid_request_error"))
        return error_response(status, str(exc), kind)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException):
        path = request.url.path
        if exc.status_code == 404:
            return error_response(
                404, f"there is no {path} here; GET /openapi.json lists the API.", "not_found_error"
            )
        if exc.status_code == 405:
            return error_response(
                405, f"{request.method} is not allowed on {path}; GET /openapi.json lists the API."
            )
        detail = exc.detail if isinstance(exc.detail, str) else "the request cannot be served"
        return error_response(exc.status_code, detail.rstrip(".") + ".", headers=exc.headers)


class _Bugs:
    """A bug's exception: its traceback to the server log, one sentence and a 500 to the client."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            log.exception("%s %s failed", scope["method"], scope["path"])
            if started:  # a stream already under way: the connection is all there is to end
                raise
            message = (
                f"the server failed with an internal error ({type(exc).__name__}); its log has the details."
            )
            await error_response(500, message, "server_error")(scope, receive, send)


class _BodyLimit:
    """Refuse a request whose declared body is larger than ``limit`` before reading it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            length = dict(scope["headers"]).get(b"content-length", b"")
            if length.isdigit() and int(length) > self.limit:
                message = f"the request body is larger than {self.limit >> 20} MiB; send a smaller one."
                await error_response(413, message)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------------------- the app


def bearer_check(token: str | None):
    """A dependency that refuses requests without ``Authorization: Bearer <token>`` (when set)."""

    async def check(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            raise _Unauthorized("this server needs a token; send the header 'Authorization: Bearer <token>'.")
        if not secrets.compare_digest(given.strip().encode(), token.encode()):
            raise _Unauthorized("the bearer token is wrong; send the one the server was started with.")

    return check


class _Unauthorized(HTTPException):
    def __init__(self, message: str):
        super().__init__(401, message, headers={"WWW-Authenticate": "Bearer"})


def create_app(service: JobService, *, token: str | None = None) -> FastAPI:
    """The FastAPI app over ``service``; ``token`` guards every route but /health."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.hub.bind(asyncio.get_running_loop())
        service.start()
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    # the schema sits behind the token like the rest; no HTML docs page (a browser would not send it)
    app = FastAPI(title="pascaline", summary="Z-Image Turbo over HTTP with a persistent job queue",
                  lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)  # fmt: skip
    _install_error_handlers(app)
    app.add_middleware(_Bugs)
    app.add_middleware(_BodyLimit, limit=MAX_BODY_BYTES)
    api = APIRouter(dependencies=[Depends(bearer_check(token))])
    _job_routes(api, service)
    _openai_routes(api, service)

    @app.get("/health")
    async def health() -> dict:
        return service.health()

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi() -> dict:
        return app.openapi()

    app.include_router(api)
    return app


def _job_routes(api: APIRouter, service: JobService) -> None:
    @api.post("/v1/jobs", status_code=202)
    async def submit(body: JobBody) -> dict:
        request = parse_request(body.model_dump(exclude_unset=True), lora_root=service.lora_root)
        job = service.submit([request])[0]
        return {**service.view(job), "events": f"/v1/jobs/{job.id}/events"}

    @api.get("/v1/jobs/{job_id}")
    async def get_job(job_id: str) -> dict:
        return service.view(service.get(job_id))

    @api.delete("/v1/jobs/{job_id}")
    async def cancel_job(job_id: str) -> dict:
        return service.view(service.cancel(job_id))

    @api.get("/v1/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        service.get(job_id)  # a 404 before the stream starts
        last = request.headers.get("last-event-id", "")
        start = int(last) + 1 if last.isdigit() else 0

        async def stream():
            async for item in service.follow(job_id, start):
                if item is None:
                    yield ": keep-alive\n\n"
                    continue
                index, event = item
                yield f"id: {index}\nevent: {event['type']}\ndata: {json.dumps(event)}\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    @api.get("/v1/files/{name}", name="get_file")
    async def get_file(name: str):
        path = service.out / name
        if not FILE_NAME.match(name) or not path.is_file():
            raise JobNotFoundError(f"there is no image {name!r} on this server.")
        return FileResponse(path, media_type="image/png")

    @api.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [_model_card(service)]}


def _model_card(service: JobService) -> dict:
    pipe = service.pipeline
    dit = None if pipe is None else Path(pipe.files.dit)
    name = "z-image-turbo" if dit is None else (dit.parent.name if dit.is_dir() else dit.stem)
    card = {"id": name, "object": "model", "owned_by": "pascaline"}
    if dit is not None:
        card |= {"created": int(dit.stat().st_mtime), "quant": pipe.quant_label, "device": str(pipe.device)}
    return card


def _openai_routes(api: APIRouter, service: JobService) -> None:
    @api.post("/v1/images/generations")
    async def generations(body: ImagesBody, request: Request) -> dict:
        given = body.model_dump(exclude_unset=True)
        options = {k: v for k, v in given.items() if k not in (*_OpenAIBase.model_fields, "seed")}
        width, height = _size(body.size)
        first = parse_request({**options, "width": width, "height": height, "seed": given.get("seed")},
                              lora_root=service.lora_root)
        seed = first.options.seed
        jobs = [first] + [parse_request({**first.record, "seed": seed + i}, lora_root=service.lora_root)
                          for i in range(1, body.n)]
        submitted = service.submit(jobs, batch=secrets.token_hex(8))
        finished = await asyncio.gather(*(service.wait(job.id) for job in submitted))
        failed = next((job for job in finished if job.state != DONE), None)
        if failed is not None:
            return _job_failure(failed)
        data = [_openai_item(job, body.response_format, request, service) for job in finished]
        return {"created": int(time.time()), "data": data}


def _size(size: str) -> tuple[int, int]:
    if size == "auto":
        defaults = request_fields()
        return defaults["width"].default, defaults["height"].default
    match = re.fullmatch(r"(\d{1,9})x(\d{1,9})", size)
    if match is None:
        raise RequestError(f"size {size!r} is not of the form WxH; write it like 1024x1024.")
    return int(match.group(1)), int(match.group(2))


def _openai_item(job: Job, response_format: str, request: Request, service: JobService) -> dict:
    result = job.result
    item = {"revised_prompt": job.request["prompt"], "seed": result["seed"]}
    if response_format == "url":
        return {"url": str(request.url_for("get_file", name=result["file"])), **item}
    data = (service.out / result["file"]).read_bytes()
    return {"b64_json": base64.b64encode(data).decode("ascii"), **item}


def _job_failure(job: Job) -> JSONResponse:
    if job.state == ERROR:
        kind = (job.result or {}).get("kind", "server_error")
        return error_response(500 if kind == "server_error" else 422, job.error, kind)
    return error_response(409, f"job {job.id} was cancelled before its image was made.", "conflict_error")
