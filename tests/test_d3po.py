"""D3PO: the per-step objective against hand-computed values, preferences (scores, Pareto, labels),
training steps on a diffusion and a flow backbone, and the labelling loop through the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from genalign.cli import main
from genalign.core.config import ConfigError
from genalign.core.experiment import BackboneConfig, SampleConfig
from genalign.finetuners.d3po import D3PO, D3POConfig, all_pairs, d3po_loss, preferences_from_scores, read_labels
from genalign.pipelines import load_backbone
from tests.loss_parts import assert_backward_loss_matches_loss

T = torch.tensor


def test_d3po_loss_by_hand():
    """logp_0 - ref_0 = log 1.05 (inside [0.9, 1.1]), logp_1 - ref_1 = log 0.8 (clamped to 0.9);
    sample 0 preferred, beta 0.1: inside = 0.1 * log 1.05 - 0.1 * log 0.9 = 0.0154151,
    loss = log(1 + e^-0.0154151) = 0.6854693; the other preference: log(1 + e^0.0154151) = 0.7008844."""
    loss = d3po_loss(T([math.log(1.05)]), T([0.0]), T([math.log(0.8)]), T([0.0]), T([1.0]), beta=0.1, clip_range=0.1)
    assert loss.item() == pytest.approx(0.6854693, abs=1e-6)
    flipped = d3po_loss(T([math.log(1.05)]), T([0.0]), T([math.log(0.8)]), T([0.0]), T([-1.0]), 0.1, 0.1)
    assert flipped.item() == pytest.approx(0.7008844, abs=1e-6)


def test_d3po_limits_ties_and_the_clamp():
    logp = torch.randn(5)
    assert d3po_loss(logp, logp, logp, logp, T([1.0, -1.0, 0.0, 1.0, 1.0])).item() == pytest.approx(math.log(2))
    logp_0, logp_1 = T([0.02, math.log(1.2), 0.0], requires_grad=True), T([0.0, 0.0, 0.03], requires_grad=True)
    d3po_loss(logp_0, torch.zeros(3), logp_1, torch.zeros(3), T([1.0, 1.0, 0.0])).backward()
    assert logp_0.grad[0] < 0  # descent raises the preferred sample's log-prob
    assert logp_0.grad[1] == 0  # ratio 1.2 is clamped to 1.1: no gradient
    assert logp_0.grad[2] == 0 and logp_1.grad[2] == 0  # a tie: no gradient
    assert logp_1.grad[0] > 0  # and lowers the other's


def test_preferences_from_scores_and_pareto():
    assert preferences_from_scores(T([1.0, 2.0, 3.0]), T([2.0, 2.0, 1.0])).tolist() == [-1.0, 0.0, 1.0]
    assert preferences_from_scores(T([1.0, 2.05]), T([1.08, 2.0]), tie_margin=0.1).tolist() == [0.0, 0.0]
    vectors_0 = T([[1.0, 2.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    vectors_1 = T([[0.0, 2.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    assert preferences_from_scores(vectors_0, vectors_1).tolist() == [1.0, 0.0, -1.0, 0.0]


def test_all_pairs_within_each_prompt():
    a, b = all_pairs(2, 3)
    assert list(zip(a.tolist(), b.tolist())) == [(0, 1), (0, 2), (1, 2), (3, 4), (3, 5), (4, 5)]


def test_labels_files(tmp_path):
    (tmp_path / "l.json").write_text(json.dumps({"000000": 0, "000001": 1, "000002": "tie"}))
    assert read_labels(tmp_path / "l.json") == {"000000": 1.0, "000001": -1.0, "000002": 0.0}
    (tmp_path / "l.jsonl").write_text('{"id": "7", "preferred": 1}\n')
    assert read_labels(tmp_path / "l.jsonl") == {"7": -1.0}
    # relabelled: the latest line wins; a last line torn by a crash is ignored, a torn middle one is not
    (tmp_path / "l.jsonl").write_text('{"id": "7", "preferred": 1}\n{"id": "7", "preferred": 0}\n{"id": "8", "pre')
    assert read_labels(tmp_path / "l.jsonl") == {"7": 1.0}
    (tmp_path / "l.jsonl").write_text('{"id": "7", "pre\n{"id": "8", "preferred": 0}\n')
    with pytest.raises(ConfigError, match="lines with id and preferred"):
        read_labels(tmp_path / "l.jsonl")
    (tmp_path / "bad.json").write_text(json.dumps({"1": "left"}))
    with pytest.raises(ConfigError, match="0, 1 or 'tie'"):
        read_labels(tmp_path / "bad.json")


class _BrightnessReward:
    differentiable = False

    def __call__(self, images, prompts, metadata=None):
        scores = images.float().flatten(1).mean(1)
        return scores, {"brightness": scores}


def _d3po(tiny_models, family, prediction, eta, **config):
    path = tiny_models(family, prediction)
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family=family, path=path, finetune="lora", lora_rank=4), "cpu")
    experiment = SimpleNamespace(method=D3POConfig(**config), method_name="d3po",
                                 sample=SampleConfig(num_steps=4, guidance_scale=2.0, eta=eta))
    return D3PO.build(experiment, backbone, _BrightnessReward())


@pytest.mark.parametrize("family,prediction,eta,lr", [("sd", "epsilon", 1.0, 1e-3), ("sd3", "flow", 0.7, 3e-3), ("wan", "flow", 0.7, 3e-3)])
def test_training_moves_the_preferred_samples_log_prob_up(tiny_models, family, prediction, eta, lr):
    """A few small optimizer steps on one batch of rollouts: the policy's log-ratio to the reference
    rises on the preferred samples' transitions and falls on the others (SDE rollouts on flow).
    (Large steps lower both: any move away from the sampler lowers its samples' likelihood.)"""
    d3po = _d3po(tiny_models, family, prediction, eta, beta=1.0, clip_range=0.5)
    with torch.no_grad():
        batch = d3po.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert batch.a.numel() == 2 and set(batch.preference.abs().tolist()) == {1.0}
    loss, metrics = d3po.loss(batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)
    optimizer = torch.optim.Adam(list(d3po.named_trainable_parameters().values()), lr=lr)
    for _ in range(6):
        loss, metrics = d3po.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss, metrics = d3po.loss(batch)
    assert metrics["log_ratio_preferred"] > 0 > metrics["log_ratio_other"]
    assert d3po.loss(batch)[0].item() < math.log(2)


def test_deterministic_rollouts_are_refused(tiny_models):
    with pytest.raises(ConfigError, match="sample.eta > 0"):
        _d3po(tiny_models, "sd", "epsilon", 0.0)


def test_timestep_fraction_trains_a_subset_of_steps(tiny_models):
    d3po = _d3po(tiny_models, "sd", "epsilon", 1.0, timestep_fraction=0.5, samples_per_prompt=3)
    with torch.no_grad():
        batch = d3po.collect(["a red circle"], torch.Generator().manual_seed(0))
    assert len(batch.steps) == 2
    assert batch.a.numel() <= 3  # three pairs among three samples, ties dropped


def test_labelling_loop_through_the_cli(tiny_models, tmp_path):
    """`genalign d3po sample` writes pairs; labels in a JSON file; training reads both."""
    path = tiny_models("sd")
    config = tmp_path / "d3po.yaml"
    config.write_text(json.dumps({
        "backbone": {"family": "sd", "path": path},
        "method": {"name": "d3po"},
        "sample": {"num_steps": 3, "guidance_scale": 2.0, "eta": 1.0},
        "run": {"prompts": ["a red circle", "a blue square"], "steps": 2, "batch_size": 2, "tracker": "none",
                "output_dir": str(tmp_path / "run"), "lr": 1e-3},
    }))
    pairs = tmp_path / "pairs"
    assert main(["d3po", "sample", str(config), "--out", str(pairs), "--num-pairs", "3", "--device", "cpu"]) == 0
    rows = [json.loads(line) for line in (pairs / "pairs.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["000000", "000001", "000002"]
    assert all((pairs / f).is_file() for r in rows for f in r["images"])
    (tmp_path / "labels.json").write_text(json.dumps({"000000": 1, "000001": 0, "000002": "tie"}))
    overrides = ["method.preferences=labels", f"method.pairs_dir={pairs}", f"method.labels={tmp_path / 'labels.json'}"]
    assert main(["train", str(config), *overrides]) == 0
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(row["pairs"] == 2.0 for row in log)  # the tie is not trained on
    # the trainer drew pair ids; the sample grid shows their prompts
    grid_prompts = (tmp_path / "run" / "samples" / "final.txt").read_text().splitlines()
    assert sorted(grid_prompts) == sorted(r["prompt"] for r in rows[:2])


def test_backward_loss_gives_the_loss_and_gradient_of_the_whole_loss(tiny_models):
    """The trainer's path, one backward per trained step, equals loss().backward() of the sum."""
    d3po = _d3po(tiny_models, "sd", "epsilon", 1.0, beta=1.0, clip_range=0.5)
    with torch.no_grad():
        batch = d3po.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
        for p in d3po.named_trainable_parameters().values():  # away from the reference: a non-trivial loss
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    metrics = assert_backward_loss_matches_loss(d3po, batch, expected_parts=len(batch.steps))
    assert float(metrics["log_ratio_preferred"]) != 0.0
