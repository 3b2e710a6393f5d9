"""The HTTP layer: OpenAI's `/v1/models`, `/v1/completions`, `/v1/chat/completions` and `/health`
on FastAPI, streaming as server-sent events in OpenAI's chunk format.

It validates requests, turns text into token ids (the chat template for chat), hands each prompt
to the scheduler as a `scheduler.Request` and turns the scheduler's `Output`s back into OpenAI's
JSON; it knows nothing of slots or the device. The scheduler calls back on its own thread; each call
crosses into the event loop with `call_soon_threadsafe`. A client that goes away (mid-stream, or
while waiting for a whole answer) cancels its requests, which frees their slots.

Every error is OpenAI's error JSON, `{"error": {"message", "type", "param", "code"}}`: 400 for a
bad request (malformed JSON, a failed check, a body over the size limit), 401 for a missing or
wrong API key, 404 for an unknown model (`model_not_found`, as OpenAI answers) and unknown routes,
405 for a wrong method, 500 if the engine fails.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from llama_jax.serve import protocol as P
from llama_jax.serve.scheduler import Output, Request, Scheduler

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 << 20


class _Guard:
  """Pure ASGI middleware in front of the routes: the API key on every route but `/health` (before
  any body is read; unknown routes too, so a wrong key learns nothing of what exists), then the
  body size, counted as it arrives (a `Content-Length` is not trusted) and replayed to the app."""

  def __init__(self, app, api_key: str | None, max_body_bytes: int):
    self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    if self.api_key and scope["path"] != "/health" and not self._authorized(scope):
      return await _send_json(send, 401, P.error_body(
          "Incorrect or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key"))
    if scope["method"] not in ("POST", "PUT", "PATCH"):
      return await self.app(scope, receive, send)
    too_large = P.error_body(f"request body larger than the limit of {self.max_body_bytes} bytes",
                             code="request_too_large")
    declared = dict(scope["headers"]).get(b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
      return await _send_json(send, 400, too_large)
    chunks, size = [], 0
    while True:
      message = await receive()
      if message["type"] == "http.disconnect":
        return
      chunks.append(message.get("body", b""))
      size += len(chunks[-1])
      if size > self.max_body_bytes:
        return await _send_json(send, 400, too_large)
      if not message.get("more_body"):
        break
    replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

    async def replayed():
      return replay.pop() if replay else await receive()

    return await self.app(scope, replayed, send)

  def _authorized(self, scope) -> bool:
    header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
    scheme, _, key = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(key.strip().encode(), self.api_key.encode())


async def _send_json(send, status: int, body: dict) -> None:
  data = json.dumps(body).encode()
  headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
  await send({"type": "http.response.start", "status": status, "headers": headers})
  await send({"type": "http.response.body", "body": data})


def _sse(body: dict | str) -> str:
  return f"data: {body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)}\n\n"


class Server:
  """What the routes share: the scheduler, the tokenizer and the limits."""

  def __init__(self, scheduler: Scheduler, tokenizer, model_name: str, max_len: int,
               encode_chat: Callable[[list[dict]], list[int]], vocab_size: int, created: int,
               chat_stop_ids: Sequence[int] = ()):
    self.scheduler, self.tokenizer, self.model_name = scheduler, tokenizer, model_name
    self.max_len, self.encode_chat, self.vocab_size, self.created = max_len, encode_chat, vocab_size, created
    self.chat_stop_ids = frozenset(int(i) for i in chat_stop_ids)
    # Token ids a prompt may hold: the model's embedding may have more rows than the tokenizer has
    # tokens (padded), and an id past the tokenizer's cannot be turned into text.
    self.id_limit = min(vocab_size, getattr(tokenizer, "vocab_size", vocab_size))

  # --- requests in

  def check_model(self, name: str) -> None:
    _check_text(name, "model")  # the message below quotes it: it must be text JSON can carry
    if name != self.model_name:
      raise P.InvalidRequest(f"The model '{name}' does not exist; this server serves '{self.model_name}'",
                             "model", "model_not_found", status=404)

  def token_limit(self, prompt: list[int], asked: int | None, prompt_param: str) -> int:
    """max_tokens checked against the context: prompt and answer must fit `max_len`.
    `prompt_param` is the request's field the prompt came from ("prompt" or "messages")."""
    n = len(prompt)
    if n >= self.max_len:
      raise P.InvalidRequest(
          f"This model's maximum context length is {self.max_len} tokens; the prompt has {n} tokens, "
          "which leaves no room for an answer", prompt_param, "context_length_exceeded")
    if asked is None:
      return self.max_len - n
    if asked < 1:
      raise P.InvalidRequest(f"max_tokens must be >= 1, got {asked}", "max_tokens")
    if n + asked > self.max_len:
      raise P.InvalidRequest(
          f"This model's maximum context length is {self.max_len} tokens. However, you requested "
          f"{n + asked} tokens ({n} in the prompt, {asked} for the completion)", "max_tokens",
          "context_length_exceeded")
    return asked

  def make_requests(self, body: P.GenerationRequest, prompts: list[list[int]], limits: list[int],
                    logprobs: int | None, emit: Callable[[int, Output], None],
                    chat: bool = False) -> list[Request]:
    """A chat answer is text of its own (a completion continues its prompt's) and also ends at
    the chat template's end of turn."""
    stops = body.stop_strings()
    return [Request(prompt=p, max_tokens=m, emit=lambda out, i=i: emit(i, out),
                    temperature=body.temperature, top_k=max(body.top_k, 0), top_p=body.top_p,
                    seed=body.seed, stop=tuple(stops), logprobs=logprobs, ignore_eos=body.ignore_eos,
                    continues_prompt=not chat, stop_ids=self.chat_stop_ids if chat else frozenset())
            for i, (p, m) in enumerate(zip(prompts, limits))]

  def encode_prompts(self, body: P.CompletionRequest) -> list[list[int]]:
    ids = []
    for prompt in body.prompts():
      if isinstance(prompt, str):
        _check_text(prompt, "prompt")
        ids.append(self.tokenizer.encode(prompt))
        if not ids[-1]:  # a tokenizer that adds no BOS encodes "" to nothing: no position to start from
          raise P.InvalidRequest("the prompt is empty (it encodes to no tokens)", "prompt")
      else:
        if not prompt or min(prompt) < 0 or max(prompt) >= self.id_limit:
          raise P.InvalidRequest(f"token-id prompts must be non-empty with ids in [0, {self.id_limit})",
                                 "prompt")
        ids.append(list(prompt))
    return ids

  # --- outputs back

  @staticmethod
  def completion_logprobs(logprobs) -> dict:
    """The legacy format: top_logprobs maps each alternative's text to its log-prob. Alternatives
    of the same text (the parts of characters, each U+FFFD; chat's format keeps their bytes) share
    one key, which keeps the likeliest's log-prob (they come best first)."""
    return {"tokens": [lp.text for lp in logprobs], "token_logprobs": [lp.logprob for lp in logprobs],
            "top_logprobs": [_first_of_each_text(lp.top) for lp in logprobs],
            "text_offset": [lp.offset for lp in logprobs]}

  @staticmethod
  def chat_logprobs(logprobs) -> dict:
    entry = lambda lp: {"token": lp.text, "logprob": lp.logprob, "bytes": list(lp.raw)}
    return {"content": [dict(entry(lp), top_logprobs=[entry(alt) for alt in lp.top]) for lp in logprobs]}


def _first_of_each_text(alternatives) -> dict[str, float]:
  top: dict[str, float] = {}
  for alt in alternatives:
    top.setdefault(alt.text, alt.logprob)
  return top


def _check_text(text: str, param: str) -> None:
  """A lone surrogate (`"\\ud800"` in JSON) is no UTF-8: tokenizers fail on it each their own way
  (SentencePiece with a RuntimeError), so it is refused before any of them sees it."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise P.InvalidRequest(f"{param}: not valid text: {e}", param) from None


class _Run:
  """One HTTP call's requests in the scheduler, their outputs arriving on an asyncio queue."""

  def __init__(self, server: Server, make: Callable[[Callable[[int, Output], None]], list[Request]]):
    self.loop = asyncio.get_running_loop()
    self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
    self.server = server
    self.requests = make(self._put)
    self.finished: set[int] = set()

  def _put(self, i: int, out: Output) -> None:
    """On the scheduler's thread."""
    try:
      self.loop.call_soon_threadsafe(self.queue.put_nowait, (i, out))
    except RuntimeError:  # the event loop is closed: the server is stopping, nobody is listening
      self.server.scheduler.cancel(self.requests[i])

  def start(self) -> "_Run":
    """Hands the requests to the scheduler; from here on, they must be cancelled if unwanted."""
    for r in self.requests:
      self.server.scheduler.submit(r)
    return self

  async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
    while len(self.finished) < len(self.requests):
      i, out = await self.queue.get()
      if out.finish_reason is not None:
        self.finished.add(i)
      yield i, out

  def cancel(self) -> None:
    for i, r in enumerate(self.requests):
      if i not in self.finished:
        self.server.scheduler.cancel(r)

  async def collect(self) -> list[tuple[str, list, Output]]:
    """(text, logprobs, last output) per request."""
    texts = [[] for _ in self.requests]
    logprobs = [[] for _ in self.requests]
    last: list[Any] = [None] * len(self.requests)
    async for i, out in self.outputs():
      texts[i].append(out.text)
      logprobs[i] += out.logprobs or []
      last[i] = out
    for out in last:
      if out.finish_reason == "error":
        raise P.InvalidRequest(out.error or "engine failure", status=500, kind="server_error")
    return [("".join(t), lp, out) for t, lp, out in zip(texts, logprobs, last)]


async def _until_disconnected(request: HttpRequest) -> None:
  while (await request.receive())["type"] != "http.disconnect":
    pass


async def _collect_unless_gone(run: _Run, request: HttpRequest):
  """The whole answer, or None if the client leaves first (then its requests are cancelled)."""
  answer = asyncio.ensure_future(run.start().collect())
  gone = asyncio.ensure_future(_until_disconnected(request))
  try:
    await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
  finally:
    if not answer.done():
      run.cancel()
      answer.cancel()
    gone.cancel()
  return answer.result() if answer.done() and not answer.cancelled() else None


def _stream(run: _Run, chunks: Callable[[int, Output], list[dict]], head: list[dict],
            tail: Callable[[], list[dict]]) -> StreamingResponse:
  async def events():
    finished = False
    try:  # submitted here, so that the `finally` below sees every request that was
      run.start()
      for body in head:
        yield _sse(body)
      async for i, out in run.outputs():
        if out.finish_reason == "error":
          yield _sse(P.error_body(out.error or "engine failure", "server_error"))
          continue
        for body in chunks(i, out):
          yield _sse(body)
      for body in tail():
        yield _sse(body)
      yield _sse("[DONE]")
      finished = True
    finally:
      if not finished:  # the client went away (or the server is stopping)
        run.cancel()

  return StreamingResponse(events(), media_type="text/event-stream",
                           headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(scheduler: Scheduler, tokenizer, *, model_name: str, max_len: int, vocab_size: int,
               encode_chat: Callable[[list[dict]], list[int]], api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, created: int | None = None,
               profile_dir: str | None = None, chat_stop_ids: Sequence[int] = ()) -> Any:
  """The ASGI app. `encode_chat(messages) -> ids` renders a conversation's generation prompt;
  `chat_stop_ids` end a chat answer besides the tokenizer's EOS ids (the template's end of turn).
  With `profile_dir`, `POST /start_profile` and `POST /stop_profile` bracket a jax.profiler trace
  written there (vLLM's endpoints of the same names): a loaded server's kernels and gaps."""
  server = Server(scheduler, tokenizer, model_name, max_len, encode_chat, vocab_size,
                  created or P.now(), chat_stop_ids)
  app = FastAPI(title="llama_jax", docs_url=None, redoc_url=None, openapi_url=None)
  app.state.server = server

  @app.exception_handler(RequestValidationError)
  async def _invalid(_, exc: RequestValidationError):
    first = exc.errors()[0] if exc.errors() else {}
    where = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":  # its loc holds a character position, not a field
      message, where = "the request body is not valid JSON", []
    else:
      message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid request')}"
    return JSONResponse(P.error_body(message, param=".".join(where) or None), status_code=400)

  @app.exception_handler(P.InvalidRequest)
  async def _refused(_, exc: P.InvalidRequest):
    return JSONResponse(P.error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status)

  @app.exception_handler(HTTPException)
  async def _http(_, exc: HTTPException):
    return JSONResponse(P.error_body(str(exc.detail), param=None, code=None), status_code=exc.status_code)

  @app.get("/health")
  async def health():
    return {"status": "ok", **scheduler.stats()}

  if profile_dir:
    import jax

    # Plain functions (FastAPI runs them on its thread pool): writing a trace out takes seconds,
    # which the event loop, streaming every answer, must not wait for.
    @app.post("/start_profile")
    def start_profile():
      try:
        jax.profiler.start_trace(profile_dir)
      except RuntimeError as e:  # one already running
        raise P.InvalidRequest(str(e)) from None
      return {"profiling": profile_dir}

    @app.post("/stop_profile")
    def stop_profile():
      try:
        jax.profiler.stop_trace()
      except RuntimeError as e:  # none running
        raise P.InvalidRequest(str(e)) from None
      return {"written": profile_dir}

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [P.model_card(model_name, server.created)]}

  # `path`: a Hugging Face id ("meta-llama/Llama-2-7b-hf") is a usual served name, its slash
  # sent as it is or escaped (%2F, as OpenAI's client does; the server reads it back as a slash).
  @app.get("/v1/models/{name:path}")
  async def model(name: str):
    server.check_model(name)
    return P.model_card(model_name, server.created)

  @app.post("/v1/completions")
  async def completions(body: P.CompletionRequest, request: HttpRequest):
    server.check_model(body.model)
    body.check()
    prompts = server.encode_prompts(body)
    limits = [server.token_limit(p, body.max_tokens if body.max_tokens is not None else 16, "prompt")
              for p in prompts]
    run = _Run(server, lambda emit: server.make_requests(body, prompts, limits, body.logprobs, emit))
    id_, created = P.new_id("cmpl"), P.now()
    logprobs_of = lambda i, lps: server.completion_logprobs(lps) if body.logprobs is not None else None
    if body.stream:
      totals = [0, 0]

      def chunks(i, out: Output):
        totals[0] += out.prompt_tokens
        totals[1] += out.completion_tokens
        usage = None
        if out.finish_reason and not body.include_usage():  # every answer carries its counts
          usage = P.usage(out.prompt_tokens, out.completion_tokens)
        choice = P.completion_choice(i, out.text, out.finish_reason, logprobs_of(i, out.logprobs or []))
        return [P.completion(id_, created, model_name, [choice], usage)]

      def tail():
        if not body.include_usage():
          return []
        return [P.completion(id_, created, model_name, [], P.usage(*totals))]

      return _stream(run, chunks, [], tail)
    answers = await _collect_unless_gone(run, request)
    if answers is None:
      return JSONResponse(P.error_body("client disconnected"), status_code=499)
    choices = [P.completion_choice(i, text, out.finish_reason, logprobs_of(i, lps))
               for i, (text, lps, out) in enumerate(answers)]
    usage = P.usage(sum(o.prompt_tokens for *_, o in answers), sum(o.completion_tokens for *_, o in answers))
    return P.completion(id_, created, model_name, choices, usage)

  @app.post("/v1/chat/completions")
  async def chat_completions(body: P.ChatRequest, request: HttpRequest):
    server.check_model(body.model)
    body.check()
    messages = [m.as_dict() for m in body.messages]
    for m in messages:
      _check_text(m["content"], "messages")
    try:
      prompt = server.encode_chat(messages)
    except ValueError as e:  # the template's checks: roles alternate, the user speaks last
      raise P.InvalidRequest(str(e), "messages") from None
    if not prompt:  # a template that renders to nothing, with a tokenizer that adds no BOS
      raise P.InvalidRequest("the messages render to no tokens", "messages")
    limit = server.token_limit(prompt, body.token_limit(), "messages")
    top = (body.top_logprobs or 0) if body.logprobs else None
    run = _Run(server, lambda emit: server.make_requests(body, [prompt], [limit], top, emit, chat=True))
    id_, created = P.new_id("chatcmpl"), P.now()
    logprobs_of = lambda lps: server.chat_logprobs(lps) if body.logprobs else None
    if body.stream:
      totals = [0, 0]
      head = [P.chat_chunk(id_, created, model_name, [
          P.chat_chunk_choice(0, {"role": "assistant", "content": ""}, None, None)])]

      def chunks(_, out: Output):
        totals[0] += out.prompt_tokens
        totals[1] += out.completion_tokens
        bodies = []
        if out.text or out.logprobs:
          bodies.append(P.chat_chunk(id_, created, model_name, [
              P.chat_chunk_choice(0, {"content": out.text}, None, logprobs_of(out.logprobs or []))]))
        if out.finish_reason:
          usage = None if body.include_usage() else P.usage(out.prompt_tokens, out.completion_tokens)
          bodies.append(P.chat_chunk(id_, created, model_name, [
              P.chat_chunk_choice(0, {}, out.finish_reason, None)], usage))
        return bodies

      def tail():
        if not body.include_usage():
          return []
        return [P.chat_chunk(id_, created, model_name, [], P.usage(*totals))]

      return _stream(run, chunks, head, tail)
    answers = await _collect_unless_gone(run, request)
    if answers is None:
      return JSONResponse(P.error_body("client disconnected"), status_code=499)
    (text, lps, out), = answers
    choice = P.chat_choice(0, text, out.finish_reason, logprobs_of(lps))
    usage = P.usage(out.prompt_tokens, out.completion_tokens)
    return P.chat_completion(id_, created, model_name, [choice], usage)

  return _Guard(app, api_key, max_body_bytes)


def resolve_chat_template(tokenizer, template=None):
  """The template a server chats in: `template`, else the tokenizer's own where it has one
  (`chat.template_for`, Hugging Face tokenizers), else the project's default."""
  from llama_jax.tokenizer import chat
  return template if template is not None else chat.template_for(tokenizer)


def chat_encoder(tokenizer, template=None) -> Callable[[Sequence[dict]], list[int]]:
  """messages -> the generation prompt's ids, in `resolve_chat_template(tokenizer, template)`."""
  template = resolve_chat_template(tokenizer, template)
  return lambda messages: template.encode_prompt(list(messages), tokenizer)
