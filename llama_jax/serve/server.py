"""The three layers put together: the slot engine on the model's mesh, the scheduler around it, the
HTTP app in front, and uvicorn serving it in this thread (`python -m llama_jax.serve`) or a
background one (tests, benchmarks).
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import threading
from typing import Any

from llama_jax.generate.slots import MIN_ATTEND, SlotEngine
from llama_jax.serve.app import DEFAULT_MAX_BODY_BYTES, chat_encoder, create_app, resolve_chat_template
from llama_jax.serve.scheduler import Scheduler

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Served:
  app: Any  # the ASGI app
  scheduler: Scheduler
  engine: SlotEngine


def build(model, *, model_name: str, max_batch: int = 64, max_len: int | None = None,
          decode_steps: int = 8, max_decode_steps: int | None = None, prefill_tokens: int = 4096,
          api_key: str | None = None, warmup: bool = False,
          max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, chat_template=None,
          min_attend: int = MIN_ATTEND, profile_dir: str | None = None,
          decode_attention: str = "auto", static_steps: bool = True, pack_prompts: bool = True,
          decode_kernels: str | None = None) -> Served:
  """A `llama_jax.Model` (with a tokenizer) -> its engine, a running scheduler and the app. The
  engine runs where the model's parameters lie (`model.mesh`, `model.rules`). `min_attend` is the
  shortest attention window compiled (tests of tiny contexts lower it); `profile_dir` adds the
  profiling endpoints (`create_app`); `decode_attention`, `static_steps`, `pack_prompts` and
  `decode_kernels` as `SlotEngine` takes them."""
  if model.tokenizer is None:
    raise ValueError("serving needs a tokenizer; the checkpoint has none (pass --tokenizer)")
  engine = SlotEngine(model.config, model.params, max_batch=max_batch, cache_len=max_len,
                      steps=decode_steps, max_steps=max_decode_steps, prefill_tokens=prefill_tokens,
                      min_attend=min_attend, mesh=model.mesh, rules=model.rules,
                      decode_attention=decode_attention, static_steps=static_steps,
                      pack_prompts=pack_prompts, decode_kernels=decode_kernels)
  if warmup:
    log.info("compiling %d batched prefills (%d prompt buckets) and %d decode calls",
             len(engine.prefill_shapes), len(engine.prompt_buckets), len(engine.generate_shapes))
    engine.warmup()
  scheduler = Scheduler(engine, model.tokenizer, model.tokenizer.eos_ids).start()
  template = resolve_chat_template(model.tokenizer, chat_template)
  app = create_app(scheduler, model.tokenizer, model_name=model_name, max_len=engine.cache_len,
                   vocab_size=model.config.vocab_size, encode_chat=chat_encoder(model.tokenizer, template),
                   chat_stop_ids=template.stop_ids(model.tokenizer), api_key=api_key,
                   max_body_bytes=max_body_bytes, profile_dir=profile_dir)
  return Served(app, scheduler, engine)


# Idle keep-alive connections are closed after this long. Longer than the clients' own expiry (the
# openai client's httpx pool: 5 s, uvicorn's default too): with equal times the server may close a
# connection just as the client sends its next request on it, which then fails without an answer
# ("Server disconnected without sending a response"); the client must be the one to let go first.
KEEP_ALIVE_S = 75


def uvicorn_server(app, log_level: str = "warning"):
  import uvicorn
  return uvicorn.Server(uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_keep_alive=KEEP_ALIVE_S))


def listen(host: str, port: int) -> socket.socket:
  """A listening socket (port 0: a free one); clients may connect before uvicorn accepts."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  sock.listen(2048)
  return sock


class BackgroundServer:
  """uvicorn on a thread of this process, on a socket that is listening before `start` returns (so
  no waiting for it to come up). `stop` ends uvicorn, then the scheduler."""

  def __init__(self, served: Served, host: str = "127.0.0.1", port: int = 0):
    self.served = served
    self.socket = listen(host, port)
    self.host, self.port = self.socket.getsockname()[:2]
    self.uvicorn = uvicorn_server(served.app)
    self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [self.socket]},
                                   name="llama_jax-uvicorn", daemon=True)

  @property
  def url(self) -> str:
    return f"http://{self.host}:{self.port}"

  def start(self) -> "BackgroundServer":
    self.thread.start()
    return self

  def stop(self) -> None:
    self.uvicorn.should_exit = True
    self.thread.join()
    self.socket.close()
    self.served.scheduler.stop()
