"""The steered model behind an OpenAI-compatible HTTP API (FastAPI + uvicorn): `/v1/completions`, `/v1/models`,
`/health`. serve.py runs it; docs/integrations.md documents the requests it takes.

A request's prompts become jobs of the decode queue (proxytune/integrations/batching.py), which decodes the
prompts of concurrent requests together in batches; the event loop only parses, checks and answers. Log-probs are
the blend's, teacher-forced over the returned tokens (steering/scoring.py, as steer.py --tune scores), whatever the
temperature. A bad request gets a 4xx with OpenAI's error body, {"error": {"message", "type", "param", "code"}},
and the server keeps serving; with an API key, /v1/* needs `Authorization: Bearer KEY` (compared in constant time).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from proxytune.foundation.errors import UsageError
from proxytune.foundation.validation import SEED_MAX, number_problems
from proxytune.integrations.batching import DecodeQueue, Job, JobResult, sampling_group, seeded_generator
from proxytune.integrations.steered import SteeredModel
from proxytune.task.arguments import TEMPLATE_HELP

logger = logging.getLogger(__name__)


DEFAULT_MODEL_NAME = "proxytune-steered"


MAX_LOGPROBS = 20  # top tokens per position at most (OpenAI allows 5, vLLM 20)


MAX_N = 16  # completions per prompt at most


LOOPBACK = ("127.0.0.1", "localhost", "::1")


API_KEY_ENV = "PROXYTUNE_API_KEY"  # the key without putting it on the command line (where `ps` shows it)


@dataclass
class ServeArguments:
    alpha: float | None = field(
        default=None, metadata={"help": "Proxy-tuning strength: w_L = 1, w_tuned = w_base = alpha (default 1.0)."})
    blend: str | None = field(default=None, metadata={
        "help": "A blend JSON (steer.py --tune writes one); model flags left out come from its record of the models. "
                "Excludes --alpha."})
    host: str = field(default="127.0.0.1", metadata={
        "help": "Address to listen on. The default answers this machine only; 0.0.0.0 answers every network "
                "(give --api_key then)."})
    port: int = field(default=8000, metadata={"help": "TCP port (0: a free one, logged at start)."})
    api_key: str | None = field(default=None, metadata={
        "help": f"Refuse /v1/* requests without 'Authorization: Bearer KEY' (compared in constant time). Also read "
                f"from the environment variable {API_KEY_ENV}, which keeps it out of the process list. Default: none."})
    model_name: str = field(default=DEFAULT_MODEL_NAME, metadata={
        "help": "The model id /v1/models lists and requests name (requests naming another get 404)."})
    batch_size: int = field(default=8, metadata={
        "help": "Rows (prompts) decoded together at most; also the batches a seeded sampled request is decoded in "
                "(as steer.py --batch_size)."})
    batch_wait_ms: float = field(default=20.0, metadata={
        "help": "How long the batcher waits, before a batch, for the clients the last batch answered to come back "
                "(0: never; a lone client never waits)."})
    speculative: bool = field(default=True, metadata={
        "help": "Decode speculatively, S_tuned drafting (as steer.py: same greedy output, fewer L steps); false = "
                "the plain loop."})
    draft_tokens: int = field(default=2, metadata={
        "help": "Tokens S_tuned drafts per speculative round (0 = adaptive)."})
    seed: int = field(default=0, metadata={"help": "Seed of sampled requests that give no seed of their own."})
    prompt_template: str | None = field(default=None, metadata={
        "help": TEMPLATE_HELP + " Default: the template the --small_tuned_model directory (fine_tune.py's final/) or "
                "the --blend file records, else meta_review (a recorded one that differs is warned about). "
                "/v1/models lists it; --use_template puts prompts into it."})
    use_template: bool = field(default=False, metadata={
        "help": "Put each text prompt into the prompt template, as steer.py does --prompt (the text is the reviews, "
                "or the instruction), its texts cut to leave max_tokens in the context; echo returns the templated "
                "prompt. Default false: prompts reach the models as sent. Token-id prompts are always as sent."})

    def __post_init__(self):
        problems = number_problems(self, {"alpha": "[0, inf)", "port": "[0, 65535]", "batch_size": "[1, inf)",
                                          "batch_wait_ms": "[0, inf)", "draft_tokens": ("[0, inf)", "0 = adaptive"),
                                          "seed": f"[0, {SEED_MAX}]"})
        if self.alpha is not None and self.blend is not None:
            problems.append("give either --alpha or --blend, not both")
        if self.api_key is not None and not self.api_key.strip():
            problems.append("--api_key is empty; give a key or leave the flag out")
        if problems:
            raise UsageError("; ".join(problems))


class ApiError(Exception):
    """A request the API refuses: HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields that a steered model can honour. Unknown fields and
    non-finite numbers are refused (a field silently ignored would answer a question the client did not ask)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str | None = None
    prompt: str | list[int] | list[list[int]] | list[str]
    max_tokens: int | None = Field(16, ge=0)  # None: up to the context
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)  # 0: greedy
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    n: int | None = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = False
    stream: bool | None = False
    user: str | None = None


def validation_error(err: RequestValidationError) -> ApiError:
    """Pydantic's first complaint as an OpenAI error naming the field."""
    first = err.errors()[0]
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', first.get('msg'))}",
                        None, "invalid_json")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = loc[0] if loc else None
    if first.get("type") == "extra_forbidden":
        known = ", ".join(CompletionRequest.model_fields)
        return ApiError(400, f"unknown field '{param}' (this server takes: {known})", param, "unknown_field")
    where = ".".join(loc) or "the body"
    return ApiError(400, f"{where}: {first.get('msg')}", param, "invalid_value")


class Completions:
    """Turns a CompletionRequest into decode-queue jobs and their results into OpenAI's answer."""

    def __init__(self, steered: SteeredModel, queue: DecodeQueue, model_name: str, use_template: bool = False):
        self.steered, self.queue, self.model_name, self.use_template = steered, queue, model_name, use_template
        self.tokenizer = steered.tokenizer
        self._ids = itertools.count()

    def prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        """The prompts as token ids and as text (for echo): a string, a list of strings, a list of token ids or
        a list of such lists. Each must be non-empty, with ids inside the vocabulary. With use_template, a string is
        put into the steered model's prompt template first (cut to leave max_tokens)."""
        given = body.prompt
        if isinstance(given, str) or (given and isinstance(given[0], int)):
            given = [given]
        if not given:
            raise ApiError(400, "prompt is empty: give a string, a list of strings or of token-id lists", "prompt")
        ids, texts = [], []
        for i, p in enumerate(given):
            if isinstance(p, str):
                if self.use_template:
                    p = self.templated(i, p, body.max_tokens)
                tokens = self.tokenizer(p, add_special_tokens=False)["input_ids"]  # as steer.py encodes prompts
                text = p
            else:
                bad = [t for t in p if not 0 <= t < self.steered.vocab_size]
                if bad:
                    raise ApiError(400, f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                                   f"[0, {self.steered.vocab_size})", "prompt", "invalid_value")
                tokens, text = list(p), self.tokenizer.decode(p)
            if not tokens:
                raise ApiError(400, f"prompt {i} is empty", "prompt", "invalid_value")
            ids.append(tokens)
            texts.append(text)
        return ids, texts

    def templated(self, i: int, text: str, max_tokens: int | None) -> str:
        """Prompt `i`'s text in the template, cut to leave `max_tokens` (None: uncut) in the context."""
        budget = None if max_tokens is None else self.steered.context - max_tokens
        if budget is not None and budget < 1:
            raise ApiError(400, f"max_tokens {max_tokens} leaves no room for prompt {i} in this model's context of "
                           f"{self.steered.context} tokens", "max_tokens", "context_length_exceeded")
        try:
            return self.steered.templated(text, budget)
        except UsageError as err:
            raise ApiError(400, f"prompt {i}: {err}", "prompt", "invalid_value") from None

    def jobs(self, body: CompletionRequest, prompts: list[list[int]],
             done_for: Callable[[int], Callable[[JobResult | BaseException], None]]) -> list[tuple[int, Job]]:
        """(choice index, job) per prompt and completion (`done_for(index)`: the job's callback); seeded sampled
        jobs in steer.py's order."""
        if body.stream:
            raise ApiError(400, "stream is not supported; leave it false", "stream", "unsupported_value")
        if body.model not in (None, self.model_name):
            raise ApiError(404, f"the model '{body.model}' does not exist; this server serves '{self.model_name}'",
                           "model", "model_not_found")
        context = self.steered.context
        temperature = 1.0 if body.temperature is None else body.temperature
        top_p = 1.0 if body.top_p is None else body.top_p
        n = body.n or 1
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        request_id = next(self._ids)
        generator = None
        if temperature > 0 and body.seed is not None:
            generator = seeded_generator(self.steered.device, body.seed)
        out = []
        for i, prompt in enumerate(prompts):
            max_tokens = context - len(prompt) if body.max_tokens is None else body.max_tokens
            if len(prompt) + max_tokens > context:
                raise ApiError(400, f"this model's context is {context} tokens, but prompt {i} has {len(prompt)} "
                               f"and max_tokens is {max_tokens}: shorten the prompt or lower max_tokens",
                               "max_tokens" if len(prompt) < context else "prompt", "context_length_exceeded")
            for j in range(n):
                out.append((i * n + j, Job(
                    prompt, max(max_tokens, 0), done_for(i * n + j), stop, temperature, top_p, body.logprobs,
                    bool(body.echo), sampling_group(temperature, top_p, body.seed, request_id), generator)))
        if generator is not None:  # steer.py decodes longest prompt first (a stable sort): the draws follow it
            out.sort(key=lambda pair: -len(pair[1].prompt))
        return out

    def choice(self, index: int, job: Job, prompt_text: str, result: JobResult) -> dict[str, Any]:
        completion = result.completion
        text = prompt_text + completion.text if job.echo else completion.text
        choice = {"index": index, "text": text, "logprobs": None, "finish_reason": completion.finish_reason}
        if result.logprobs is not None:
            ids = (job.prompt if job.echo else []) + completion.tokens
            first = [None] if job.echo else []  # the prompt's first token has no log-prob
            tokens = [self.tokenizer.decode([t]) for t in ids]
            tops = []
            for token, logprob, top in zip(tokens[len(first):], result.logprobs.logprobs, result.logprobs.top):
                best: dict[str, float] = {}
                for tid, lp in top:  # most likely first; two ids that decode alike keep the likelier
                    best.setdefault(self.tokenizer.decode([tid]), lp)
                best.setdefault(token, logprob)  # the chosen token is always there, as OpenAI returns it
                tops.append(best)
            # offsets into `text` of each token's own decoded text
            offsets = list(itertools.accumulate([0] + [len(t) for t in tokens[:-1]])) if tokens else []
            choice["logprobs"] = {"tokens": tokens, "token_logprobs": first + result.logprobs.logprobs,
                                  "top_logprobs": first + tops, "text_offset": offsets}
        return choice

    async def create(self, body: CompletionRequest) -> dict[str, Any]:
        prompts, texts = self.prompts(body)
        loop = asyncio.get_running_loop()
        futures: dict[int, asyncio.Future] = {}

        def done_for(index: int) -> Callable[[JobResult | BaseException], None]:
            future = futures[index] = loop.create_future()
            return lambda result: loop.call_soon_threadsafe(_settle, future, result)

        pairs = self.jobs(body, prompts, done_for)
        self.queue.submit([job for _, job in pairs])
        results = await asyncio.gather(*(futures[index] for index, _ in pairs))
        n = body.n or 1
        choices = sorted((self.choice(index, job, texts[index // n], result)
                          for (index, job), result in zip(pairs, results)), key=lambda c: c["index"])
        completion_tokens = sum(len(r.completion.tokens) for r in results)
        prompt_tokens = sum(map(len, prompts))
        return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": choices,
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                          "total_tokens": prompt_tokens + completion_tokens}}


def _settle(future: asyncio.Future, result: JobResult | BaseException) -> None:
    """Hand a job's result to its request (unless the client went away and the request was cancelled)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)


def key_check(api_key: str | None):
    """The dependency of /v1/*: without a key, nothing; with one, `Authorization: Bearer KEY`, compared in constant
    time (hmac.compare_digest), else 401."""

    async def check(authorization: str | None = Header(default=None)) -> None:
        if api_key is None:
            return
        scheme, _, given = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                           "invalid_api_key")

    return check


def create_app(steered: SteeredModel, *, model_name: str = DEFAULT_MODEL_NAME, api_key: str | None = None,
               batch_size: int = 8, batch_wait_s: float = 0.02, seed: int = 0, use_template: bool = False) -> FastAPI:
    """The FastAPI app over a loaded steered model; its decode queue runs while the app does
    (`app.state.queue`). `use_template`: text prompts go into the steered model's prompt template."""
    queue = DecodeQueue(steered, batch_size=batch_size, wait_s=batch_wait_s, seed=seed)
    completions = Completions(steered, queue, model_name, use_template)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        queue.start()
        try:
            yield
        finally:
            await asyncio.to_thread(queue.close)

    app = FastAPI(title="proxytune steered model", lifespan=lifespan)
    app.state.queue = queue

    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(Exception)
    async def failed(request: Request, err: Exception) -> JSONResponse:
        logger.error("request failed: %s", err)
        return ApiError(500, f"the server failed on this request: {err}", kind="server_error").response()

    authorized = [Depends(key_check(api_key))]

    @app.post("/v1/completions", dependencies=authorized)
    async def create_completion(body: CompletionRequest) -> dict[str, Any]:
        return await completions.create(body)

    @app.get("/v1/models", dependencies=authorized)
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": started,
                                            "owned_by": "proxytune", "max_model_len": steered.context,
                                            "prompt_template": steered.template.record()}]}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app until interrupted (uvicorn)."""
    uvicorn.run(app, host=host, port=port, log_level="info")


@contextlib.contextmanager
def serving(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 60.0) -> Iterator[str]:
    """Run the app in a background thread for the block (port 0: a free one): yields its base URL,
    http://HOST:PORT (tests, benchmarks)."""
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout_s)
