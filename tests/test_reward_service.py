"""The reward service (genalign serve-reward, reward: {name: remote}) on the loopback interface:
the same scores and trained weights as the local reward, dynamic batching across clients, bad
requests answered without stopping the server, the token, the size bound, and a server that dies
mid-run (retries, then a clear error with the checkpoints intact, and an exact resume)."""

from __future__ import annotations

import base64
import json
import threading

import httpx
import pytest
import torch

from genalign.core.experiment import RewardConfig
from genalign.finetuners.common import OverlappedScores
from genalign.rewards import load_reward
from genalign.rewards.remote import RemoteReward, RewardServiceError, decode_images, encode_images
from genalign.rewards.service import BackgroundServer
from genalign.shapes.world import all_prompts, sample_example


def _shapes_batch(n: int, seed: int = 0):
    """Rendered shapes-world images of n prompts across the tasks (the exact evaluator passes them),
    every third one blank (it fails), with a little noise."""
    metas = all_prompts()[::7][:n]
    images = []
    g = torch.Generator().manual_seed(seed)
    for i, meta in enumerate(metas):
        image = torch.from_numpy(sample_example(meta, seed=i)[0]).permute(2, 0, 1).float()
        if i % 3 == 2:
            image = image * 0  # nothing drawn: fails
        images.append((image + 0.01 * torch.rand(image.shape, generator=g)).clamp(0, 1))
    return torch.stack(images), [m["prompt"] for m in metas]


@pytest.fixture(scope="module")
def gold():
    return load_reward(RewardConfig(name="shapes_gold"))


def test_encodings_round_trip():
    images = torch.rand(3, 3, 8, 6)
    assert torch.equal(decode_images(encode_images(images, "float32")), images)  # exact
    eight_bit = (images * 255).round() / 255
    for encoding in ("uint8", "png"):
        torch.testing.assert_close(decode_images(encode_images(images, encoding)), eight_bit, rtol=0, atol=1e-6)


def test_served_scores_equal_local_ones_and_requests_are_batched(gold):
    images, prompts = _shapes_batch(12)
    local, local_sub = gold(images, prompts)
    assert 0 < float(local.mean()) < 1  # the batch has passes and failures
    with BackgroundServer(gold, max_batch=32, max_wait=0.3) as url:
        remote = RemoteReward(url, retries=0)
        scores, sub = remote(images, prompts)
        assert torch.equal(scores, local) and torch.equal(sub["shapes_strict"], local_sub["shapes_strict"])
        assert remote.label == "shapes_gold" and not remote.differentiable
        # four clients at once: each gets its own scores, and the server scored them together
        results: dict[int, torch.Tensor] = {}

        def client(k: int) -> None:
            results[k] = RemoteReward(url, retries=0)(images[3 * k : 3 * k + 3], prompts[3 * k : 3 * k + 3])[0]

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert torch.equal(torch.cat([results[k] for k in range(4)]), local)
        health = httpx.get(url + "/health").json()
        assert health["requests"] == 5 and health["images"] == 24 and health["largest_batch"] > 3
    with BackgroundServer(gold, max_batch=5, max_wait=0.3) as url:  # the reward never sees more than 5
        scores, _ = RemoteReward(url, retries=0)(images, prompts)
        assert torch.equal(scores, local)
        health = httpx.get(url + "/health").json()
        assert health["largest_batch"] == 5 and health["batches"] == 3  # 12 images: 5 + 5 + 2


def test_bad_requests_are_answered_and_the_server_stays_up(gold):
    images, prompts = _shapes_batch(2)
    good = {"images": encode_images(images, "uint8"), "prompts": prompts, "metadata": None}
    raw = {"format": "uint8", "shape": [2, 32, 32, 3], "data": base64.b64encode(b"\0" * 10).decode()}
    with BackgroundServer(gold, max_request_bytes=200_000) as url:
        cases = {
            "not json": (b"{", "not JSON"),
            "unknown field": (json.dumps({**good, "extra": 1}).encode(), "unknown field"),
            "wrong shape": (json.dumps({**good, "images": {**good["images"], "shape": [2, 3, 32, 32]}}).encode(), "shape"),
            "short data": (json.dumps({**good, "images": raw}).encode(), "bytes of data"),
            "bad png": (json.dumps({**good, "images": {"format": "png", "data": ["aGVsbG8=", "aGVsbG8="]}}).encode(),
                        "could not be decoded"),
            "one prompt for two": (json.dumps({**good, "prompts": prompts[:1]}).encode(), "2 images but 1 prompts"),
            "unknown prompt": (json.dumps({**good, "prompts": ["a photo of a dragon", prompts[1]]}).encode(), "dragon"),
        }
        for name, (body, message) in cases.items():
            answer = httpx.post(url + "/score", content=body, headers={"content-type": "application/json"})
            assert answer.status_code == 400 and message in answer.json()["error"], name
        big = httpx.post(url + "/score", content=b"x" * 300_000)
        assert big.status_code == 413
        huge = {"format": "uint8", "shape": [1, 2**32, 2**32, 3], "data": ""}  # its size overflows int64
        answer = httpx.post(url + "/score", json={**good, "prompts": prompts[:1], "images": huge})
        assert answer.status_code == 400 and "sides <=" in answer.json()["error"]
        from PIL import Image

        buffer = __import__("io").BytesIO()
        Image.new("RGB", (9000, 10)).save(buffer, format="PNG")  # a few hundred bytes, a side over 8192
        bomb = {"format": "png", "data": [base64.b64encode(buffer.getvalue()).decode()]}
        answer = httpx.post(url + "/score", json={**good, "prompts": prompts[:1], "images": bomb})
        assert answer.status_code == 400 and "larger than this server decodes" in answer.json()["error"]
        answer = httpx.post(url + "/score", json=good)  # still serving
        assert answer.status_code == 200 and len(answer.json()["scores"]) == 2
        with pytest.raises(RewardServiceError, match="refused the request .*dragon"):
            RemoteReward(url, retries=2)(images, ["a photo of a dragon", prompts[1]])


def test_token(gold, monkeypatch):
    images, prompts = _shapes_batch(2)
    with BackgroundServer(gold, token="s3cret") as url:
        assert httpx.get(url + "/health").status_code == 401
        with pytest.raises(RewardServiceError, match="401"):
            RemoteReward(url, retries=0)
        monkeypatch.setenv("GENALIGN_REWARD_TOKEN", "s3cret")
        remote = load_reward(RewardConfig(name="remote", options={"url": url}))
        assert torch.equal(remote(images, prompts)[0], gold(images, prompts)[0])


def test_a_dead_server_is_retried_then_a_clear_error():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RewardServiceError, match=r"did not answer after 3 tries .*ConnectError"):
        RemoteReward(f"http://127.0.0.1:{port}", retries=2, backoff=0.01)


def _train(tmp_path, name, reward, steps, resume=None, **run):
    import yaml

    from genalign.core.experiment import load_experiment
    from genalign.finetuners import config_classes
    from genalign.launch import run_experiment

    config = yaml.safe_load(open("configs/shapes/flow_grpo_fast.yaml"))
    config["reward"] = reward
    # a rollout of 4 images every step, in 2 chunks (a served reward scores the first while the second samples)
    config["method"].update(minibatches=1, samples_per_prompt=2, sample_batch_size=2)
    config["run"].update(steps=steps, batch_size=2, output_dir=str(tmp_path / name), checkpoint_every=1, **run)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    run_experiment(load_experiment(path, config_classes()), resume)
    from safetensors.torch import load_file

    return load_file(str(tmp_path / name / "final" / "pytorch_lora_weights.safetensors"))


class _DiesAfter:
    """The exact evaluator that takes the server down on its n+1-th call (a crash mid-run)."""

    def __init__(self, reward, n):
        self.reward, self.n, self.calls, self.server = reward, n, 0, None
        self.label = reward.label

    def __call__(self, *args):
        self.calls += 1
        if self.calls > self.n:
            self.server.server.should_exit = True
            raise RuntimeError("the reward process died")
        return self.reward(*args)


def test_training_on_the_served_reward_equals_local_and_survives_a_dead_server(gold, tmp_path, monkeypatch):
    """Flow-GRPO with an SDE window on the shapes model, 2 steps of a rollout each: trained on the
    served exact evaluator it gives the local run's LoRA bit for bit; a server that dies at the
    second rollout stops the run with RewardServiceError after its retries, the checkpoint of step
    1 intact, and resuming against a new server on the same address gives the same LoRA again."""
    monkeypatch.chdir(_root())
    local = _train(tmp_path, "local", {"name": "shapes_gold"}, 2)
    with BackgroundServer(gold) as url:
        remote = {"name": "remote", "options": {"url": url, "retries": 1, "backoff": 0.05}}
        served = _train(tmp_path, "served", remote, 2)
    assert any(v.abs().sum() > 0 for k, v in local.items() if "lora_B" in k)  # it trained (B starts at 0)
    assert local.keys() == served.keys() and all(torch.equal(local[k], served[k]) for k in local)
    dying = _DiesAfter(gold, 2)  # two chunks a rollout: dies at the second rollout
    dying.server = BackgroundServer(dying)
    url = dying.server.start()
    port = int(url.rsplit(":", 1)[1])
    remote = {"name": "remote", "options": {"url": url, "retries": 2, "backoff": 0.05}}
    with pytest.raises(RewardServiceError, match="did not answer after 3 tries"):
        _train(tmp_path, "crash", remote, 2)
    dying.server.thread.join(timeout=30)
    checkpoints = sorted(p.name for p in (tmp_path / "crash" / "checkpoints").iterdir())
    assert checkpoints == ["step-000001"] and (tmp_path / "crash" / "checkpoints" / "step-000001" / "COMPLETE").is_file()
    with BackgroundServer(gold, port=port):
        resumed = _train(tmp_path, "crash", remote, 2, resume="latest")
    assert all(torch.equal(local[k], resumed[k]) for k in local)


def _root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_overlapped_scores_score_each_chunk_while_the_next_samples(tiny_models):
    """OverlappedScores as rollout's on_chunk: chunk 0 is being scored, on another thread, before
    the rollout hands over chunk 1 (the rollout waits for that to happen, up to 10 s: a scorer that
    only ran after the rollout would never let it through); the scores equal one call on all images."""
    from genalign.core.experiment import BackboneConfig
    from genalign.core.rollout import rollout
    from genalign.finetuners.common import OverlappedScores
    from genalign.pipelines import load_backbone

    started = threading.Event()
    threads = []

    class Brightness:
        overlaps = True

        def __call__(self, images, prompts, metadata=None):
            threads.append(threading.current_thread().name)
            started.set()
            return images.mean(dim=(1, 2, 3)), {}

    backbone = load_backbone(BackboneConfig(family="sd3", path=tiny_models("sd3", "flow"), finetune="none"), "cpu")
    prompts = ["a red circle", "a blue square", "a green triangle"]
    scorer = OverlappedScores(Brightness(), [p for p in prompts for _ in range(2)])
    handed = []

    def on_chunk(start, images):
        if start > 0:
            assert started.wait(10), "chunk 0 was not being scored while the rollout went on"
        handed.append(start)
        scorer(start, images)

    r = rollout(backbone, prompts, 3, 1.0, 0.7, samples_per_prompt=2, generator=torch.Generator().manual_seed(0),
                chunk_size=2, on_chunk=on_chunk)
    scores = scorer.result()
    assert handed == [0, 2, 4] and all(name.startswith("scoring") for name in threads) and len(threads) == 3
    torch.testing.assert_close(scores, r.images.mean(dim=(1, 2, 3)))
    assert not scorer.thread.is_alive()


class _Brightness:
    """A reward whose score is the mean pixel (with the sub-score a weighted sum would give)."""

    overlaps = False

    def __call__(self, images, prompts, metadata=None):
        scores = images.mean(dim=(1, 2, 3))
        return scores, {"brightness": scores}


class _ServedBrightness(_Brightness):
    overlaps = True  # scored chunk by chunk on the scoring thread, as a served reward is


def test_d3po_and_online_dpo_pairs_are_the_same_when_scored_while_sampling(tiny_models):
    from types import SimpleNamespace

    from genalign.core.experiment import BackboneConfig, SampleConfig
    from genalign.finetuners.d3po import D3PO, D3POConfig
    from genalign.finetuners.preference_data import online_pairs
    from genalign.pipelines import load_backbone

    backbone = load_backbone(BackboneConfig(family="sd", path=tiny_models("sd"), finetune="lora", lora_rank=4), "cpu")
    prompts = ["a red circle", "a blue square", "a green triangle"]
    batches = []
    for reward in (_Brightness(), _ServedBrightness()):
        experiment = SimpleNamespace(method=D3POConfig(samples_per_prompt=2, sample_batch_size=2),
                                     sample=SampleConfig(num_steps=3, guidance_scale=2.0, eta=1.0))
        d3po = D3PO.build(experiment, backbone, reward)
        batches.append(d3po.collect(prompts, torch.Generator().manual_seed(0)))
    assert torch.equal(batches[0].preference, batches[1].preference)
    assert torch.equal(batches[0].metrics["reward_mean"], batches[1].metrics["reward_mean"])
    pairs = [online_pairs(backbone, reward, prompts, torch.Generator().manual_seed(0), 2, 3, 2.0, 1.0, chunk_size=2)
             for reward in (_Brightness(), _ServedBrightness())]
    assert torch.equal(pairs[0].x0_w, pairs[1].x0_w) and torch.equal(pairs[0].x0_l, pairs[1].x0_l)
    assert torch.equal(pairs[0].metrics["reward_w"], pairs[1].metrics["reward_w"])


def test_serve_reward_reads_a_name_or_a_config_file(tmp_path):
    """genalign serve-reward's target: a reward name with --path / --option, or a YAML file whose
    reward section (a mapping or a weighted-sum list) is served; a file without one is an error."""
    import argparse

    from genalign.cli.serve import reward_configs
    from genalign.core.config import ConfigError

    named = reward_configs(argparse.Namespace(target="shapes_gold", path=None, option=["score=strict"]))
    assert [(c.name, c.options) for c in named] == [("shapes_gold", {"score": "strict"})]
    config = tmp_path / "train.yaml"
    config.write_text("reward:\n  - {name: clip, path: models/shapes/clip, weight: 2.0}\n  - {name: shapes_gold}\n"
                      "method: {name: flow_grpo}\n")
    listed = reward_configs(argparse.Namespace(target=str(config), path=None, option=[]))
    assert [(c.name, c.weight, c.path) for c in listed] == [("clip", 2.0, "models/shapes/clip"), ("shapes_gold", 1.0, None)]
    (tmp_path / "empty.yaml").write_text("method: {name: ddpo}\n")
    with pytest.raises(ConfigError, match="no reward section"):
        reward_configs(argparse.Namespace(target=str(tmp_path / "empty.yaml"), path=None, option=[]))


def test_a_failed_chunk_stops_the_rollout_and_its_error_is_raised():
    """The scoring of chunk 0 fails: handing over the next chunk raises that error (the sampler
    stops there), and so does results()."""
    class Fails:
        overlaps = True

        def __call__(self, images, prompts, metadata=None):
            raise RewardServiceError("the server is gone")

    scorer = OverlappedScores.for_reward(Fails(), ["a", "b", "c", "d"])
    scorer(0, torch.rand(2, 3, 4, 4))
    scorer.thread.join(timeout=0.5)  # the worker has taken chunk 0 and failed (it waits for more)
    with pytest.raises(RewardServiceError, match="gone"):
        scorer(2, torch.rand(2, 3, 4, 4))
    with pytest.raises(RewardServiceError, match="gone"):
        scorer.results()
    assert OverlappedScores.for_reward(_Brightness(), ["a"]) is None  # a local reward is scored in place
