"""The reward service under load, and what asynchronous scoring saves.

1. Load: ``genalign serve-reward shapes_gold`` in its own process; clients send requests of 1 and
   16 shapes-world images (float32 encoding), from one client and from 4 at once: requests and
   images per second, median and 95th-percentile latency, against scoring the same batch locally.
2. Overlap: a Flow-GRPO-style rollout of 16 images in 4 chunks on the shapes SD3 model scored by a
   served reward that takes ``--delay`` seconds an image (a reward model on another GPU): scoring
   after the rollout against scoring each chunk while the next samples (OverlappedScores).

    .venv/bin/python bench/reward_service.py              # ~1 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shapes_batch(n: int) -> tuple[torch.Tensor, list[str]]:
    from genalign.shapes.world import all_prompts, sample_example

    metas = [all_prompts()[(7 * i) % len(all_prompts())] for i in range(n)]
    images = torch.stack([torch.from_numpy(sample_example(m, seed=i)[0]).permute(2, 0, 1).float() for i, m in enumerate(metas)])
    return images, [m["prompt"] for m in metas]


def load_test(url: str, batch: int, clients: int, requests: int) -> dict[str, float]:
    from genalign.rewards.remote import RemoteReward

    images, prompts = shapes_batch(batch)
    latencies: list[float] = []

    def client() -> None:
        reward = RemoteReward(url, retries=0)
        for _ in range(requests):
            start = time.perf_counter()
            reward(images, prompts)
            latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    latencies.sort()
    return {"batch": batch, "clients": clients, "requests_per_s": clients * requests / seconds,
            "images_per_s": clients * requests * batch / seconds, "latency_p50_ms": 1000 * statistics.median(latencies),
            "latency_p95_ms": 1000 * latencies[int(0.95 * (len(latencies) - 1))]}


def local_ms(batch: int, repeats: int = 20) -> float:
    from genalign.core.experiment import RewardConfig
    from genalign.rewards import load_reward

    reward = load_reward(RewardConfig(name="shapes_gold"))
    images, prompts = shapes_batch(batch)
    reward(images, prompts)
    start = time.perf_counter()
    for _ in range(repeats):
        reward(images, prompts)
    return 1000 * (time.perf_counter() - start) / repeats


class Slow:
    """The exact evaluator taking ``delay`` seconds an image (a reward model elsewhere)."""

    def __init__(self, reward, delay: float):
        self.reward, self.delay, self.label = reward, delay, reward.label

    def __call__(self, images, prompts, metadata=None):
        time.sleep(self.delay * len(images))
        return self.reward(images, prompts, metadata)


def overlap(delay: float, repeats: int) -> dict[str, float]:
    from genalign.core.experiment import BackboneConfig, RewardConfig
    from genalign.core.rollout import rollout
    from genalign.finetuners.common import OverlappedScores
    from genalign.pipelines import load_backbone
    from genalign.rewards import load_reward
    from genalign.rewards.remote import RemoteReward
    from genalign.rewards.service import BackgroundServer

    backbone = load_backbone(BackboneConfig(family="sd3", path=str(ROOT / "models/shapes/sd3"), finetune="none"), "cpu")
    prompts = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle", "a photo of a green square"]
    repeated = [p for p in prompts for _ in range(4)]
    times = {"after": [], "overlapped": []}
    with BackgroundServer(Slow(load_reward(RewardConfig(name="shapes_gold")), delay)) as url:
        reward = RemoteReward(url, retries=0)
        for i in range(repeats):
            for mode in ("after", "overlapped") if i % 2 == 0 else ("overlapped", "after"):
                start = time.perf_counter()
                scorer = OverlappedScores(reward, repeated) if mode == "overlapped" else None
                r = rollout(backbone, prompts, 10, 2.0, 0.7, samples_per_prompt=4, generator=torch.Generator().manual_seed(i),
                            chunk_size=4, on_chunk=scorer)
                scores = scorer.result() if scorer else reward(r.images, repeated)[0]
                times[mode].append(time.perf_counter() - start)
                assert len(scores) == 16
    after, overlapped = statistics.median(times["after"]), statistics.median(times["overlapped"])
    return {"delay_s_per_image": delay, "rollout_then_score_s": after, "overlapped_s": overlapped,
            "overlapped_over_after": overlapped / after}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=40, help="requests a client")
    p.add_argument("--delay", type=float, default=0.02, help="the overlap test's reward: seconds an image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward_service.json"))
    args = p.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("GENALIGN_REWARD_TOKEN", None)
    server = subprocess.Popen([sys.executable, "-m", "genalign", "serve-reward", "shapes_gold", "--port", str(port),
                               "--device", "cpu"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import httpx

        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/health", timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the reward server did not start") from None
                time.sleep(0.2)
        rows = []
        for batch in (1, 16):
            for clients in (1, 4):
                row = load_test(url, batch, clients, args.requests)
                row["local_ms"] = local_ms(batch)
                rows.append(row)
                print(f"batch {batch:2d}, {clients} client(s): {row['requests_per_s']:6.1f} requests/s, "
                      f"{row['images_per_s']:6.1f} images/s, latency p50 {row['latency_p50_ms']:.1f} ms, "
                      f"p95 {row['latency_p95_ms']:.1f} ms (local scoring {row['local_ms']:.1f} ms)", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = overlap(args.delay, args.repeats)
    print(f"rollout of 16 images in 4 chunks, served reward at {args.delay * 1000:.0f} ms an image: scored after the "
          f"rollout {result['rollout_then_score_s']:.2f} s, overlapped {result['overlapped_s']:.2f} s "
          f"(ratio {result['overlapped_over_after']:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"load": rows, "overlap": result, "torch_threads": torch.get_num_threads()},
                                         indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
