"""The HTTP application (FastAPI): the OpenAI routes on top of a ``ModelServer``, errors in OpenAI's shape, an
optional API key, and streams as server-sent events."""

import asyncio
import json
import logging
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional, Union

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lit_adapter.generate.engine import Sampling
from lit_adapter.serve import api
from lit_adapter.serve.api import APIError, ChatRequest, CompletionRequest
from lit_adapter.serve.server import Answer, ModelServer

log = logging.getLogger("lit_adapter.serve")
DISCONNECT_POLL_S = 0.25


def build_app(server: ModelServer, api_key: Optional[str] = None) -> FastAPI:
    """The application: it starts the engine's thread with the server and stops it (after running requests) last."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.start()
        yield
        server.stop()

    app = FastAPI(title="lit_adapter", lifespan=lifespan)
    authorized = [Depends(bearer_check(api_key))]

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = server.engine
        return {"status": "ok", "running": sum(job is not None for job in engine.slots),
                "waiting": len(engine.waiting), "slots": engine.max_batch}

    @app.get("/v1/models", dependencies=authorized)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "lit_adapter"}
                                           for name in server.model_names()]}

    @app.post("/v1/chat/completions", dependencies=authorized)
    async def chat(body: ChatRequest, request: Request) -> Any:
        messages = [message.model_dump() for message in body.messages]
        return await respond(server, body, server.chat_prompt(body.model, messages), request, chat=True)

    @app.post("/v1/completions", dependencies=authorized)
    async def completions(body: CompletionRequest, request: Request) -> Any:
        server.adapter(body.model)  # an unknown model is a 404 before anything else
        return await respond(server, body, server.text_prompt(body.prompt), request, chat=False)

    add_error_handlers(app)
    return app


async def respond(server: ModelServer, body: Union[ChatRequest, CompletionRequest], prompt: Any, request: Request,
                  chat: bool) -> Any:
    """Submit the job, then answer with the whole object or a stream of chunks."""
    sampling = Sampling(temperature=body.temperature, top_p=body.top_p, seed=body.seed)
    answer = server.submit(body.model, prompt, body.limit(), sampling, body.stop_strings())
    id = api.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(events(answer, id, chat, usage), media_type="text/event-stream")
    text = await until_done_or_disconnected(collect(answer), request)
    build = api.chat_completion if chat else api.text_completion
    return build(id, body.model, text, answer.finish_reason, answer.prompt_tokens, answer.completion_tokens)


async def collect(answer: Answer) -> str:
    return "".join([piece async for piece in answer.pieces()])


async def until_done_or_disconnected(work: Any, request: Request) -> str:
    """Await ``work``; if the client disconnects first, cancel it (which frees the job's slot)."""
    task = asyncio.ensure_future(work)
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
    return task.result()


async def events(answer: Answer, id: str, chat: bool, usage: bool) -> AsyncIterator[str]:
    """The answer as server-sent events in OpenAI's chunk format, ending with ``[DONE]``."""
    model = answer.model
    if chat:
        yield sse(api.chunk(chat, id, model, None, role=True))
    try:
        async for piece in answer.pieces():
            yield sse(api.chunk(chat, id, model, piece))
    except APIError as err:
        yield sse(err.body())
        return
    yield sse(api.chunk(chat, id, model, None, finish_reason=answer.finish_reason))
    if usage:
        yield sse(api.usage_chunk(chat, id, model, answer.prompt_tokens, answer.completion_tokens))
    yield "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def bearer_check(api_key: Optional[str]) -> Any:
    """A dependency that refuses requests without ``Authorization: Bearer <api_key>`` (none: every request passes)."""

    async def check(request: Request) -> None:
        if api_key is not None and request.headers.get("authorization") != f"Bearer {api_key}":
            raise APIError(401, "Incorrect or missing API key: send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    return check


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape: ours, malformed bodies (400), unknown routes, and failures (500, logged)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ())[1:]) or None
        message = f"{where}: {first.get('msg')}" if where else str(first.get("msg", "invalid request body"))
        return JSONResponse(APIError(400, message, param=where).body(), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> JSONResponse:
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def failure(request: Request, err: Exception) -> JSONResponse:
        log.exception("request %s %s failed", request.method, request.url.path)
        return JSONResponse(APIError(500, f"The server failed: {err}", type="server_error").body(), status_code=500)
