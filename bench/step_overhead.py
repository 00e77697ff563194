"""Each method's training step over its compute floor, measured side by side in one run.

Step: what the trainer does with a collected micro-batch (``backward_loss`` where the method has it,
else ``loss`` + ``backward``). Floor, on the same batch: the backbone passes no implementation of
the step can avoid, with a plain squared-output loss in place of the objective:
- diffusion_dpo: a reference forward and a policy forward + backward on the 2N noisy latents of the
  N pairs (winners and losers);
- d3po: per trained denoising step, a reference forward and a policy forward + backward of the
  backbone (guided, as sampled) on the states of the samples in a non-tie pair;
- ddpo, flow_grpo: per trained step, a policy forward + backward on the minibatch's states (and a
  reference forward when beta > 0, for the KL term);
- inversion_dpo: the policy forward on the winners' and losers' inversion states at the trained
  steps, and one backward (the reference's predictions come from the inversion, in collection);
- adjoint_matching: per trained step, the policy's forward + backward on the stored SDE states;
- vard: per trained step, a reference forward and a policy forward + backward on the trajectory's
  states, with the value model's forward and backward (its frozen clean-estimate encoder: a
  reference pass, the VAE decode and CLIP) on the policy's output, which the policy's gradient
  passes through (dense supervision);
- ac_flow: the policy forward + backward on the collected noisy states (the critic and the reference
  run in collection).
Collection (sampling, rewards) is excluded from both. Timings alternate, medians; compare the
ratios only (this machine is noisy). Target (issue #14): <= 1.10.

    .venv/bin/python bench/step_overhead.py                       # every method on the shapes models
    .venv/bin/python bench/step_overhead.py --methods d3po ddpo --repeats 9
    .venv/bin/python bench/step_overhead.py --device cuda --sd stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --sd3 stabilityai/stable-diffusion-3.5-medium --reward-path openai/clip-vit-large-patch14
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from genalign.core.experiment import BackboneConfig, RewardConfig, SampleConfig
from genalign.core.trainer import loss_and_backward
from genalign.pipelines import load_backbone
from genalign.rewards import load_reward

PROMPTS = [f"{n} {c} {s}" for n in ("a", "two") for c in ("red", "blue", "green", "yellow")
           for s in ("circle", "square", "triangle")]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], None], params: list[torch.nn.Parameter], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    elapsed = time.perf_counter() - start
    for p in params:
        p.grad = None
    return elapsed


def _passes(backbone: Any, x: torch.Tensor, t: torch.Tensor, cond: Any, guidance: float, reference: bool) -> None:
    """The floor's unit: (reference forward,) policy forward + backward of the backbone."""
    if reference:
        with torch.no_grad(), backbone.reference():
            backbone.predict(x, t, cond, guidance)
    with backbone.training():
        backbone.predict(x, t, cond, guidance).float().square().mean().backward()


def _dpo(backbone: Any, reward: Any, args: argparse.Namespace) -> tuple[Any, Any, Callable[[], None]]:
    from genalign.finetuners.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig, concat_conditioning

    method = DiffusionDPO(DiffusionDPOConfig(beta=2500, pairs_from="policy", samples_per_prompt=2), backbone, reward,
                          SampleConfig(num_steps=args.num_steps, guidance_scale=2.0))
    with torch.no_grad():
        batch = method.collect(PROMPTS[: args.batch], torch.Generator().manual_seed(0))
    pairs, schedule = batch.pairs, backbone.schedule
    noise = torch.cat([batch.noise, batch.noise])
    t = torch.cat([batch.timesteps, batch.timesteps])
    x_t = schedule.add_noise(torch.cat([pairs.x0_w, pairs.x0_l]), noise, t)
    cond = concat_conditioning(pairs.cond)
    return method, batch, lambda: _passes(backbone, x_t, t, cond, 1.0, reference=True)


def _d3po(backbone: Any, reward: Any, args: argparse.Namespace) -> tuple[Any, Any, Callable[[], None]]:
    from genalign.finetuners.d3po import D3PO, D3POConfig

    experiment = SimpleNamespace(method=D3POConfig(samples_per_prompt=2, timestep_fraction=0.5), method_name="d3po",
                                 sample=SampleConfig(num_steps=args.num_steps, guidance_scale=2.0, eta=1.0))
    method = D3PO.build(experiment, backbone, reward)
    with torch.no_grad():
        batch = method.collect(PROMPTS[: args.batch], torch.Generator().manual_seed(0))
    trajectory = batch.trajectory
    rows = torch.unique(torch.cat([batch.a, batch.b]))
    cond = trajectory.cond.select(rows)

    def floor() -> None:
        for step in batch.steps.tolist():
            x, t = trajectory.latents[step][rows], trajectory.timesteps[step]
            _passes(backbone, x, t, cond, trajectory.guidance_scale, reference=True)

    return method, batch, floor


def _policy_gradient(cls: Any, config: Any, backbone: Any, reward: Any, args: argparse.Namespace,
                     eta: float) -> tuple[Any, Any, Callable[[], None]]:
    experiment = SimpleNamespace(method=config, sample=SampleConfig(num_steps=args.num_steps, guidance_scale=2.0,
                                                                    eta=eta))
    method = cls.build(experiment, backbone, reward)
    with torch.no_grad():
        batch = method.collect(PROMPTS[: args.batch], torch.Generator().manual_seed(0))
    trajectory = method._minibatch_trajectory(batch.rows)

    def floor() -> None:
        for step in batch.steps:
            x, t = trajectory.latents[step], trajectory.timesteps[step]
            _passes(backbone, x, t, trajectory.cond, trajectory.guidance_scale, reference=config.beta > 0)

    return method, batch, floor


def _ddpo(backbone: Any, reward: Any, args: argparse.Namespace) -> tuple[Any, Any, Callable[[], None]]:
    from genalign.finetuners.ddpo import DDPO, DDPOConfig

    config = DDPOConfig(samples_per_prompt=2, minibatches=1, inner_epochs=1, min_count=2, timestep_fraction=0.5)
    return _policy_gradient(DDPO, config, backbone, reward, args, eta=1.0)


def _flow_grpo(backbone: Any, reward: Any, args: argparse.Namespace) -> tuple[Any, Any, Callable[[], None]]:
    from genalign.finetuners.flow_grpo import FlowGRPO, FlowGRPOConfig

    config = FlowGRPOConfig(samples_per_prompt=2, minibatches=1, inner_epochs=1, timestep_fraction=0.5)
    return _policy_gradient(FlowGRPO, config, backbone, reward, args, eta=0.7)


def _inversion_dpo(backbone: Any, reward: Any, args: argparse.Namespace) -> tuple[Any, Any, Callable[[], None]]:
    from genalign.finetuners.diffusion_dpo import concat_conditioning
    from genalign.finetuners.inversion_dpo import InversionDPO, InversionDPOConfig

    method = InversionDPO(InversionDPOConfig(beta=500, inversion_steps=args.num_steps, samples_per_prompt=2,
                                             steps_per_update=args.num_steps // 2, pairs_from="policy"),
                          backbone, reward, SampleConfig(num_steps=args.num_steps, guidance_scale=2.0))
    with torch.no_grad():
        batch = method.collect(PROMPTS[: args.batch], torch.Generator().manual_seed(0))
    inversion_w, inversion_l = batch.inversion_w, batch.inversion_l
    cond = concat_conditioning(batch.pairs.cond)

    def floor() -> None:  # the policy on both inversions' states at the trained steps, one backward
        with backbone.training():
            outputs = [backbone.predict(torch.cat([inversion_w.inputs[i], inversion_l.inputs[i]]),
                                        inversion_w.timesteps[i], cond, 1.0) for i in batch.steps.tolist()]
            torch.stack(outputs).float().square().mean().backward()

    return method, batch, floor


def _adjoint_matching(backbone: Any, reward: Any, args: argparse.Namespace) -> tuple[Any, Any, Callable[[], None]]:
    from genalign.finetuners.adjoint_matching import AdjointMatching, AdjointMatchingConfig

    method = AdjointMatching(AdjointMatchingConfig(reward_multiplier=100.0), backbone, reward,
                             SampleConfig(num_steps=args.num_steps, guidance_scale=2.0))
    with torch.no_grad():
        batch = method.collect(PROMPTS[: args.batch], torch.Generator().manual_seed(0))

    def floor() -> None:  # per trained step: the policy's drift forward and backward
        for i, k in enumerate(batch.steps):
            with backbone.training():
                backbone.predict(batch.states[i], method.sde.timesteps[k], batch.cond, 2.0).float().square().mean(
                ).backward()

    return method, batch, floor


def _value_method(cls: Any, config: Any, backbone: Any, reward: Any, args: argparse.Namespace,
                  eta: float) -> Any:
    from genalign.rewards.clip import load_encoder

    encoder = load_encoder(RewardConfig(name="clip", path=args.reward_path), backbone.device, args.reward_path)
    experiment = SimpleNamespace(method=config, sample=SampleConfig(num_steps=args.num_steps, guidance_scale=2.0,
                                                                    eta=eta))
    return cls.build(experiment, backbone, reward, encoder=encoder)


def _vard(backbone: Any, reward: Any, args: argparse.Namespace) -> tuple[Any, Any, Callable[[], None]]:
    from genalign.finetuners.vard import VARD, VARDConfig

    method = _value_method(VARD, VARDConfig(value_warmup=0, samples_per_prompt=2, steps_per_update=args.num_steps // 2,
                                            kl_target=1e-3), backbone, reward, args, eta=1.0)
    with torch.no_grad():
        batch = method.collect(PROMPTS[: args.batch], torch.Generator().manual_seed(0))
    trajectory, steps = batch.trajectory, batch.steps
    schedule = backbone.schedule

    def floor() -> None:  # per trained step: reference forward, policy and value forward + backward
        for k in steps:
            x, t = trajectory.latents[k], trajectory.timesteps[k]
            with torch.no_grad(), backbone.reference():
                backbone.predict(x, t, trajectory.cond, trajectory.guidance_scale)
            with backbone.training():
                state = x.float() + backbone.predict(x, t, trajectory.cond, trajectory.guidance_scale).float()
                after = schedule.previous_timestep(t, trajectory.num_steps)
                value = method.learner(state, torch.as_tensor(after).expand(state.shape[0]), trajectory.cond)
                (-value.mean()).backward()

    return method, batch, floor


def _ac_flow(backbone: Any, reward: Any, args: argparse.Namespace) -> tuple[Any, Any, Callable[[], None]]:
    from genalign.finetuners.ac_flow import ACFlow, ACFlowConfig

    method = _value_method(ACFlow, ACFlowConfig(critic_warmup=0, relative=True), backbone, reward, args, eta=0.0)
    with torch.no_grad():
        batch = method.collect(PROMPTS[: args.batch], torch.Generator().manual_seed(0))
    x_t, timesteps, cond = batch.actor[:3]

    def floor() -> None:  # the policy's forward + backward on the collected states
        with backbone.training():
            backbone.predict(x_t, timesteps, cond).float().square().mean().backward()

    return method, batch, floor


METHODS = {"diffusion_dpo": ("sd", _dpo), "inversion_dpo": ("sd", _inversion_dpo), "d3po": ("sd", _d3po),
           "ddpo": ("sd", _ddpo), "flow_grpo": ("sd3", _flow_grpo), "adjoint_matching": ("sd3", _adjoint_matching),
           "vard": ("sd", _vard), "ac_flow": ("sd3", _ac_flow)}


def set_up(name: str, reward: Any, args: argparse.Namespace, device: torch.device) -> SimpleNamespace:
    """Method ``name`` on its shapes backbone (LoRA r8) with one collected micro-batch: backbone,
    method, batch, floor (the backbone passes the step cannot avoid), params, path."""
    family, make = METHODS[name]
    torch.manual_seed(0)
    path = args.sd if family == "sd" else args.sd3
    backbone = load_backbone(BackboneConfig(family=family, path=path, finetune="lora", lora_rank=8, lora_alpha=8),
                             device)
    method, batch, floor = make(backbone, reward, args)
    return SimpleNamespace(backbone=backbone, method=method, batch=batch, floor=floor, path=path,
                           params=list(method.named_trainable_parameters().values()))


def _step(method: Any, batch: Any) -> None:
    loss_and_backward(method, batch, torch.Tensor.backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--sd", default="models/shapes/sd")
    parser.add_argument("--sd3", default="models/shapes/sd3")
    parser.add_argument("--reward-path", default="models/shapes/clip")
    parser.add_argument("--batch", type=int, default=8, help="prompts per micro-batch")
    parser.add_argument("--num-steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="bench/results/step_overhead.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    reward = load_reward(RewardConfig(name="clip", path=args.reward_path), device)
    results = {}
    for name in args.methods:
        s = set_up(name, reward, args, device)
        method, batch, floor, params, path = s.method, s.batch, s.floor, s.params, s.path
        train_step = functools.partial(_step, method, batch)
        _timed(train_step, params, device), _timed(floor, params, device)  # warm-up
        times = SimpleNamespace(step=[], floor=[])
        for _ in range(args.repeats):
            times.step.append(_timed(train_step, params, device))
            times.floor.append(_timed(floor, params, device))
        step, base = statistics.median(times.step), statistics.median(times.floor)
        results[name] = {"backbone": path, "step_seconds": step, "floor_seconds": base, "ratio": step / base}
        print(f"{name:14s} {path}: step {step * 1e3:8.1f} ms, floor {base * 1e3:8.1f} ms, ratio {step / base:.3f}",
              flush=True)
    print("target: ratio <= 1.10")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "batch": args.batch, "num_steps": args.num_steps,
                               "repeats": args.repeats, "methods": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
