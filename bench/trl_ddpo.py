"""genalign's DDPO side by side with TRL's last DDPO (trl 0.23.1 ``DDPOTrainer``) on the same model.

Makes TRL's own virtual environment on first use (``--venv``, default ``bench/.venv-trl``: trl
0.23.1, diffusers < 0.36, transformers 4.57, the torch of this machine) and runs TRL there through
``bench/trl_ddpo_driver.py``. The shapes SD folder is shared, with its tokenizer also written in the
slow format (vocab.json + merges.txt) that transformers 4.57's CLIPTokenizer needs.

    .venv/bin/python bench/trl_ddpo.py throughput          # rollouts with per-step log-probs, alternating
    .venv/bin/python bench/trl_ddpo.py train --epochs 50   # TRL DDPO on the shapes world's exact reward

throughput: seconds per rollout of ``--batch`` images (prompt encoding, sampling with per-step
log-probs, VAE decode), genalign's sampler in this process and TRL's ``_generate_samples`` in its
environment, alternating ``--rounds`` times, medians; prints genalign's speed over TRL's.
``--compile``: genalign's denoiser compiled (``backbone.compile``; TRL has no such lever);
``--bf16``: both under bf16 autocast (as ``run.mixed_precision=bf16`` and TRL's ``mixed_precision``).
train: TRL's DDPOTrainer with the settings of configs/shapes/ddpo.yaml (16 images per rollout, 4
per prompt, 2 minibatches, 10 DDIM eta-1 steps, guidance 2, lr 1e-3, clip 1e-4, per-prompt
stat tracking); its LoRA (TRL's fixed rank 4) lands in OUT/final for ``genalign eval shapes --lora``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "bench" / "trl_ddpo_driver.py"
TRL_REQUIREMENTS = ["trl==0.23.1", "diffusers>=0.35,<0.36", "transformers>=4.57,<4.58", "peft>=0.17,<0.18",
                    "accelerate>=1.10,<2", "torch==2.14.1", "torchvision==0.29.1", "scipy"]  # scipy: the shapes evaluator


def ensure_venv(venv: Path) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl, diffusers; assert trl.__version__ == '0.23.1'"]
    if python.is_file() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"making TRL's environment in {venv} (a few minutes)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *TRL_REQUIREMENTS], check=True)
    subprocess.run(probe, check=True)
    return python


def trl_model_folder(source: Path, target: Path) -> Path:
    """``source`` (a diffusers SD folder) as links, with the tokenizer's BPE also written as
    vocab.json + merges.txt (transformers 4.57's slow CLIPTokenizer reads only those)."""
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for item in source.iterdir():
        if item.name not in ("tokenizer", "text_encoder"):
            (target / item.name).symlink_to(item.resolve())
    # transformers 5 saves CLIPTextModel's weights without the "text_model." prefix that 4.57 expects
    # (4.57 would silently start from random weights).
    from safetensors.torch import load_file, save_file

    text = target / "text_encoder"
    text.mkdir()
    shutil.copy(source / "text_encoder" / "config.json", text / "config.json")
    weights = load_file(str(source / "text_encoder" / "model.safetensors"))
    save_file({k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in weights.items()},
              str(text / "model.safetensors"), metadata={"format": "pt"})
    tokenizer = target / "tokenizer"
    shutil.copytree(source / "tokenizer", tokenizer)
    model = json.loads((tokenizer / "tokenizer.json").read_text())["model"]
    if model["type"] != "BPE":
        raise ValueError(f"{source}: expected a BPE tokenizer, found {model['type']}")
    (tokenizer / "vocab.json").write_text(json.dumps(model["vocab"]))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (tokenizer / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return target


def check_model_loads(python: Path, model: Path) -> None:
    """Every weight of every component loads in TRL's environment (no silent random init)."""
    probe = ("import sys; from transformers import CLIPTextModel; "
             "_, info = CLIPTextModel.from_pretrained(sys.argv[1] + '/text_encoder', output_loading_info=True); "
             "assert not info['missing_keys'] and not info['unexpected_keys'], info")
    subprocess.run([str(python), "-c", probe, str(model)], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   capture_output=True)


def _driver(python: Path, *args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([str(python), str(DRIVER), *args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"TRL driver failed:\n{result.stderr[-3000:]}")


def throughput(args: argparse.Namespace, python: Path, model: Path) -> None:
    import torch

    from genalign.core.experiment import BackboneConfig
    from genalign.core.sampler import initial_noise, sample
    from genalign.pipelines import load_backbone

    backbone = load_backbone(BackboneConfig(family="sd", path=args.model, finetune="lora", lora_rank=4,
                                            lora_alpha=4, compile="sampling" if args.compile else "none",
                                            compile_warmup=0), "cpu")  # the warm-up rollout compiles
    prompts = [line.strip() for line in (ROOT / "configs/shapes/prompts_train.txt").read_text().splitlines()]
    prompts = prompts[: args.batch]

    @torch.no_grad()
    def ours() -> float:
        start = time.perf_counter()
        generator = torch.Generator().manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            cond = backbone.encode_prompts(prompts, guidance=True)
            noise = initial_noise(backbone, len(prompts), generator)
            trajectory = sample(backbone, cond, args.steps, args.guidance, eta=args.eta, generator=generator,
                                latents=noise)
            backbone.decode(trajectory.final)
        return time.perf_counter() - start

    start = time.perf_counter()
    ours()  # warm-up (and the compile with --compile)
    print(f"genalign's first rollout: {time.perf_counter() - start:.1f} s", flush=True)
    times: dict[str, list[float]] = {"genalign": [], "trl": []}
    out = Path(args.out).with_suffix(".trl-rollout.json")
    for _ in range(args.rounds):
        times["genalign"].extend(ours() for _ in range(args.repeats))
        _driver(python, "rollout", str(model), str(out), "--batch", str(args.batch), "--steps", str(args.steps),
                "--guidance", str(args.guidance), "--eta", str(args.eta), "--repeats", str(args.repeats),
                *(["--bf16"] if args.bf16 else []))
        times["trl"].extend(json.loads(out.read_text())["seconds"])
    medians = {k: statistics.median(v) for k, v in times.items()}
    ratio = medians["trl"] / medians["genalign"]
    setting = ("genalign compiled, " if args.compile else "") + ("both under bf16 autocast" if args.bf16 else "fp32")
    print(f"rollouts of {args.batch} images, {args.steps} steps, guidance {args.guidance}, eta {args.eta}, {setting}: "
          f"genalign {medians['genalign']:.3f} s, TRL 0.23.1 {medians['trl']:.3f} s; genalign's speed / TRL's: "
          f"{ratio:.2f}")
    Path(args.out).write_text(json.dumps({"batch": args.batch, "steps": args.steps, "compile": args.compile,
                                          "bf16": args.bf16, "seconds": times,
                                          "median_seconds": medians, "speed_ratio": ratio}, indent=1) + "\n")


def train(args: argparse.Namespace, python: Path, model: Path) -> None:
    out = Path(args.train_out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [str(python), str(DRIVER), "train", str(model), str(out), "--epochs", str(args.epochs),
               "--batch", "16", "--train-batch", "8", "--steps", "10", "--guidance", "2", "--eta", "1",
               "--lr", "1e-3", "--samples-per-prompt", "4", "--seed", str(args.seed),
               "--max-minutes", str(args.max_minutes), "--save-at", *[str(e) for e in args.save_at]]
    subprocess.run(command, env=env, check=True)  # prints one JSON line per epoch
    print(f"TRL's LoRA: {out / 'final' / 'pytorch_lora_weights.safetensors'}; score it with\n  genalign eval shapes "
          f"--backbone {args.model} --family sd --clip models/shapes/clip --diversity 4 "
          f"--lora {out / 'final' / 'pytorch_lora_weights.safetensors'} --out {out / 'eval'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["throughput", "train"])
    parser.add_argument("--model", default="models/shapes/sd")
    parser.add_argument("--venv", default=str(ROOT / "bench" / ".venv-trl"))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=0.0, help="train: stop after this long (0: no limit)")
    parser.add_argument("--save-at", type=int, nargs="*", default=[],
                        help="train: also save the LoRA after these epochs (OUT/epoch-00000E), the run stopped there")
    parser.add_argument("--compile", action="store_true", help="throughput: genalign's denoiser compiled")
    parser.add_argument("--bf16", action="store_true", help="throughput: both rollouts under bf16 autocast")
    parser.add_argument("--out", default="bench/results/trl_ddpo_throughput.json")
    parser.add_argument("--train-out", default="runs/shapes-trl-ddpo")
    args = parser.parse_args()
    python = ensure_venv(Path(args.venv))
    # A folder of this run's own: two runs side by side (the leaderboard's seeds) each rebuild it.
    with tempfile.TemporaryDirectory(prefix="trl-model-") as folder:
        model = trl_model_folder(ROOT / args.model, Path(folder) / "model")
        check_model_loads(python, model)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        (throughput if args.mode == "throughput" else train)(args, python, model)


if __name__ == "__main__":
    main()
