"""A reward served over HTTP (``genalign serve-reward``): the reward model lives in its own process
(its own environment, its own GPU), the trainer calls it with ``reward: {name: remote, ...}``
(:mod:`genalign.rewards.remote`), as flow_grpo's reward-server and Flow-Factory's serve theirs.

Endpoints (FastAPI on uvicorn):

- ``POST /score``: ``{"images": {...}, "prompts": [...], "metadata": [...] | null}`` (the image
  encodings of :func:`genalign.rewards.remote.encode_images`) -> ``{"scores": [...], "subscores":
  {...}, "batch_images": n}``. Requests that arrive together are scored as one batch (dynamic
  batching: up to ``max_batch`` images, waiting at most ``max_wait`` seconds for more), one batch at
  a time in a worker thread.
- ``GET /health``: the reward's name, whether it is differentiable (never, over the wire), the
  batching settings and counters.

Bad requests (malformed JSON, unknown fields, wrong shapes, undecodable images, inputs the reward
refuses) are answered 400 with ``{"error": ...}`` and never stop the server; a batch that fails is
scored again request by request, so one bad request does not fail its neighbours. Bodies larger than
``max_request_bytes`` are refused (413) before they are read whole, and images that would decode to
more than 4x that (float32) or have a side over 8192 are refused (400) before they are decoded. The
reward never sees more than ``max_batch`` images at once (its memory bound); a client that has gone
(timed out) is not scored. With a token, requests without
``Authorization: Bearer <token>`` are refused (401). Listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from torch import Tensor

from genalign.rewards.base import RewardInputError, RewardModel, check_inputs
from genalign.rewards.remote import decode_images

FIELDS = {"images", "prompts", "metadata"}


@dataclass
class _Request:
    images: Tensor
    prompts: list[str]
    metadata: list[dict[str, Any]] | None
    future: asyncio.Future = field(repr=False)
    disconnected: Any = None  # async () -> bool: the client gave up (timed out); not scored then


@dataclass
class Counters:
    requests: int = 0
    images: int = 0
    batches: int = 0
    largest_batch: int = 0
    refused: int = 0


class Batcher:
    """Collects requests into batches of at most ``max_batch`` images (waiting at most ``max_wait``
    seconds after the first; a request of more images is scored alone, ``max_batch`` at a time) and
    scores each batch in one worker thread. Requests whose client has gone are not scored."""

    def __init__(self, reward: RewardModel, max_batch: int, max_wait: float, counters: Counters):
        self.reward, self.max_batch, self.max_wait, self.counters = reward, max_batch, max_wait, counters
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.carry: _Request | None = None  # the request that did not fit in the last batch starts the next
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")

    async def submit(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any]] | None,
                     disconnected: Any = None) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Request(images, prompts, metadata, future, disconnected))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first, self.carry = self.carry or await self.queue.get(), None
            batch, size = [first], len(first.prompts)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self.queue.get(), left)
                except asyncio.TimeoutError:
                    break
                if size + len(nxt.prompts) > self.max_batch:
                    self.carry = nxt
                    break
                batch.append(nxt)
                size += len(nxt.prompts)
            batch = [r for r in batch if not r.future.done() and not (r.disconnected and await r.disconnected())]
            for group in _groups(batch):
                try:
                    results = await loop.run_in_executor(self.worker, self._score, group)
                except Exception:  # noqa: BLE001 - one bad request must not fail its neighbours
                    results = []
                    for request in group:
                        try:
                            results.append((await loop.run_in_executor(self.worker, self._score, [request]))[0])
                        except Exception as err:  # noqa: BLE001 - answered as that request's error
                            results.append(err)
                for request, result in zip(group, results):
                    if request.future.done():
                        continue
                    if isinstance(result, BaseException):
                        request.future.set_exception(result)
                    else:
                        request.future.set_result(result)

    def _score(self, group: list[_Request]) -> list[dict[str, Any]]:
        images = torch.cat([r.images for r in group])
        prompts = [p for r in group for p in r.prompts]
        metadata = None if group[0].metadata is None else [m for r in group for m in r.metadata or []]
        parts = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.max_batch):  # never more than max_batch at once
                end = start + self.max_batch
                parts.append(self.reward(images[start:end], prompts[start:end],
                                         None if metadata is None else metadata[start:end]))
                self.counters.batches += 1
                self.counters.largest_batch = max(self.counters.largest_batch, len(prompts[start:end]))
        scores = torch.cat([scores for scores, _ in parts])
        subscores = {k: torch.cat([sub[k] for _, sub in parts]) for k in parts[0][1]}
        out, start = [], 0
        for r in group:
            end = start + len(r.prompts)
            out.append({"scores": scores[start:end].float().cpu().tolist(),
                        "subscores": {k: v[start:end].float().cpu().tolist() for k, v in subscores.items()},
                        "batch_images": len(prompts)})
            start = end
        return out


def _groups(batch: list[_Request]) -> list[list[_Request]]:
    """Requests that can share one reward call: the same image size, all with metadata or none."""
    groups: dict[tuple, list[_Request]] = {}
    for r in batch:
        groups.setdefault((tuple(r.images.shape[1:]), r.metadata is None), []).append(r)
    return list(groups.values())


def parse_request(body: bytes, max_images: int, max_bytes: int = 2**31) -> tuple[Tensor, list[str], list[dict[str, Any]] | None]:
    """A request body as (images, prompts, metadata); :class:`RewardInputError` says what is wrong."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise RewardInputError(f"the body is not JSON: {err}") from err
    if not isinstance(data, dict):
        raise RewardInputError("the body must be a JSON object with images, prompts and metadata")
    unknown = set(data) - FIELDS
    if unknown:
        raise RewardInputError(f"unknown field(s) {sorted(unknown)}; a request has {sorted(FIELDS)}")
    if "images" not in data or "prompts" not in data:
        raise RewardInputError("a request needs images and prompts")
    images = decode_images(data["images"], max_images, max_bytes)
    prompts, metadata = data["prompts"], data.get("metadata")
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RewardInputError("prompts must be a list of strings")
    if metadata is not None and (not isinstance(metadata, list) or not all(isinstance(m, dict) for m in metadata)):
        raise RewardInputError("metadata must be null or a list of objects, one per image")
    check_inputs(images, prompts, metadata)
    return images, prompts, metadata


def make_app(reward: RewardModel, max_batch: int = 16, max_wait: float = 0.01, token: str | None = None,
             max_request_bytes: int = 256 * 2**20) -> Any:
    """The FastAPI application serving ``reward``."""
    counters = Counters()
    state: dict[str, Any] = {}

    def stopped(task: asyncio.Task) -> None:  # the batcher died: say so to every waiting and later request
        if not task.cancelled() and task.exception() is not None:
            state["dead"] = task.exception()
            batcher = state["batcher"]
            while not batcher.queue.empty():
                request = batcher.queue.get_nowait()
                if not request.future.done():
                    request.future.set_exception(RuntimeError(f"the batcher stopped: {state['dead']!r}"))

    @asynccontextmanager
    async def lifespan(app: Any) -> Any:
        state["batcher"] = Batcher(reward, max_batch, max_wait, counters)
        task = asyncio.create_task(state["batcher"].run())
        task.add_done_callback(stopped)
        yield
        task.cancel()
        state["batcher"].worker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="genalign reward service", lifespan=lifespan)
    app.state.counters = counters

    def refuse(status: int, message: str) -> JSONResponse:
        counters.refused += 1
        return JSONResponse({"error": message}, status_code=status)

    def authorised(request: Request) -> bool:
        if token is None:
            return True
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    @app.get("/health")
    async def health(request: Request) -> Any:
        if not authorised(request):
            return refuse(401, "missing or wrong token (Authorization: Bearer ...)")
        return {"status": "ok", "reward": reward.label, "differentiable": False, "max_batch": max_batch,
                "max_wait": max_wait, **vars(counters)}

    @app.post("/score")
    async def score(request: Request) -> Any:
        if not authorised(request):
            return refuse(401, "missing or wrong token (Authorization: Bearer ...)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_request_bytes:
            return refuse(413, f"the body is {int(declared)} bytes; this server takes at most {max_request_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_request_bytes:
                return refuse(413, f"the body is over {max_request_bytes} bytes, the most this server takes")
        if "dead" in state:
            return refuse(500, f"the batcher stopped: {state['dead']!r}")
        try:  # decoding is CPU work: off the event loop, so batching and /health go on meanwhile
            images, prompts, metadata = await asyncio.to_thread(parse_request, bytes(body), 4 * max_batch + 4096,
                                                                4 * max_request_bytes)
        except RewardInputError as err:
            return refuse(400, str(err))
        counters.requests += 1
        counters.images += len(prompts)
        try:
            return await state["batcher"].submit(images, prompts, metadata, request.is_disconnected)
        except (RewardInputError, ValueError, KeyError) as err:  # inputs this reward refuses
            return refuse(400, f"{type(err).__name__}: {err}")
        except Exception as err:  # noqa: BLE001 - the reward failed; the server stays up
            return refuse(500, f"the reward failed: {type(err).__name__}: {err}")

    return app


class BackgroundServer:
    """``make_app`` served by uvicorn in a thread of this process (tests, benchmarks, notebooks):
    ``with BackgroundServer(reward) as url: ...``; ``stop()`` ends it."""

    def __init__(self, reward: RewardModel, host: str = "127.0.0.1", port: int = 0, **options: Any):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.app = make_app(reward, **options)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host=host, port=port, log_level="warning"))
        self.url = f"http://{host}:{port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the reward server did not start on {self.url}")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


__all__ = ["BackgroundServer", "Batcher", "make_app", "parse_request"]
