"""The OpenAI-compatible HTTP server: validate, tokenize, hand prompts to the AsyncEngine, stream the tokens back.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health, GET /metrics, GET /version,
POST /tokenize, POST /detokenize.

Authentication: with an api_key, every route except the operational ones (/health, /metrics, /version) needs
`Authorization: Bearer <key>`, so load balancers and Prometheus scrapers work without the key (as in vLLM), while
everything that touches the model (including /tokenize, /detokenize, which vLLM leaves open) is protected.

Every refusal is an OpenAI-style error body {"error": {"message", "type", "param", "code"}}, never a traceback.
A client that goes away aborts its requests in the engine (streaming or not) so their KV blocks are freed.
"""

from __future__ import annotations

import hmac
import json
import logging
from dataclasses import dataclass
from typing import Any, AsyncIterator, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenmill.engine.outputs import RequestOutput
from tokenmill.serve.generation import (
    ClientDisconnected,
    EngineFailure,
    Generation,
    raise_if_failed,
    until_disconnect,
)
from tokenmill.serve.metrics import PROMETHEUS_CONTENT_TYPE, PrometheusMetrics
from tokenmill.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorInfo,
    ErrorResponse,
    InvalidRequest,
    ModelCard,
    ModelList,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    random_id,
)
from tokenmill.serve.render import (
    SSE_DONE,
    SSE_HEADERS,
    ChatStream,
    CompletionStream,
    chat_response,
    completion_response,
    sse,
)

log = logging.getLogger("tokenmill.serve")

M = TypeVar("M", bound=BaseModel)


# ----------------------------------------------------------------------------------------------------------- errors


class APIError(Exception):
    """An error the server answers with status `status` and an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code


def error_response(status: int, message: str, type: str | None = None, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    err = APIError(status, message, type, param, code)
    body = ErrorResponse(error=ErrorInfo(message=err.message, type=err.type, param=err.param, code=err.code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def _error_json(err: APIError) -> str:
    return ErrorResponse(error=ErrorInfo(message=err.message, type=err.type, param=err.param,
                                         code=err.code)).model_dump_json()


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One readable line from pydantic's error list: one complaint per top-level field."""
    by_field: dict[str, list[tuple[list[str], str]]] = {}
    for e in errors:
        loc = [str(x) for x in e.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header", "cookie"):  # FastAPI's request-part prefix
            loc = loc[1:]
        by_field.setdefault(loc[0] if loc else "body", []).append((loc, e.get("msg", "invalid value")))
    parts = []
    for name, errs in by_field.items():
        # pydantic names each union member it tried (e.g. "list[int]") right after the field name.
        tags = list(dict.fromkeys(loc[1] for loc, _ in errs if len(loc) > 1 and _is_union_tag(loc[1])))
        if len(tags) > 1:
            parts.append(f"{name}: the value matches none of the accepted types ({', '.join(tags)})")
        else:
            loc, msg = errs[0]
            parts.append(f"{'.'.join(x for x in loc if not _is_union_tag(x)) or name}: {msg}")
    first = next(iter(by_field), None)
    return "Invalid request: " + "; ".join(parts[:5]), (first if first != "body" else None)


def _is_union_tag(part: str) -> bool:
    return "[" in part or part in {"str", "int", "float", "bool", "dict", "list", "none"}


# --------------------------------------------------------------------------------------------------------- the app


@dataclass
class ServerContext:
    engine: Any
    model_name: str
    metrics: PrometheusMetrics

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_logprobs(self) -> int:
        return self.engine.config.max_logprobs

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist. This server serves `{self.model_name}`.",
                           param="model", code="model_not_found")

    def prompt_ids(self, prompt: str | list[int], add_special_tokens: bool = True) -> list[int]:
        if isinstance(prompt, str):
            ids = list(self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens))
        else:
            ids = self.check_token_ids(prompt, "prompt")
        if not ids:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        return ids

    @property
    def vocab_size(self) -> int:
        # The embedding table is the hard limit (an id past it would crash the forward pass); a tokenizer's own
        # vocab_size may leave out its added special tokens.
        model_config = getattr(self.engine, "model_config", None)
        return model_config.vocab_size if model_config is not None else self.tokenizer.vocab_size

    def check_token_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequest(f"token id {bad} is out of range: the vocabulary has ids 0..{vocab - 1}", param=param)
        return list(ids)

    def chat_prompt_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                        tools: list[dict[str, Any]] | None) -> list[int]:
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                      tools=tools)
        except ValueError as e:
            raise InvalidRequest(f"cannot apply the chat template to these messages: {e}", param="messages") from None
        except Exception as e:  # jinja2 raise_exception / template errors caused by the message sequence
            if type(e).__module__.startswith("jinja2"):
                raise InvalidRequest(f"cannot apply the chat template to these messages: {e}",
                                     param="messages") from None
            raise
        # The template already wrote BOS and the other special tokens; adding them again would double BOS.
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if not ids:
            raise InvalidRequest("the chat template produced an empty prompt", param="messages")
        return ids


def served_model_name(config: Any) -> str:
    """The name clients must use: `served_model_name`, else the model argument, else "default"."""
    return getattr(config, "served_model_name", None) or getattr(config, "model", None) or "default"


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokenmill")
    except PackageNotFoundError:
        import tokenmill

        return getattr(tokenmill, "__version__", "0+unknown")


async def read_json_body(request: Request, model: type[M]) -> M:
    """Parse the body as a `model`; any malformed byte, JSON or field becomes an InvalidRequest (HTTP 400)."""
    data = await _read_json_object(request)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = _validation_message(e.errors(include_url=False))
        raise InvalidRequest(message, param=param) from None


def _reject_constant(name: str) -> float:
    raise InvalidRequest(f"request body is not valid JSON: {name} is not a number")


# Far above any request a model can take (a 128k-token prompt as JSON token ids is ~1 MB); a body past it is refused
# before it is held in memory, so a runaway client cannot take the server down.
MAX_BODY_BYTES = 32 << 20


async def _read_body(request: Request) -> bytes:
    limit = getattr(request.app.state, "max_body_bytes", MAX_BODY_BYTES)
    too_large = APIError(413, f"The request body is larger than this server accepts ({limit} bytes).",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies declare no length: count as they arrive
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_json_object(request: Request) -> dict[str, Any]:
    raw = await _read_body(request)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InvalidRequest(f"request body is not valid UTF-8 (bad byte at position {e.start})") from None
    try:
        data = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise InvalidRequest(f"request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def build_app(engine: Any, api_key: str | None = None, metrics: PrometheusMetrics | None = None,
              max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An OpenAI-compatible FastAPI app over `engine` (an AsyncEngine). Attaches Prometheus metrics to the engine.
    Request bodies over `max_body_bytes` get HTTP 413."""
    model_name = served_model_name(engine.config)
    if metrics is None:
        metrics = PrometheusMetrics(model_name)
    engine.attach_observer(metrics)
    ctx = ServerContext(engine=engine, model_name=model_name, metrics=metrics)

    app = FastAPI(title="tokenmill", version=server_version())
    app.state.ctx = ctx
    app.state.max_body_bytes = max_body_bytes
    _install_error_handlers(app)

    async def require_api_key(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise APIError(401, "Missing API key: send it as `Authorization: Bearer <key>`.", code="invalid_api_key")
        if not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    protected = [Depends(require_api_key)]

    @app.get("/health")
    async def health() -> Response:
        if not engine.is_healthy():
            return error_response(503, "The engine is not healthy.", code="engine_unhealthy")
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=PROMETHEUS_CONTENT_TYPE)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": server_version()}

    @app.get("/v1/models", dependencies=protected)
    async def list_models() -> Response:
        return _json(ModelList(data=[_model_card(ctx)]))

    @app.get("/v1/models/{model_id:path}", dependencies=protected)
    async def get_model(model_id: str) -> Response:
        ctx.check_model(model_id)
        return _json(_model_card(ctx))

    @app.post("/tokenize", dependencies=protected)
    async def tokenize(request: Request) -> Response:
        data = await _read_json_object(request)
        if "messages" in data:
            chat = _validate(TokenizeChatRequest, data)
            ctx.check_model(chat.model)
            ids = ctx.chat_prompt_ids(chat.template_messages(), chat.add_generation_prompt, chat.tools)
        else:
            plain = _validate(TokenizeCompletionRequest, data)
            ctx.check_model(plain.model)
            ids = list(ctx.tokenizer.encode(plain.prompt, add_special_tokens=plain.add_special_tokens))
        return _json(TokenizeResponse(tokens=ids, count=len(ids), max_model_len=ctx.max_model_len))

    @app.post("/detokenize", dependencies=protected)
    async def detokenize(request: Request) -> Response:
        req = await read_json_body(request, DetokenizeRequest)
        ctx.check_model(req.model)
        ids = ctx.check_token_ids(req.tokens, "tokens")
        return _json(DetokenizeResponse(prompt=ctx.tokenizer.decode(ids, skip_special_tokens=False)))

    @app.post("/v1/completions", dependencies=protected)
    async def completions(request: Request) -> Response:
        req = await read_json_body(request, CompletionRequest)
        ctx.check_model(req.model)
        prompts = req.prompts()
        token_prompts = [ctx.prompt_ids(p) for p in prompts]
        params = [req.to_sampling_params(ctx.max_model_len, len(ids), ctx.max_logprobs) for ids in token_prompts]
        echo_texts = None
        if req.echo:
            echo_texts = [p if isinstance(p, str) else ctx.tokenizer.decode(p, skip_special_tokens=False)
                          for p in prompts]
        response_id = random_id("cmpl")
        gen = Generation(engine, token_prompts, params, response_id, progress=req.stream)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = CompletionStream(ctx.model_name, ctx.tokenizer, response_id, req.n, echo_texts,
                                      req.logprobs is not None, include_usage)
            return await _streaming_response(request, gen, stream)
        outputs = await _collect(request, gen)
        return _json(completion_response(ctx.model_name, ctx.tokenizer, response_id, req.n, outputs, echo_texts))

    @app.post("/v1/chat/completions", dependencies=protected)
    async def chat_completions(request: Request) -> Response:
        req = await read_json_body(request, ChatCompletionRequest)
        ctx.check_model(req.model)
        ids = ctx.chat_prompt_ids(req.template_messages(), req.add_generation_prompt, req.tools)
        params = req.to_sampling_params(ctx.max_model_len, len(ids), ctx.max_logprobs)
        response_id = random_id("chatcmpl")
        gen = Generation(engine, [ids], [params], response_id, progress=req.stream)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            stream = ChatStream(ctx.model_name, ctx.tokenizer, response_id, req.n, top_n, include_usage)
            return await _streaming_response(request, gen, stream)
        outputs = await _collect(request, gen)
        return _json(chat_response(ctx.model_name, ctx.tokenizer, response_id, outputs[0], top_n))

    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def on_api_error(_: Request, exc: APIError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code, headers=headers)

    @app.exception_handler(InvalidRequest)
    async def on_invalid_request(_: Request, exc: InvalidRequest) -> Response:
        return error_response(400, exc.message, param=exc.param, code=exc.code)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> Response:
        return error_response(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(EngineFailure)
    async def on_engine_failure(_: Request, exc: EngineFailure) -> Response:
        return error_response(500, f"Generation failed: {exc}", code="engine_error")

    @app.exception_handler(ClientDisconnected)
    async def on_client_gone(_: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody is there to read it

    @app.exception_handler(Exception)
    async def on_unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unhandled error while serving a request")
        return error_response(500, f"Internal server error ({type(exc).__name__}: {exc})")


def _validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        message, param = _validation_message(e.errors(include_url=False))
        raise InvalidRequest(message, param=param) from None


def _json(model: BaseModel, status: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status, media_type="application/json")


def _model_card(ctx: ServerContext) -> ModelCard:
    root = getattr(ctx.engine.config, "model", None)
    return ModelCard(id=ctx.model_name, root=str(root) if root else ctx.model_name, max_model_len=ctx.max_model_len)


# ---------------------------------------------------------------------------------------------- running requests


def _as_api_error(e: Exception) -> Exception:
    """What an exception out of the engine becomes: ValueError → 400, our own kinds as they are, the rest → 500."""
    if isinstance(e, (APIError, InvalidRequest, ClientDisconnected, EngineFailure)):
        return e
    if isinstance(e, ValueError):
        return InvalidRequest(str(e))
    log.error("the engine failed a request", exc_info=e)
    return APIError(500, f"Internal server error ({type(e).__name__}: {e})")


async def _collect(request: Request, gen: Generation) -> list[RequestOutput]:
    """Run a generation to its end (non-streaming), aborting it if the client leaves meanwhile."""

    async def drain() -> dict[int, RequestOutput]:
        finals: dict[int, RequestOutput] = {}
        while (item := await gen.next()) is not None:
            raise_if_failed(item[1])  # fail fast: close() then aborts the other prompts
            finals[item[0]] = item[1]
        return finals

    try:
        finals = await until_disconnect(request, drain())
    except Exception as e:
        raise _as_api_error(e) from None
    finally:
        await gen.close()
    return [finals[i] for i in sorted(finals)]


async def _streaming_response(request: Request, gen: Generation, stream: CompletionStream | ChatStream) -> Response:
    # Wait for the first output before answering 200, so that an engine refusal is still an HTTP 400.
    try:
        first = await until_disconnect(request, gen.next())
    except Exception as e:
        await gen.close()
        raise _as_api_error(e) from None
    except BaseException:
        await gen.close()
        raise

    async def body() -> AsyncIterator[str]:
        try:
            try:
                for chunk in stream.start():
                    yield sse(chunk)
                item = first
                while item is not None:
                    for chunk in stream.chunks(*item):
                        yield sse(chunk)
                    item = await gen.next()
                if stream.include_usage:
                    yield sse(stream.usage_chunk())
            except EngineFailure as e:
                yield sse(_error_json(APIError(500, f"Generation failed: {e}", code="engine_error")))
            except ValueError as e:
                yield sse(_error_json(APIError(400, str(e))))
            except Exception as e:
                log.exception("error while streaming a response")
                yield sse(_error_json(APIError(500, f"Internal server error ({type(e).__name__}: {e})")))
            yield SSE_DONE
        finally:
            await gen.close()

    # The background task closes the generation even if the client left before the body was ever iterated.
    return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS,
                             background=BackgroundTask(gen.close))


