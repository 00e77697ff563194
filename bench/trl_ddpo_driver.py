"""TRL 0.23's DDPO on a genalign shapes model; runs inside TRL's own virtual environment.

Started by ``bench/trl_ddpo.py`` (which makes that environment); not part of genalign and not
imported by it. Two modes, each writing one JSON file:

    rollout MODEL OUT --batch 16 --steps 10 --guidance 2 --eta 1 --repeats 5
        seconds per ``DDPOTrainer._generate_samples`` call (prompt encoding, DDIM sampling with
        per-step log-probs, VAE decode to tensors), after one warm-up call.
    train MODEL OUT_DIR --epochs 50 ...
        DDPOTrainer.train on the shapes world's exact evaluator (the reward genalign's
        configs/shapes/ddpo.yaml trains on), prompts from PROMPT_FILE in a seeded order, each one
        ``--samples-per-prompt`` times in a row (the per-prompt groups of genalign's rollouts);
        writes the LoRA (diffusers format) and per-epoch rewards and wall times; ``--save-at E ...``
        also the LoRA after each epoch E (OUT_DIR/epoch-00000E: the run stopped there).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _trainer(args: argparse.Namespace, reward_fn, prompt_fn, logdir: str):
    from trl import DDPOConfig, DDPOTrainer, DefaultDDPOStableDiffusionPipeline

    config = DDPOConfig(
        num_epochs=getattr(args, "epochs", 1), mixed_precision="no", log_with=None, seed=args.seed,
        sample_num_steps=args.steps, sample_eta=args.eta, sample_guidance_scale=args.guidance,
        sample_batch_size=args.batch, sample_num_batches_per_epoch=1,
        train_batch_size=getattr(args, "train_batch", args.batch), train_learning_rate=getattr(args, "lr", 3e-4),
        train_gradient_accumulation_steps=1, train_num_inner_epochs=1, train_clip_range=1e-4,
        train_adv_clip_max=5.0, train_timestep_fraction=1.0, per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=16, per_prompt_stat_tracking_min_count=args.samples_per_prompt,
        save_freq=10**6, logdir=logdir, project_kwargs={"project_dir": logdir},
    )
    from accelerate import PartialState

    PartialState()  # TRL's pipeline logs through accelerate before its trainer makes the Accelerator
    pipeline = DefaultDDPOStableDiffusionPipeline(args.model, use_lora=True)
    return DDPOTrainer(config, reward_fn, prompt_fn, pipeline)


def _prompt_fn(args: argparse.Namespace):
    prompts = [line.strip() for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    order: list[str] = []
    rng = random.Random(args.seed)

    def next_prompt() -> tuple[str, dict]:
        if not order:
            shuffled = prompts[:]
            rng.shuffle(shuffled)
            order.extend(p for p in shuffled for _ in range(args.samples_per_prompt))
        return order.pop(0), {}

    return next_prompt


def _gold_reward():
    sys.path.insert(0, str(ROOT))
    from genalign.shapes.reward import ShapesGold

    gold = ShapesGold()
    log: list[float] = []

    def reward_fn(images, prompts, metadata):
        scores = gold.score(images.float().clamp(0, 1), list(prompts), None)
        log.extend(scores.tolist())
        return scores, {}

    return reward_fn, log


def rollout(args: argparse.Namespace) -> None:
    reward_fn = lambda images, prompts, metadata: (torch.zeros(len(prompts)), {})  # noqa: E731
    trainer = _trainer(args, reward_fn, _prompt_fn(args), str(Path(args.out).parent / "trl-logs"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
        trainer._generate_samples(1, args.batch)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            trainer._generate_samples(1, args.batch)
            times.append(time.perf_counter() - start)
    Path(args.out).write_text(json.dumps({"seconds": times}) + "\n")


def train(args: argparse.Namespace) -> None:
    late = [e for e in args.save_at if not 1 <= e <= args.epochs]
    if late:
        raise SystemExit(f"--save-at {late}: not among the run's epochs 1-{args.epochs}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reward_fn, log = _gold_reward()
    trainer = _trainer(args, reward_fn, _prompt_fn(args), str(out / "trl-logs"))
    epochs, step = [], 0
    start, start_cpu = time.perf_counter(), time.process_time()
    for epoch in range(args.epochs):
        if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
            break
        seen = len(log)
        step = trainer.step(epoch, step)
        rewards = log[seen:]
        epochs.append({"epoch": epoch + 1, "reward_mean": sum(rewards) / len(rewards), "queries": len(log),
                       "seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - start_cpu})
        print(json.dumps(epochs[-1]), flush=True)
        if epoch + 1 in args.save_at:  # its time left out of the clock, as genalign's exports are
            saving, saving_cpu = time.perf_counter(), time.process_time()
            trainer.sd_pipeline.save_pretrained(str(out / f"epoch-{epoch + 1:06d}"))
            start, start_cpu = start + time.perf_counter() - saving, start_cpu + time.process_time() - saving_cpu
    trainer.sd_pipeline.save_pretrained(str(out / "final"))
    (out / "epochs.json").write_text(json.dumps(epochs, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["rollout", "train"])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--batch", type=int, default=16, help="images per rollout")
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--samples-per-prompt", type=int, default=4)
    parser.add_argument("--prompt-file", default=str(ROOT / "configs" / "shapes" / "prompts_train.txt"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true", help="rollout: under bf16 autocast")
    parser.add_argument("--max-minutes", type=float, default=0.0, help="train: stop after this long (0: no limit)")
    parser.add_argument("--save-at", type=int, nargs="*", default=[], help="train: also save the LoRA after these epochs")
    args = parser.parse_args()
    (rollout if args.mode == "rollout" else train)(args)


if __name__ == "__main__":
    main()
