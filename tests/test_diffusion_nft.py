"""DiffusionNFT: its pure functions against values computed by hand from the paper's / official
code's equations, and the method on a tiny flow backbone."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from genalign.core.config import ConfigError
from genalign.core.experiment import BackboneConfig, SampleConfig
from genalign.finetuners.diffusion_nft import (
    DiffusionNFT,
    DiffusionNFTConfig,
    implicit_policies,
    nft_loss,
    old_decay,
    optimality,
)
from genalign.pipelines import load_backbone
from tests.loss_parts import assert_backward_loss_matches_loss


def test_optimality_by_hand():
    # r = clamp(clip(A, -5, 5) / 10 + 1/2, 0, 1)
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 10.0])
    assert optimality(a).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0]
    assert optimality(torch.tensor([1.0]), adv_clip_max=2.0).tolist() == [0.75]


def test_implicit_policies_by_hand():
    v_pos, v_neg = implicit_policies(torch.tensor([2.0]), torch.tensor([1.0]), beta=0.5)
    assert v_pos.item() == 1.5 and v_neg.item() == 0.5  # 0.5*2 + 0.5*1; 1.5*1 - 0.5*2


def test_nft_loss_by_hand_with_its_detached_weight():
    x0 = torch.zeros(1, 2)
    pos = torch.tensor([[1.0, -1.0]], requires_grad=True)  # mean sq 1, mean abs 1 -> L+ = 1
    neg = torch.tensor([[2.0, 0.0]], requires_grad=True)  # mean sq 2, mean abs 1 -> L- = 2
    loss = nft_loss(pos, neg, x0, torch.tensor([0.75]), beta=0.5)
    assert loss.item() == pytest.approx((0.75 * 1 + 0.25 * 2) / 0.5)
    loss.sum().backward()
    # d/d pos of r/beta * mean(e^2)/sg(mean|e|) = r/beta * 2 e / (D * 1) = 1.5 * [1, -1]
    torch.testing.assert_close(pos.grad, torch.tensor([[1.5, -1.5]]))
    torch.testing.assert_close(neg.grad, torch.tensor([[0.5 * 2 * 2 / 2, 0.0]]))  # 0.25/0.5 * 2e/(2 * 1)


def test_old_decay_schedules():
    assert [old_decay(s) for s in (0, 1, 300, 600, 5000)] == [0.0, 0.001, 0.3, 0.5, 0.5]
    assert old_decay(10, flat=75, uprate=0.0075, uphold=0.999) == 0.0
    assert old_decay(100, flat=75, uprate=0.0075, uphold=0.999) == pytest.approx(0.1875)


class _Brightness:
    differentiable = False

    def __call__(self, images, prompts, metadata=None):
        scores = images.detach().float().flatten(1).mean(1).cpu()
        return scores, {"brightness": scores}


class _Constant(_Brightness):
    def __call__(self, images, prompts, metadata=None):
        return torch.ones(images.shape[0]), {}


def _nft(tiny_models, reward, family=("sd3", "flow"), **options):
    torch.manual_seed(0)
    backbone = load_backbone(BackboneConfig(family=family[0], path=tiny_models(*family), finetune="lora",
                                            lora_rank=4), "cpu")
    config = DiffusionNFTConfig(samples_per_prompt=3, timesteps_per_sample=3, **options)
    experiment = SimpleNamespace(method=config, sample=SampleConfig(num_steps=4, guidance_scale=1.0))
    return DiffusionNFT.build(experiment, backbone, reward)


def _grad_norm(method, batch):
    params = list(method.named_trainable_parameters().values())
    for p in params:
        p.grad = None
    method.loss(batch)[0].backward()
    return float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params if p.grad is not None)))


def test_collect_and_loss_on_a_flow_backbone(tiny_models):
    """The batch: timesteps of the sampling grid, r in [0, 1] with each group's mean 1/2 (unclipped
    advantages sum to 0 in a group); the loss in parts equals the whole loss; with equal rewards
    (r = 1/2) and the policy equal to the old one the gradient vanishes (L+ and L- pull opposite
    ways by the same amount), with brightness it does not."""
    nft = _nft(tiny_models, _Brightness(), kl_weight=0.0)
    batch = nft.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    grid = nft.backbone.schedule.timesteps(4)
    assert batch.timesteps.shape == (3, 6) and all(t in grid for t in batch.timesteps.flatten().tolist())
    assert all(len(set(batch.timesteps[:, i].tolist())) == 3 for i in range(6))  # distinct timesteps a sample
    assert batch.noise.shape == (3, *batch.x0.shape) and batch.v_old.shape == batch.noise.shape
    assert ((batch.r >= 0) & (batch.r <= 1)).all()
    torch.testing.assert_close(batch.r.view(2, 3).mean(dim=1), torch.full((2,), 0.5))
    assert_backward_loss_matches_loss(nft, batch, expected_parts=3)
    moving = _grad_norm(nft, batch)
    flat = _nft(tiny_models, _Constant(), kl_weight=0.0)
    equal = flat.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    assert equal.r.eq(0.5).all() and float(equal.metrics["zero_spread_groups"]) == 1.0
    assert _grad_norm(flat, equal) < 1e-4 * moving


def test_updates_raise_the_positive_samples_likelihood_and_the_old_policy_follows(tiny_models):
    """A few updates on one batch lower its loss; the old policy moves toward the policy by
    1 - d after each optimizer step, and is saved with the method's state."""
    nft = _nft(tiny_models, _Brightness())
    batch = nft.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(1))
    before = nft.loss(batch)[0].item()
    params = list(nft.named_trainable_parameters().values())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        nft.loss(batch)[0].backward()
        optimizer.step()
    assert nft.loss(batch)[0].item() < before
    name = next(n for n, p in nft.named_trainable_parameters().items() if p.abs().sum() > 0)
    old_before = nft.old.shadow[name].clone()
    nft.after_optimizer_step()  # step 1: d = 0.001
    expected = 0.001 * old_before + 0.999 * nft.params[name].detach().float()
    torch.testing.assert_close(nft.old.shadow[name], expected)
    state = nft.state_dict()
    assert state["optimizer_steps"] == 1 and torch.equal(state["old"][name], nft.old.shadow[name])


@pytest.mark.parametrize("family", [("flux", "flow"), ("qwenimage", "flow"), ("zimage", "flow"), ("flux2-klein", "flow"), ("wan", "flow"), ("sd", "epsilon"),
                                    ("sd", "v_prediction")])
def test_other_backbones_train_through_their_clean_estimate(tiny_models, family):
    """FLUX (flow), and SD's epsilon and v parameterisations (their clean estimate and noise give the
    velocity the loss works on): the batch's r keeps each group's mean 1/2 and updates on one batch
    lower its loss."""
    nft = _nft(tiny_models, _Brightness(), family)
    batch = nft.collect(["a red circle", "a blue square"], torch.Generator().manual_seed(0))
    torch.testing.assert_close(batch.r.view(2, 3).mean(dim=1), torch.full((2,), 0.5))
    before = nft.loss(batch)[0].item()
    optimizer = torch.optim.Adam(list(nft.named_trainable_parameters().values()), lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        nft.loss(batch)[0].backward()
        optimizer.step()
    assert math.isfinite(before) and nft.loss(batch)[0].item() < before


def test_configuration_errors_are_clear(tiny_models):
    with pytest.raises(ConfigError, match="samples_per_prompt must be >= 2"):
        DiffusionNFTConfig(samples_per_prompt=1)
    with pytest.raises(ConfigError, match="needs a reward"):
        _nft(tiny_models, None)
