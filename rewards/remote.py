"""A reward served by another process (``genalign serve-reward``), used like a local one that is
not differentiable.

Config::

    reward:
      name: remote
      options: {url: "http://127.0.0.1:8765", timeout: 120, retries: 3, encoding: float32}

``encoding``: how images travel. ``float32`` (default) is exact: the served reward sees the very
values a local one would, so scores and trained weights match a local run's; ``uint8`` is 4x smaller
(the 8-bit image a file would hold); ``png`` is lossless 8-bit and smallest for flat images. A
shared token (``genalign serve-reward --token``) is read from the environment variable named by
``token_env`` (default ``GENALIGN_REWARD_TOKEN``), never from the config file.

A server that does not answer (refused, timed out, 5xx) is asked again ``retries`` times with
doubling waits (``backoff`` seconds first); then :class:`RewardServiceError` stops the run with the
server's address and the last failure. Its checkpoints are written whole or not at all, so the run
resumes from the last one once the server is back. A request the server refuses (4xx) is not
retried: its message is the error. Never a silent zero reward.
"""

from __future__ import annotations

import base64
import io
import math
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from genalign.core.experiment import RewardConfig
from genalign.rewards import register
from genalign.rewards.base import Metadata, RewardInputError, RewardModel, check_options

ENCODINGS = ("float32", "uint8", "png")


class RewardServiceError(RuntimeError):
    """The reward server could not be reached or refused a request."""


# ------------------------------------------------------------------ the wire format (both ends)


def encode_images(images: Tensor, encoding: str) -> dict[str, Any]:
    """Images (B, 3, H, W) in [0, 1] as the JSON the server reads."""
    x = images.detach().float().clamp(0, 1).cpu()
    if encoding == "float32":
        data = x.contiguous().numpy().astype("<f4").tobytes()
        return {"format": "float32", "shape": list(x.shape), "data": base64.b64encode(data).decode("ascii")}
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().numpy()  # (B, H, W, 3)
    if encoding == "uint8":
        return {"format": "uint8", "shape": list(pixels.shape), "data": base64.b64encode(pixels.tobytes()).decode("ascii")}
    if encoding == "png":
        from PIL import Image

        encoded = []
        for image in pixels:
            buffer = io.BytesIO()
            Image.fromarray(image).save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return {"format": "png", "data": encoded}
    raise ValueError(f"unknown image encoding {encoding!r}; one of {', '.join(ENCODINGS)}")


MAX_SIDE = 8192  # pixels: a larger image is refused before it is decoded


def decode_images(payload: Mapping[str, Any], max_images: int = 4096, max_bytes: int = 2**31) -> Tensor:
    """The images of a request as float (B, 3, H, W) in [0, 1]; :class:`RewardInputError` on anything
    malformed (unknown format, a shape that does not match the data, an undecodable PNG) or too
    large (a side over ``MAX_SIDE``, or more than ``max_bytes`` once decoded to float32)."""
    if not isinstance(payload, Mapping):
        raise RewardInputError("images must be an object with format and data")
    unknown = set(payload) - {"format", "shape", "data"}
    if unknown:
        raise RewardInputError(f"unknown field(s) in images: {sorted(unknown)}")
    kind = payload.get("format")
    if kind not in ENCODINGS:
        raise RewardInputError(f"images.format must be one of {', '.join(ENCODINGS)}; got {kind!r}")
    if kind == "png":
        from PIL import Image, UnidentifiedImageError

        data = payload.get("data")
        if not isinstance(data, list) or not data or len(data) > max_images:
            raise RewardInputError(f"png images: data must be a list of 1 to {max_images} base64 strings")
        arrays, decoded = [], 0
        for i, item in enumerate(data):
            try:
                with Image.open(io.BytesIO(base64.b64decode(item, validate=True))) as image:  # lazy: the header only
                    width, height = image.size
                    decoded += 12 * width * height  # float32 RGB
                    if max(width, height) > MAX_SIDE or decoded > max_bytes:
                        raise RewardInputError(f"png image {i} ({width} x {height}) makes the request larger than "
                                               f"this server decodes ({max_bytes} bytes as float32, sides <= {MAX_SIDE})")
                    arrays.append(np.asarray(image.convert("RGB")))
            except RewardInputError:
                raise
            except (ValueError, TypeError, UnidentifiedImageError, OSError, Image.DecompressionBombError) as err:
                raise RewardInputError(f"png image {i} could not be decoded: {err}") from err
        if len({a.shape for a in arrays}) > 1:
            raise RewardInputError(f"png images of different sizes in one request: {sorted({a.shape for a in arrays})}")
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    shape = payload.get("shape")
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(d, int) and d > 0 for d in shape)):
        raise RewardInputError(f"{kind} images: shape must be 4 positive integers; got {shape!r}")
    channels = shape[1] if kind == "float32" else shape[3]
    sides = shape[2:] if kind == "float32" else shape[1:3]
    if channels != 3 or shape[0] > max_images or max(sides) > MAX_SIDE:
        layout = "(B, 3, H, W)" if kind == "float32" else "(B, H, W, 3)"
        raise RewardInputError(f"{kind} images: shape must be {layout} with B <= {max_images} and sides <= {MAX_SIDE}; "
                               f"got {shape}")
    if 4 * math.prod(shape) > max_bytes:
        raise RewardInputError(f"{kind} images of shape {shape} are more than this server decodes ({max_bytes} bytes)")
    try:
        raw = base64.b64decode(payload.get("data", ""), validate=True)
    except (ValueError, TypeError) as err:
        raise RewardInputError(f"{kind} images: data is not base64: {err}") from err
    size = 4 if kind == "float32" else 1
    if len(raw) != size * math.prod(shape):
        raise RewardInputError(f"{kind} images: {len(raw)} bytes of data for shape {shape} "
                               f"({size * math.prod(shape)} expected)")
    if kind == "float32":
        images = torch.from_numpy(np.frombuffer(raw, dtype="<f4").reshape(shape).copy())
        if not torch.isfinite(images).all():
            raise RewardInputError("float32 images hold NaN or infinite values")
        return images
    return torch.from_numpy(np.frombuffer(raw, dtype=np.uint8).reshape(shape).copy()).permute(0, 3, 1, 2).float() / 255


# ------------------------------------------------------------------ the client


@register("remote")
class RemoteReward(RewardModel):
    summary = "a reward served by genalign serve-reward in another process (HTTP)"
    name = "remote"
    differentiable = False
    overlaps = True  # scored elsewhere: methods score each rollout chunk while sampling the next

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3, backoff: float = 1.0,
                 encoding: str = "float32", token: str | None = None, device: str | torch.device = "cpu"):
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ValueError(f"reward remote: options.url must be an http(s) address, got {url!r}")
        if encoding not in ENCODINGS:
            raise ValueError(f"reward remote: options.encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise ValueError("reward remote: timeout must be > 0, retries and backoff >= 0")
        super().__init__(device)
        import httpx

        self.url, self.timeout, self.retries, self.backoff, self.encoding = url.rstrip("/"), timeout, retries, backoff, encoding
        self.client = httpx.Client(timeout=timeout, headers={"Authorization": f"Bearer {token}"} if token else {})
        self.served = self._request("GET", "/health")  # reachable now, or a clear error before training starts

    @classmethod
    def from_config(cls, config: RewardConfig, device: str | torch.device = "cpu") -> RemoteReward:
        options = dict(config.options)
        check_options(config.name, options, ("url", "timeout", "retries", "backoff", "encoding", "token_env"))
        if "url" not in options:
            raise ValueError("reward remote: set options.url (genalign serve-reward prints it)")
        token_env = options.pop("token_env", "GENALIGN_REWARD_TOKEN")
        return cls(**options, token=os.environ.get(token_env) or None, device=device)

    @property
    def label(self) -> str:
        return str(self.served.get("reward", "remote"))

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                response = self.client.request(method, self.url + path, json=body)
            except httpx.HTTPError as err:  # refused, reset, timed out
                last = f"{type(err).__name__}: {err}"
                continue
            if response.status_code >= 500 or response.status_code == 429:
                last = f"HTTP {response.status_code}: {_message(response)}"
                continue
            if response.status_code >= 400:
                raise RewardServiceError(f"the reward server at {self.url} refused the request "
                                         f"(HTTP {response.status_code}): {_message(response)}")
            return response.json()
        raise RewardServiceError(f"the reward server at {self.url} did not answer after {self.retries + 1} tries "
                                 f"(last: {last}); start it (genalign serve-reward ...) and resume the run")

    def _score(self, images: Tensor, prompts: Sequence[str], metadata: Metadata) -> dict[str, Any]:
        body = {"images": encode_images(images, self.encoding), "prompts": list(prompts),
                "metadata": [dict(m) for m in metadata] if metadata is not None else None}
        answer = self._request("POST", "/score", body)
        if len(answer.get("scores", [])) != images.shape[0]:
            raise RewardServiceError(f"the reward server at {self.url} returned {len(answer.get('scores', []))} "
                                     f"scores for {images.shape[0]} images")
        return answer

    def score(self, images: Tensor, prompts: list[str], metadata: Metadata) -> Tensor:
        return torch.tensor(self._score(images, prompts, metadata)["scores"], dtype=torch.float32, device=images.device)

    def score_with_subscores(self, images: Tensor, prompts: list[str], metadata: Metadata) -> tuple[
            Tensor, dict[str, Tensor]]:
        """The server's scores and sub-scores (its own total's sub-score is the scores, under ``label``)."""
        answer = self._score(images, prompts, metadata)
        scores = torch.tensor(answer["scores"], dtype=torch.float32, device=images.device)
        subscores = {name: torch.tensor(values, dtype=torch.float32, device=images.device)
                     for name, values in answer.get("subscores", {}).items() if name != self.label}
        return scores, subscores


def _message(response: Any) -> str:
    try:
        return str(response.json().get("error", response.text))
    except ValueError:
        return response.text[:300]
