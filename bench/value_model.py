"""Which value-model inputs generalise, and is the value's gradient worth following? (VARD, AC-Flow)

1. Samples ``--trajectories`` trajectories of the shapes SD model (10 DDIM eta-1 steps, guidance 2)
   on the training prompts, scores them with the exact evaluator (``shapes_gold``) and keeps every
   state after the first with its trajectory's return.
2. Fits value heads on 80% of the trajectories and reports the error on the held-out 20%
   (standardised returns; ``constant`` is the best constant): ``latent`` (the small CNN on the
   latent state, :class:`~genalign.finetuners.value.ValueModel`) and ``encoder`` (the MLP head on
   CLIP embeddings of the frozen model's decoded clean estimate,
   :class:`~genalign.finetuners.value.CleanEstimateFeatures`).
3. Value guidance with the encoder head fitted on all trajectories: new samples whose states after
   the given steps are moved up the value's gradient (a step of ``scale`` RMS per element), against
   the same noise unguided, scored by the exact evaluator. A value whose gradient raises the true
   reward here is what VARD's policy update distils into the model.

    .venv/bin/python bench/value_model.py                  # 512 trajectories, ~15 min on 2 cores
    .venv/bin/python bench/value_model.py --trajectories 64 --guidance-batches 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from genalign.core.experiment import BackboneConfig, RewardConfig
from genalign.core.sampler import sample
from genalign.finetuners.value import CleanEstimateFeatures, LatentFeatures, ValueLearner, value_loss
from genalign.pipelines import load_backbone
from genalign.rewards import build_reward
from genalign.rewards.clip import TransformersCLIP

ROOT = Path(__file__).resolve().parent.parent


def collect(backbone, reward, latent, encoder, prompts, trajectories, steps, guidance):
    """Per state: the features of both kinds, the trajectory index and its raw return."""
    rows: dict[str, list] = {}
    generator = torch.Generator().manual_seed(0)
    for batch in range(trajectories // 16):
        chosen = random.Random(batch).sample(prompts, 8)
        repeated = [p for p in chosen for _ in range(2)]
        cond = backbone.encode_prompts(repeated, guidance=True)
        with torch.no_grad():
            trajectory = sample(backbone, cond, steps, guidance, 1.0, generator=generator)
            returns = reward(backbone.decode(trajectory.final).float().clamp(0, 1), repeated)[0].float()
            for k in range(steps):
                after = backbone.schedule.previous_timestep(trajectory.timesteps[k], steps)
                state = trajectory.latents[k + 1]
                for kind, features in (("latent", latent), ("encoder", encoder)):
                    for key, value in features(state, torch.as_tensor(after), cond).items():
                        rows.setdefault(f"{kind}.{key}", []).append(value.float())
                rows.setdefault("trajectory", []).append(torch.arange(16) + 16 * batch)
                rows.setdefault("return", []).append(returns)
        print(f"  trajectories {16 * (batch + 1)}/{trajectories}, mean return {float(returns.mean()):.3f}", flush=True)
    return {k: torch.cat(v) for k, v in rows.items()}


def fit(learner: ValueLearner, rows: dict, kind: str, train: torch.Tensor, updates: int) -> None:
    learner.remember({**{k.split(".", 1)[1]: v[train] for k, v in rows.items() if k.startswith(kind + ".")},
                      "target": rows["target"][train]})
    learner.updates = updates
    learner.train(torch.Generator().manual_seed(0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trajectories", type=int, default=512)
    parser.add_argument("--updates", type=int, default=1500, help="Adam steps of each head (batch 128)")
    parser.add_argument("--guidance-batches", type=int, default=6, help="batches of 16 prompts per guidance setting")
    parser.add_argument("--out", default=str(ROOT / "bench/results/value_model.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.time()
    backbone = load_backbone(BackboneConfig(family="sd", path=str(ROOT / "models/shapes/sd"), finetune="lora",
                                            lora_rank=4), "cpu")
    reward = build_reward([RewardConfig(name="shapes_gold")])
    clip = TransformersCLIP(str(ROOT / "models/shapes/clip"), torch.device("cpu"), torch.float32)
    latent, encoder = LatentFeatures(backbone), CleanEstimateFeatures(backbone, clip, 2.0)
    prompts = [line.strip() for line in open(ROOT / "configs/shapes/prompts_train.txt") if line.strip()]

    rows = collect(backbone, reward, latent, encoder, prompts, args.trajectories, 10, 2.0)
    test_trajectories = rows["trajectory"] >= int(0.8 * args.trajectories)
    train, test = ~test_trajectories, test_trajectories
    mean, std = rows["return"][train].mean(), rows["return"][train].std()
    rows["target"] = (rows["return"] - mean) / std
    result: dict = {"trajectories": args.trajectories, "states": int(train.sum() + test.sum()),
                    "constant": float(value_loss(torch.full((int(test.sum()),), float(rows["target"][train].mean())),
                                                 rows["target"][test]))}
    print(f"held-out error of the best constant: {result['constant']:.3f}")
    for kind, features in (("latent", latent), ("encoder", encoder)):
        learner = ValueLearner(features, "cpu", 128, 1e-3, 0, 128, 1)
        fit(learner, rows, kind, train, args.updates)
        with torch.no_grad():
            held = {k.split(".", 1)[1]: v[test] for k, v in rows.items() if k.startswith(kind + ".")}
            seen = {k.split(".", 1)[1]: v[train] for k, v in rows.items() if k.startswith(kind + ".")}
            result[kind] = {"held_out": float(value_loss(learner.value(held), rows["target"][test])),
                            "train": float(value_loss(learner.value(seen), rows["target"][train]))}
        print(f"{kind:8s} value head: held-out error {result[kind]['held_out']:.3f}, train {result[kind]['train']:.3f}")

    # value guidance with the encoder head fitted on every trajectory
    learner = ValueLearner(encoder, "cpu", 128, 1e-3, 0, 128, 1)
    fit(learner, rows, "encoder", train | test, args.updates)
    learner.model.requires_grad_(False)
    schedule, timesteps = backbone.schedule, backbone.schedule.timesteps(10)

    def guided(chosen: list[str], seed: int, scale: float, at: tuple[int, ...]) -> float:
        cond = backbone.encode_prompts(chosen, guidance=True)
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(len(chosen), *backbone.latent_shape(), generator=generator)
        for k, t in enumerate(timesteps):
            with torch.no_grad():
                x = schedule.step(x, backbone.predict(x, t, cond, 2.0), t, 10, 1.0, generator=generator).prev_sample
            if scale and k in at:
                state = x.detach().requires_grad_(True)
                learner(state, torch.as_tensor(schedule.previous_timestep(t, 10)), cond).sum().backward()
                grad = state.grad / (state.grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-8)
                x = (x + scale * grad * x[0].numel() ** 0.5).detach()
        with torch.no_grad():
            return float(reward(backbone.decode(x).float().clamp(0, 1), chosen)[0].float().mean())

    result["guidance"] = []
    for at in ((2, 4, 6), (6, 7, 8)):
        for scale in (0.0, 0.05, 0.15):
            gold = sum(guided(random.Random(100 + s).sample(prompts, 16), s, scale, at)
                       for s in range(args.guidance_batches)) / args.guidance_batches
            result["guidance"].append({"after_steps": list(at), "scale": scale, "gold": gold})
            print(f"guidance after steps {at}, scale {scale}: gold {gold:.3f}", flush=True)
    result["seconds"] = time.time() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
