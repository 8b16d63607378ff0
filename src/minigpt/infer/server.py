"""``minigpt serve MODEL``: an OpenAI-compatible chat completions server (FastAPI).

``POST /v1/chat/completions`` takes OpenAI messages whose content may hold ``image_url`` parts (base64
data URLs, or local files under ``--allow-local-images DIR``), answers at once or as SSE with
``stream: true``. ``GET /v1/models`` lists the one model. Errors use OpenAI's JSON shape with clear
4xx codes; requests beyond ``max_queue`` (running + waiting) get 429. Build the app with
:func:`create_app` to run it in tests or behind another server.
"""

# No ``from __future__ import annotations``: FastAPI must see the real ``Request`` annotations of the
# handlers defined inside create_app (fastapi is imported there, so the CLI starts without it).
import argparse
import base64
import binascii
import hmac
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from .args import add_generation_arguments, add_model_arguments

if TYPE_CHECKING:
    from fastapi import FastAPI, Request

    from ..data.conversation import Conversation
    from .chat import ChatEngine, Stream
    from .generate import Generation, GenerationOptions

log = logging.getLogger(__name__)

MIB = 2**20
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


@dataclass
class ServerSettings:
    """Limits and access rules of the server."""

    api_key: str | None = None
    #: Local image paths are accepted only inside this directory (None: refused).
    allow_local_images: str | None = None
    max_request_bytes: int = 32 * MIB
    max_image_bytes: int = 10 * MIB
    max_images: int = 8
    #: Requests admitted at once (decoding in the batch slots or waiting); beyond that: 429.
    max_queue: int = 16
    #: Upper bound for a request's ``max_tokens``.
    max_tokens_limit: int = 2048


class APIError(Exception):
    """An error answered as ``{"error": {...}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param

    def body(self) -> dict[str, Any]:
        kind = {401: "authentication_error", 404: "not_found_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------- requests
def _request_models() -> Any:
    """The pydantic request schema (built lazily: pydantic is imported with the server only)."""
    from pydantic import BaseModel, ConfigDict

    class ImageURL(BaseModel):
        url: str
        detail: str | None = None

    class ContentPart(BaseModel):
        model_config = ConfigDict(extra="allow")
        type: str
        text: str | None = None
        image_url: ImageURL | str | None = None

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: str
        content: str | list[ContentPart] | None = None

    class StreamOptions(BaseModel):
        include_usage: bool = False

    class ChatRequest(BaseModel):
        model_config = ConfigDict(extra="ignore")
        model: str
        messages: list[Message]
        stream: bool = False
        stream_options: StreamOptions | None = None
        max_tokens: int | None = None
        max_completion_tokens: int | None = None
        temperature: float | None = None
        top_p: float | None = None
        top_k: int | None = None
        num_beams: int | None = None
        repetition_penalty: float | None = None
        n: int | None = None
        stop: str | list[str] | None = None
        seed: int | None = None

    return ChatRequest


def load_image_url(url: str, settings: ServerSettings, where: str, max_pixels: int | None) -> Any:
    """An ``image_url`` -> RGB PIL image, or an :class:`APIError` saying what is wrong with it (413 for more than
    ``max_pixels`` pixels, found from the header before decoding)."""
    from ..data.images import ImageError, ImageTooLargeError, load_image

    if url.startswith("data:"):
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise APIError(400, f"{where}: expected a base64 data URL (data:image/png;base64,...)", "invalid_image")
        mime = header[5:].split(";")[0]
        if mime and not mime.startswith("image/"):
            raise APIError(400, f"{where}: not an image (media type {mime})", "invalid_image")
        payload = "".join(payload.split())
        if len(payload) * 3 // 4 > settings.max_image_bytes:
            raise APIError(413, f"{where}: image larger than {settings.max_image_bytes} bytes", "image_too_large")
        try:
            source: Any = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, f"{where}: invalid base64 in the data URL", "invalid_base64") from None
    elif _URL_SCHEME.match(url) and not url.startswith("file://"):
        raise APIError(400, f"{where}: remote image URLs are not fetched; send a base64 data URL", "invalid_image")
    else:
        source = _local_image(unquote(url.removeprefix("file://")), settings, where)
    try:
        return load_image(source, max_pixels=max_pixels)
    except ImageTooLargeError as err:
        raise APIError(413, f"{where}: {err}", "image_too_large") from None
    except ImageError:
        raise APIError(400, f"{where}: not a readable image", "invalid_image") from None


def _local_image(path: str, settings: ServerSettings, where: str) -> Path:
    if not settings.allow_local_images:
        raise APIError(
            400,
            f"{where}: local image paths are disabled; start the server with --allow-local-images DIR",
            "local_images_disabled",
        )
    root = Path(settings.allow_local_images).resolve()
    file = (root / path).resolve()  # an absolute path replaces root
    if not file.is_relative_to(root):
        raise APIError(403, f"{where}: {path} is outside the allowed image directory", "image_path_forbidden")
    if not file.is_file():
        raise APIError(400, f"{where}: image file not found: {path}", "invalid_image")
    if file.stat().st_size > settings.max_image_bytes:
        raise APIError(413, f"{where}: image larger than {settings.max_image_bytes} bytes", "image_too_large")
    return file


def parse_messages(
    messages: list[Any], engine: "ChatEngine", settings: ServerSettings
) -> tuple["Conversation", list[Any]]:
    """OpenAI messages -> a :class:`Conversation` and its images in slot order."""
    from ..data.conversation import ROLES, Conversation, Image
    from ..data.templates import text_part, user_parts

    conv, images = Conversation(), []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ROLES:
            raise APIError(400, f"messages[{i}]: unsupported role {message.role!r}", "invalid_role", "messages")
        content = message.content
        parts = [content or ""] if not isinstance(content, list) else content
        pieces: list[str | Image] = []
        for j, part in enumerate(parts):
            where = f"messages[{i}].content[{j}]"
            if isinstance(part, str) or part.type == "text":
                pieces.append(part if isinstance(part, str) else part.text or "")
            elif part.type == "image_url" and part.image_url is not None:
                if role != "user":
                    raise APIError(400, f"{where}: images are accepted in user messages only", "invalid_image")
                if len(images) >= settings.max_images:
                    raise APIError(400, f"{where}: more than {settings.max_images} images", "too_many_images")
                url = part.image_url if isinstance(part.image_url, str) else part.image_url.url
                image = load_image_url(url, settings, where, engine.max_image_pixels)
                images.append(engine.processor.image_processor(image))  # kept until answered: model-size pixels
                pieces.append(Image())
            else:
                raise APIError(400, f"{where}: unsupported content part type {part.type!r}", "invalid_content")
        try:
            if role == "user":
                conv.add("user", user_parts(engine.template, pieces))
            else:
                conv.add(role, [text_part("".join(p for p in pieces if isinstance(p, str)))])
        except ValueError as err:
            raise APIError(400, f"messages[{i}]: {err}", "invalid_content") from None
    return conv, images


def request_options(request: Any, engine: "ChatEngine", settings: ServerSettings) -> "GenerationOptions":
    from .generate import OptionOverrides

    max_tokens = request.max_completion_tokens or request.max_tokens
    if max_tokens is not None and max_tokens > settings.max_tokens_limit:
        raise APIError(400, f"max_tokens may be at most {settings.max_tokens_limit}", "invalid_value", "max_tokens")
    if request.n not in (None, 1):
        raise APIError(400, "only n=1 is supported", "invalid_value", "n")
    stop = [request.stop] if isinstance(request.stop, str) else request.stop
    try:
        return OptionOverrides(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            num_beams=request.num_beams,
            max_new_tokens=max_tokens,
            repetition_penalty=request.repetition_penalty,
            seed=request.seed,
            stop=stop,
        ).apply(engine.options)
    except ValueError as err:
        raise APIError(400, str(err), "invalid_value") from None


# ---------------------------------------------------------------------------------------------- app
class Admission:
    """Counts admitted requests (used from the event loop only); refuses beyond ``limit`` with 429."""

    def __init__(self, limit: int) -> None:
        self.limit, self.active = limit, 0

    def acquire(self) -> None:
        if self.active >= self.limit:
            message = f"server busy: {self.active} requests queued or running (limit {self.limit}); retry later"
            raise APIError(429, message, "queue_full")
        self.active += 1

    def release(self) -> None:
        self.active -= 1


async def _read_body(request: "Request", limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(413, f"request body larger than {limit} bytes", "request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise APIError(413, f"request body larger than {limit} bytes", "request_too_large")
    return bytes(body)


def create_app(chat_engine: "ChatEngine", settings: ServerSettings | None = None) -> "FastAPI":
    """The FastAPI app serving ``chat_engine`` under ``settings``."""
    import anyio
    from fastapi import Depends, FastAPI, Request
    from fastapi.responses import JSONResponse
    from pydantic import ValidationError
    from sse_starlette.sse import EventSourceResponse
    from starlette.concurrency import iterate_in_threadpool, run_in_threadpool
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from .chat import ContextTooLong

    settings = settings or ServerSettings()
    engine, admission, ChatRequest = chat_engine, Admission(settings.max_queue), _request_models()
    app = FastAPI(title="minigpt", summary="OpenAI-compatible chat completions for a minigpt model")
    app.state.admission = admission

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        headers = {"Retry-After": "1"} if err.status == 429 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        """Routing errors (unknown path, wrong method) in OpenAI's shape, not FastAPI's ``{"detail": ...}``."""
        error = _routing_error(request.method, request.url.path, err.status_code, err.headers)
        return JSONResponse(error.body(), status_code=error.status, headers=err.headers)

    @app.exception_handler(Exception)
    async def server_error(_: Request, err: Exception) -> JSONResponse:
        log.exception("request failed")
        return JSONResponse(APIError(500, f"generation failed: {err}").body(), status_code=500)

    def check_key(request: Request) -> None:
        if not settings.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or invalid API key (send Authorization: Bearer KEY)", "invalid_api_key")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "active": admission.active}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine.name)]}

    @app.get("/v1/models/{name}", dependencies=[Depends(check_key)])
    async def model(name: str) -> dict[str, Any]:
        _check_model(name, engine.name)
        return _model_card(engine.name)

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def completions(request: Request) -> Any:
        body = await _read_body(request, settings.max_request_bytes)
        try:
            req = ChatRequest.model_validate_json(body)
        except ValidationError as err:
            raise APIError(400, f"invalid request: {_summary(err)}", "invalid_request") from None
        _check_model(req.model, engine.name)
        options = request_options(req, engine, settings)
        admission.acquire()  # before decoding images: the queue bounds all the work
        handed_over = False
        try:
            conv, images = await run_in_threadpool(parse_messages, req.messages, engine, settings)
            try:  # the one tokenization of the request
                prompt = await run_in_threadpool(engine.prepare, conv, images, options)
            except ValueError as err:
                code = "context_length_exceeded" if isinstance(err, ContextTooLong) else "invalid_request"
                raise APIError(400, str(err), code, "messages") from None
            reply = _Reply(engine.name)
            if req.stream:
                usage = bool(req.stream_options and req.stream_options.include_usage)
                handed_over = True  # _events releases the slot when the stream ends
                return EventSourceResponse(_events(reply, engine.stream(prompt, options=options), usage))
            answer = await run_in_threadpool(engine.generate, prompt, (), options)
            return reply.completion(answer)
        finally:
            if not handed_over:
                admission.release()

    async def _events(reply: "_Reply", deltas: "Stream", usage: bool) -> AsyncIterator[dict[str, str]]:
        try:
            yield reply.chunk({"role": "assistant", "content": ""})
            try:
                async for delta in iterate_in_threadpool(deltas):
                    yield reply.chunk({"content": delta})
            finally:
                with anyio.CancelScope(shield=True):  # stop generation and free the model lock
                    await run_in_threadpool(deltas.close)
            answer = deltas.result
            assert answer is not None
            yield reply.chunk({}, finish_reason(answer))
            if usage:
                yield {
                    "data": json.dumps(
                        {**reply.header("chat.completion.chunk"), "choices": [], "usage": usage_of(answer)}
                    )
                }
            yield {"data": "[DONE]"}
        except Exception as err:  # the status line is sent already: report in the stream
            log.exception("streaming failed")
            yield {"data": json.dumps(APIError(500, f"generation failed: {err}").body())}
        finally:
            admission.release()

    return app


def finish_reason(answer: "Generation") -> str:
    """OpenAI's finish reason: ``length`` when ``max_tokens`` cut the answer, else ``stop`` (an end token or a stop
    string)."""
    return "length" if answer.finish_reason == "length" else "stop"


def usage_of(answer: "Generation") -> dict[str, int]:
    """The exact token counts of the answer: the prompt's ids (image positions included) and the generated ids."""
    prompt, completion = answer.prompt_tokens, answer.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


class _Reply:
    """Builds the completion / chunk payloads of one request."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def header(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def completion(self, answer: "Generation") -> dict[str, Any]:
        message = {"role": "assistant", "content": answer.text}
        choice = {"index": 0, "message": message, "finish_reason": finish_reason(answer)}
        return {**self.header("chat.completion"), "choices": [choice], "usage": usage_of(answer)}

    def chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, str]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {"data": json.dumps({**self.header("chat.completion.chunk"), "choices": [choice]})}


def _model_card(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "minigpt"}


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(404, f"model {requested!r} not found; this server serves {served!r}", "model_not_found", "model")


def _routing_error(method: str, path: str, status: int, headers: dict[str, str] | None) -> APIError:
    """The :class:`APIError` for a request that matched no route (404) or not with its method (405)."""
    if status == 404:
        return APIError(
            404, f"unknown path {path}; this server serves /v1/chat/completions and /v1/models", "unknown_url"
        )
    if status == 405:
        allowed = next((v for k, v in (headers or {}).items() if k.lower() == "allow"), "")
        return APIError(
            405,
            f"method {method} not allowed for {path}" + (f" (allowed: {allowed})" if allowed else ""),
            "method_not_allowed",
        )
    return APIError(status, f"{method} {path}: HTTP {status}")


def _summary(err: Any) -> str:
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors()[:5])


# ---------------------------------------------------------------------------------------------- command
def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="OpenAI-compatible chat completions server",
        description="Serve a model at /v1/chat/completions (OpenAI API, images as data URLs).",
    )
    add_model_arguments(parser)
    add_generation_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--model-name", help="the model id clients send (default: MODEL's folder name)")
    g.add_argument(
        "--api-key",
        default=os.environ.get("MINIGPT_API_KEY"),
        help="require this bearer key (default: env MINIGPT_API_KEY)",
    )
    g.add_argument("--allow-local-images", metavar="DIR", help="accept image paths inside DIR")
    g.add_argument("--max-queue", type=int, default=16, help="requests admitted at once; more get 429")
    g.add_argument(
        "--batch-slots",
        type=int,
        default=16,
        metavar="N",
        help="requests decoded together (continuous batching, with static decoding; 1: one at a time; "
        "KV cache memory grows with N x --max-context)",
    )
    g.add_argument("--max-request-mb", type=float, default=32.0)
    g.add_argument("--max-image-mb", type=float, default=10.0)
    g.add_argument("--max-images", type=int, default=8, help="images per request")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from .args import engine_from_args

    settings = ServerSettings(
        api_key=args.api_key,
        allow_local_images=args.allow_local_images,
        max_queue=args.max_queue,
        max_request_bytes=int(args.max_request_mb * MIB),
        max_image_bytes=int(args.max_image_mb * MIB),
        max_images=args.max_images,
    )
    if args.allow_local_images and not Path(args.allow_local_images).is_dir():
        raise FileNotFoundError(f"--allow-local-images: not a directory: {args.allow_local_images}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not settings.api_key:
        log.warning("serving on %s without --api-key: anyone who can reach it can use the model", args.host)
    engine = engine_from_args(args)
    if args.model_name:
        engine.name = args.model_name
    uvicorn.run(create_app(engine, settings), host=args.host, port=args.port, log_level="info")
    return 0
