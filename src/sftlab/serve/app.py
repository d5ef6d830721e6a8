"""The OpenAI-compatible HTTP API (FastAPI) over one ``Engine``: /v1/models, /v1/chat/completions (plain and
server-sent events), /v1/completions, /health.

Chat prompts are rendered by ``infer.generate.prompt_ids``, the function ``sftlab chat`` and evaluation use, with
the template and tokenizer training used; request messages become training's conversation type first
(``infer.tools.conversation``), so a history with tool calls and tool results renders as training rendered it.
Every refusal is an OpenAI-style error object with a 4xx status.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftlab.data.render import renders_reasoning_content
from sftlab.infer.generate import GenerationSettings, prompt_ids, stop_token_ids
from sftlab.infer.tools import MessageError, ToolCallFormat, conversation, parse_tool_calls, text_before_calls, tool_call_format
from sftlab.serve.engine import Engine, Event, QueueFull, Row, Sampling


class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


@dataclass
class Served:
    """What one server serves: the engine, the tokenizer and template settings of training, the defaults."""

    engine: Engine
    tokenizer: PreTrainedTokenizerBase
    name: str
    defaults: Sampling
    template_kwargs: dict = field(default_factory=dict)  # enable_thinking, as training passed it
    default_system: str | None = None
    thinking: str = "train"  # training's placement of reasoning in history (config key thinking)
    native_reasoning: bool = False  # the template renders reasoning_content itself
    tool_format: ToolCallFormat | None = None  # None: the template cannot render tools
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


class _Common(BaseModel):
    """The sampling parameters both endpoints take; an unknown parameter is refused, never ignored."""

    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: dict | None = None
    user: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _stops(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > 4 or not all(stops):
            raise ValueError("give at most 4 non-empty stop strings")
        return stops

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError("is not supported (only 0); the config's repetition_penalty applies to every request")
        return value


class ChatRequest(_Common):
    messages: list[Any]
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[dict] | None = None
    tool_choice: Literal["auto", "none"] | None = None
    parallel_tool_calls: bool | None = None
    logprobs: Literal[False] | None = None
    response_format: dict | None = None
    metadata: dict | None = None
    store: bool | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value):
        if value is not None and value.get("type") != "text":
            raise ValueError("only {\"type\": \"text\"} is supported")
        return value


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: Literal[False] = False
    logprobs: None = None
    suffix: None = None
    best_of: Literal[1] | None = None


def _error_for(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = f"unrecognized request argument '{param}'"
    elif first.get("type") == "missing":
        message = f"missing required parameter '{param}'"
    else:
        message = f"{param}: {message}" if param else message
    return APIError(400, message, param, first.get("type"))


def create_app(served: Served) -> FastAPI:
    """The FastAPI application; the engine's thread runs while the application does."""

    @asynccontextmanager
    async def lifespan(_app):
        served.engine.start()
        yield
        served.engine.stop()

    app = FastAPI(title="sftlab serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if served.api_key is not None:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {served.api_key}".encode()):
                return APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key").response()
        return await call_next(request)

    app.add_exception_handler(APIError, lambda _r, e: e.response())
    app.add_exception_handler(RequestValidationError, lambda _r, e: _error_for(e).response())
    app.add_exception_handler(HTTPException, lambda _r, e: APIError(e.status_code, str(e.detail)).response())
    app.add_exception_handler(Exception, lambda _r, e: APIError(500, f"internal error: {type(e).__name__}", kind="server_error").response())

    @app.get("/health")
    async def health():
        engine = served.engine
        return {"status": "ok", "model": served.name, "running": len(engine.rows), "waiting": len(engine.waiting), **engine.stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(served)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        _check_model(served, name)
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        _check_model(served, req.model)
        prompt, tools = _chat_prompt(served, req)
        rows = _submit(served, req, [prompt], strip=True, max_tokens=req.max_completion_tokens)
        fmt = served.tool_format if tools else None
        meta = _meta("chatcmpl", served)
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return _sse(_chat_chunks(rows, fmt, meta, len(prompt), usage))
        results = await _collect(rows)
        choices = [_chat_choice(i, text, reason, fmt) for i, (text, reason, _) in enumerate(results)]
        return {**meta, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt), results)}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        _check_model(served, req.model)
        texts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
        if not texts:
            raise APIError(400, "prompt is empty", "prompt")
        prompts = [served.tokenizer(t)["input_ids"] for t in texts]
        rows = _submit(served, req, prompts, strip=False)
        meta = _meta("cmpl", served)
        if req.stream:
            usage = bool((req.stream_options or {}).get("include_usage"))
            return _sse(_completion_chunks(rows, meta, sum(map(len, prompts)), usage))
        results = await _collect(rows)
        choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None} for i, (text, reason, _) in enumerate(results)]
        return {**meta, "object": "text_completion", "choices": choices, "usage": _usage(sum(map(len, prompts)), results)}

    return app


def served_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, settings: GenerationSettings, name: str,
                 template_kwargs: dict | None = None, default_system: str | None = None, thinking: str = "train",
                 api_key: str | None = None, max_batch: int = 16, max_queue: int = 64, context_length: int | None = None) -> Served:
    """A model loaded for inference (``infer.generate.load_trained``) and training's settings → what to serve.
    ``context_length`` defaults to the model's ``max_position_embeddings``; generation stops at EOS or the
    template's end-of-turn token; ``settings`` give the parameters a request leaves out."""
    context = context_length or getattr(model.config, "max_position_embeddings", None) or 4096
    engine = Engine(model, tokenizer, stop_token_ids(tokenizer), context, max_batch, max_queue)
    defaults = Sampling(settings.max_new_tokens, settings.temperature, settings.top_p, settings.top_k, settings.repetition_penalty)
    kwargs = dict(template_kwargs or {})
    return Served(engine, tokenizer, name, defaults, kwargs, default_system, thinking, renders_reasoning_content(tokenizer),
                  tool_call_format(tokenizer, **kwargs), api_key)


def _model_card(served: Served) -> dict:
    return {"id": served.name, "object": "model", "created": served.created, "owned_by": "sftlab"}


def _check_model(served: Served, name: str) -> None:
    if name != served.name:
        raise APIError(404, f"model '{name}' is not served here; this server serves '{served.name}'", "model", "model_not_found")


def _meta(prefix: str, served: Served) -> dict:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": served.name}


def _chat_prompt(served: Served, req: ChatRequest) -> tuple[list[int], list[dict] | None]:
    """(the prompt's token ids, the tools it was rendered with)."""
    try:
        messages = conversation(req.messages, served.default_system, served.thinking, served.native_reasoning)
    except MessageError as e:
        raise APIError(400, str(e), e.param) from None
    tools = req.tools if req.tools and req.tool_choice != "none" else None
    kwargs = dict(served.template_kwargs)
    if tools:
        if served.tool_format is None:
            raise APIError(400, "this model's chat template cannot render tools", "tools")
        kwargs["tools"] = tools
    try:
        return prompt_ids(served.tokenizer, messages, **kwargs), tools
    except Exception as e:  # the template's own checks (roles must alternate, …) and jinja2 errors
        raise APIError(400, f"the chat template cannot render these messages: {e}", "messages") from None


def _submit(served: Served, req: _Common, prompts: list[list[int]], strip: bool, max_tokens: int | None = None) -> list[tuple[Row, asyncio.Queue]]:
    """Rows for ``n`` answers to each prompt, queued on the engine; each with the queue its events arrive on."""
    context = served.engine.context_length
    for p in prompts:
        if not p:
            raise APIError(400, "the prompt is empty", "prompt")
        if len(p) >= context:
            raise APIError(400, f"the prompt is {len(p)} tokens; this model's context is {context} tokens", "messages", "context_length_exceeded")
    d = served.defaults
    loop = asyncio.get_running_loop()
    rows = []
    for p in prompts:
        for i in range(req.n):
            sampling = Sampling(max_tokens=max_tokens or req.max_tokens or d.max_tokens,
                                temperature=d.temperature if req.temperature is None else req.temperature,
                                top_p=d.top_p if req.top_p is None else req.top_p, top_k=d.top_k, repetition_penalty=d.repetition_penalty,
                                seed=None if req.seed is None else req.seed + i, stop=tuple(req.stop or ()))
            queue: asyncio.Queue = asyncio.Queue()
            rows.append((Row(p, sampling, lambda e, q=queue: loop.call_soon_threadsafe(q.put_nowait, e), strip=strip), queue))
    try:
        served.engine.submit([r for r, _ in rows])
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}; retry later", code="rate_limit_exceeded", kind="rate_limit_error") from None
    return rows


async def _events(rows: list[tuple[Row, asyncio.Queue]]) -> AsyncIterator[tuple[int, Event]]:
    """(row index, event) as they come, until every row has ended; rows still running when the caller stops
    (a client that went away) are cancelled."""
    pending = {i: asyncio.ensure_future(q.get()) for i, (_, q) in enumerate(rows)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending.values(), return_when=asyncio.FIRST_COMPLETED)
            for i in [i for i, f in pending.items() if f in done]:
                event = pending.pop(i).result()
                if event.finish_reason == "error":
                    raise APIError(500, event.delta, code="generation_failed", kind="server_error")
                if event.finish_reason is None:
                    pending[i] = asyncio.ensure_future(rows[i][1].get())
                yield i, event
    finally:
        for f in pending.values():
            f.cancel()
        for row, _ in rows:
            row.cancelled = True  # the engine drops it at its next step (no effect on a finished row)


async def _collect(rows) -> list[tuple[str, str, int]]:
    """(text, finish_reason, completion tokens) per row."""
    texts, ends = [""] * len(rows), [("", 0)] * len(rows)
    async for i, event in _events(rows):
        texts[i] += event.delta
        if event.finish_reason:
            ends[i] = (event.finish_reason, event.completion_tokens)
    return [(t, reason, n) for t, (reason, n) in zip(texts, ends)]


def _usage(prompt_tokens: int, results) -> dict:
    completion = sum(n for *_, n in results)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def _tool_calls(calls) -> list[dict]:
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _chat_choice(index: int, text: str, reason: str, fmt: ToolCallFormat | None) -> dict:
    content, calls = parse_tool_calls(text, fmt) if fmt else (text, [])
    message = {"role": "assistant", "content": content if content or not calls else None}
    if calls:
        message["tool_calls"], reason = _tool_calls(calls), "tool_calls"
    return {"index": index, "message": message, "finish_reason": reason, "logprobs": None}


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def lines():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': e.param, 'code': e.code}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _chat_chunks(rows, fmt: ToolCallFormat | None, meta: dict, prompt_tokens: int, usage: bool) -> AsyncIterator[dict]:
    """Chat completion chunks: each choice's role, its content as it grows, its tool calls once complete, its end.
    With tools, content that may be the start of a call is held back until it is known not to be one."""
    def chunk(index, delta, reason=None):
        return {**meta, "object": "chat.completion.chunk", "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}]}

    for i in range(len(rows)):
        yield chunk(i, {"role": "assistant", "content": ""})
    texts, sent, results = [""] * len(rows), [0] * len(rows), [None] * len(rows)
    async for i, event in _events(rows):
        texts[i] += event.delta
        if event.finish_reason is None:
            shown = text_before_calls(texts[i], fmt).rstrip() if fmt else texts[i]
            if len(shown) > sent[i]:
                yield chunk(i, {"content": shown[sent[i]:]})
                sent[i] = len(shown)
            continue
        results[i] = (texts[i], event.finish_reason, event.completion_tokens)
        choice = _chat_choice(i, texts[i], event.finish_reason, fmt)
        rest = (choice["message"]["content"] or "")[sent[i]:]
        if rest:
            yield chunk(i, {"content": rest})
        if calls := choice["message"].get("tool_calls"):
            yield chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]})
        yield chunk(i, {}, choice["finish_reason"])
    if usage:
        yield {**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(prompt_tokens, results)}


async def _completion_chunks(rows, meta: dict, prompt_tokens: int, usage: bool) -> AsyncIterator[dict]:
    results = [None] * len(rows)
    async for i, event in _events(rows):
        if event.finish_reason:
            results[i] = ("", event.finish_reason, event.completion_tokens)
        yield {**meta, "object": "text_completion", "choices": [{"index": i, "text": event.delta, "finish_reason": event.finish_reason, "logprobs": None}]}
    if usage:
        yield {**meta, "object": "text_completion", "choices": [], "usage": _usage(prompt_tokens, results)}


def run(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    """Serve ``app`` with uvicorn until interrupted (Ctrl-C, SIGTERM)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)  # streams still open are cut
