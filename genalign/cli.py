"""``genalign`` command line: sample, train, tiny."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from genalign.core.config import ConfigError
from genalign.core.trainer import NonFiniteError, TrainingInterrupted

# genalign tiny FAMILY: the backbone families plus FLUX.1 [schnell]'s own tiny layout
TINY_FAMILIES = ("sd", "sd-turbo", "sdxl", "sdxl-turbo", "sd3", "flux", "flux-schnell")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# --------------------------------------------------------------------------- sample


def cmd_sample(args: argparse.Namespace) -> int:
    from torchvision.utils import save_image

    from genalign.core.experiment import BackboneConfig
    from genalign.core.sampler import initial_noise, sample
    from genalign.pipelines import load_backbone

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += [line.strip() for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError("no prompts: give --prompt (repeatable) or --prompt-file")
    config = BackboneConfig(
        family=args.family,
        path=args.backbone,
        dtype=args.dtype,
        finetune="none",
        resolution=args.resolution,
        timestep_spacing=args.timestep_spacing,
    )
    backbone = load_backbone(config, _device(args.device))
    if args.lora:
        backbone.load_lora(args.lora)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(args.seed)
    guidance = args.guidance_scale != 1.0
    images, image_prompts = [], []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size] * args.images_per_prompt
        image_prompts += batch
        negative = [args.negative_prompt] * len(batch) if args.negative_prompt else None
        with torch.no_grad():
            cond = backbone.encode_prompts(batch, negative, guidance=guidance)
            latents = initial_noise(backbone, len(batch), generator)
            trajectory = sample(backbone, cond, args.steps, args.guidance_scale, args.eta, latents, generator,
                                progress=True)
            images.append(backbone.decode(trajectory.final).cpu())
    images_t = torch.cat(images)
    names = []
    for i, image in enumerate(images_t):
        name = f"{i:04d}.png"
        save_image(image, out / name)
        names.append(name)
    save_image(images_t, out / "grid.png", nrow=min(8, len(images_t)))
    (out / "prompts.tsv").write_text("".join(f"{n}\t{p}\n" for n, p in zip(names, image_prompts)))
    print(f"wrote {len(names)} images and grid.png to {out}")
    return 0


# --------------------------------------------------------------------------- train


def _method_encoders(config: Any, device: Any) -> dict[str, Any]:
    """The image-text encoder a value-based method's config names (``encoder_key``, e.g. VARD's
    ``value_encoder``) when its value inputs are ``encoder``: loaded here, where rewards may be
    imported, and handed to the method's ``build``."""
    from genalign.finetuners import METHODS

    key = getattr(METHODS.get(config.method_name), "encoder_key", None)
    if key is None or getattr(config.method, key.replace("_encoder", "_inputs"), None) != "encoder":
        return {}
    from genalign.core.experiment import RewardConfig
    from genalign.rewards.clip import load_encoder

    path = getattr(config.method, key)
    return {"encoder": load_encoder(RewardConfig(name="clip", path=path), device, path)}


def cmd_train(args: argparse.Namespace) -> int:
    from accelerate.utils import set_seed

    from genalign.core.experiment import load_experiment
    from genalign.core.trainer import Trainer, make_accelerator
    from genalign.finetuners import METHODS, config_classes

    finetuners = METHODS.all()
    if args.help_config:
        return _help_config(finetuners)
    if args.resume and args.resume.endswith((".yaml", ".yml")) and (not args.config or "=" in args.config):
        # `train --resume exp.yaml key=value`: argparse gave the YAML to --resume; it is the config
        args.overrides = [args.config, *args.overrides] if args.config else args.overrides
        args.config, args.resume = args.resume, "latest"
    if not args.config:
        raise ConfigError("genalign train needs a config file (see configs/)")
    config = load_experiment(args.config, config_classes(), args.overrides)
    run = config.run
    accelerator = make_accelerator(run)
    set_seed(run.seed)  # LoRA and head initialisations draw from the global RNGs
    backbone = None
    if config.backbone.path:
        from genalign.pipelines import load_backbone

        backbone = load_backbone(config.backbone, accelerator.device)
        _shard_if_asked(backbone, accelerator)
    reward = None
    if config.reward:
        from genalign.rewards import build_reward

        reward = build_reward(config.reward, accelerator.device)
    finetuner = finetuners[config.method_name].build(config, backbone, reward, **_method_encoders(config, accelerator.device))
    own_data = getattr(finetuner, "training_prompts", None)
    prompts = own_data() if own_data is not None else None  # e.g. offline preference pairs
    trainer = Trainer(
        finetuner,
        run,
        config.sample,
        prompts or run.load_prompts(),
        resolved_config=config.to_dict(),
        accelerator=accelerator,
    )
    result = trainer.train(resume=args.resume_from or args.resume)
    accelerator.print(
        f"done: {result.steps_done} steps ({result.skipped_steps} skipped); outputs in {result.output_dir}"
    )
    if accelerator.is_main_process and backbone is not None:
        line = load_instructions(config.backbone.path, Path(result.output_dir) / "final")
        if line:
            accelerator.print(f"load it in diffusers:\n  {line}")
    if torch.distributed.is_initialized():  # leave together; gloo's threads abort an exit that skips this
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def _shard_if_asked(backbone: Any, accelerator: Any) -> None:
    """FSDP (an accelerate launch config with ``distributed_type: FSDP``): shard the denoiser."""
    from genalign.core.sharding import local_part, plan_from_environment

    plan = plan_from_environment()
    if plan is None:
        return
    if accelerator.num_processes == 1:
        accelerator.print("FSDP asked for with one process: nothing to shard, training unsharded")
        return
    units = backbone.shard(plan)
    strategy = "FULL_SHARD" if plan.reshard_after_forward else "SHARD_GRAD_OP"
    params = list(backbone.unwrapped_denoiser.parameters())
    held, total = sum(local_part(p).numel() for p in params), sum(p.numel() for p in params)
    accelerator.print(f"FSDP ({strategy}): denoiser sharded over {accelerator.num_processes} processes in {units} "
                      f"units; this process holds {held} of its {total} parameters")


def load_instructions(base: str, final: Path) -> str | None:
    """The one line of Python that loads a run's exported weights into a diffusers pipeline."""
    if (final / "pytorch_lora_weights.safetensors").is_file():
        return (f'from diffusers import DiffusionPipeline; pipe = DiffusionPipeline.from_pretrained("{base}"); '
                f'pipe.load_lora_weights("{final}")')
    denoiser = final / "denoiser"
    if (denoiser / "config.json").is_file():
        import json

        cls = json.loads((denoiser / "config.json").read_text()).get("_class_name", "UNet2DConditionModel")
        part = "unet" if "UNet" in cls else "transformer"
        return (f'from diffusers import DiffusionPipeline, {cls}; pipe = DiffusionPipeline.from_pretrained("{base}", '
                f'{part}={cls}.from_pretrained("{denoiser}"))')
    return None


def _help_config(finetuners: dict[str, type]) -> int:
    from genalign.core.config import describe
    from genalign.core.experiment import BackboneConfig, RewardConfig, RunConfig, SampleConfig

    for section, cls in (("backbone", BackboneConfig), ("reward", RewardConfig), ("sample", SampleConfig),
                         ("run", RunConfig)):
        print(f"[{section}]")
        print("\n".join("  " + line for line in describe(cls)))
    for name, method in sorted(finetuners.items()):
        print(f"[method: {name}]")
        print("\n".join("  " + line for line in describe(method.Config)))
    if not finetuners:
        print("[method] no fine-tuners are registered yet")
    return 0


# --------------------------------------------------------------------------- tiny


def cmd_tiny(args: argparse.Namespace) -> int:
    from genalign.pipelines.tiny import save_tiny

    folder = save_tiny(args.family, args.out, args.prediction_type, args.seed)
    print(f"wrote a tiny random {args.family} model to {folder}")
    return 0


# --------------------------------------------------------------------------- shapes


def cmd_shapes_build(args: argparse.Namespace) -> int:
    import dataclasses

    from genalign.shapes.build import BuildConfig, build

    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(BuildConfig)
                 if getattr(args, f.name, None) is not None}
    log = build(BuildConfig(**overrides))
    print(f"built the shapes world's models in {log['seconds']:.0f} s under {args.out}")
    return 0


def cmd_eval_shapes(args: argparse.Namespace) -> int:
    import json

    from torchvision.utils import save_image

    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone
    from genalign.shapes.scoring import clip_agreement, diversity, evaluate_backbone, paired_gain, proxy_reward
    from genalign.shapes.world import TASKS

    if args.with_base and not args.lora:
        raise ConfigError("--with-base compares the base model with --lora; give --lora")
    backbone = load_backbone(BackboneConfig(family=args.family, path=args.backbone, finetune="none"),
                             _device(args.device))
    models = []  # (label, scores, images) in evaluation order; the same seeds for every model
    spread = {}  # label -> diversity
    verdicts = []  # each model's per-image verdicts, in the same order
    if args.with_base:
        scores, images, metas, correct = evaluate_backbone(backbone, args.per_task, args.steps, args.guidance_scale,
                                                           args.seed)
        models.append(("base", scores, images))
        verdicts.append(correct)
        if args.diversity:
            spread["base"] = diversity(backbone, 5, args.diversity, args.steps, args.guidance_scale, args.seed)
    if args.lora:
        backbone.load_lora(args.lora)
    scores, images, metas, correct = evaluate_backbone(backbone, args.per_task, args.steps, args.guidance_scale,
                                                       args.seed)
    label = "fine-tuned" if args.lora else "model"
    models.append((label, scores, images))
    verdicts.append(correct)
    if args.diversity:
        spread[label] = diversity(backbone, 5, args.diversity, args.steps, args.guidance_scale, args.seed)
    result: dict = {"gold": scores, "backbone": args.backbone, "lora": args.lora, "per_task": args.per_task,
                    "steps": args.steps, "guidance_scale": args.guidance_scale, "seed": args.seed}
    if args.clip:
        result["proxy_reward"] = proxy_reward(args.clip, images, metas)
    if args.diversity:
        result["diversity"] = spread[label]
    if args.with_base:
        result["base"] = {"gold": models[0][1]}
        result["gain"] = paired_gain(verdicts[0], verdicts[1], [meta["tag"] for meta in metas])
        if args.clip:
            result["base"]["proxy_reward"] = proxy_reward(args.clip, models[0][2], metas)
        if args.diversity:
            result["base"]["diversity"] = spread["base"]
    if args.clip:
        result["clip_agreement_on_ground_truth"] = clip_agreement(args.clip, args.per_task, args.seed)
    # the common report summary, so `genalign eval compare` reads shapes runs too
    result["summary"] = {"benchmark": "shapes", "tasks": {t: v for t, v in scores.items() if t != "overall"},
                         "overall": scores["overall"]}
    if args.clip:
        result["summary"]["proxy_reward"] = result["proxy_reward"]["overall"]
    if args.diversity:
        result["summary"]["diversity"] = result["diversity"]["overall"]

    def line(values: dict) -> str:
        return ", ".join(f"{task} {values[task]:.3f}" for task in (*TASKS, "overall") if task in values)

    for label, gold, _ in models:
        print(f"gold score (exact evaluator, held-out prompts), {label}: {line(gold)}")
    if args.with_base:
        print(f"gold gain over the base, paired over the same prompts and seeds: {result['gain']['gain']:+.3f} "
              f"(standard error {result['gain']['standard_error']:.3f})")
    if args.clip:
        if args.with_base:
            print(f"proxy reward (CLIP score of the same images), base: {line(result['base']['proxy_reward'])}")
        print(f"proxy reward (CLIP score of the same images), {models[-1][0]}: {line(result['proxy_reward'])}")
    for name, values in spread.items():
        print(f"diversity (mean pairwise RMS pixel distance, {args.diversity} seeds x 5 prompts a task), {name}: "
              f"{line(values)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_row = min(8, args.per_task)  # the first images of each task, one task a row (base above fine-tuned)
    rows = [model_images[i * args.per_task : i * args.per_task + per_row]
            for i in range(len(TASKS)) for _, _, model_images in models]
    save_image(torch.cat(rows), out / "grid.png", nrow=per_row)
    (out / "scores.json").write_text(json.dumps(result, indent=2) + "\n")
    if args.clip:
        print("CLIP proxy top-1 prompt right by the gold evaluator (ground-truth images): "
              + line(result["clip_agreement_on_ground_truth"]))
    layout = "one task a row, base above fine-tuned" if args.with_base else "one task a row"
    print(f"wrote {out / 'grid.png'} ({layout}) and {out / 'scores.json'}")
    return 0


def _generator_from_args(args: argparse.Namespace):
    """The image generator of ``genalign eval ... --generate``: the backbone (+ LoRA), or ReNO on it."""
    from genalign.core.experiment import BackboneConfig, RewardConfig
    from genalign.eval.generate import backbone_sampler
    from genalign.pipelines import load_backbone

    if not args.backbone:
        raise ConfigError("--generate needs --backbone (a diffusers checkpoint: hub id or local folder)")
    device = _device(args.device)
    backbone = load_backbone(BackboneConfig(family=args.family, path=args.backbone, finetune="none", dtype=args.dtype),
                             device)
    if args.lora:
        backbone.load_lora(args.lora)
    if not args.reno_reward:
        return backbone_sampler(backbone, args.steps, args.guidance_scale, args.eta)
    from genalign.finetuners.reno import RenoConfig, reno
    from genalign.rewards import build_reward

    if len(args.reno_reward_path) > len(args.reno_reward):
        raise ConfigError("give at most one --reno-reward-path per --reno-reward")
    paths = list(args.reno_reward_path) + [None] * (len(args.reno_reward) - len(args.reno_reward_path))
    reward = build_reward([RewardConfig(name=name, path=path) for name, path in zip(args.reno_reward, paths)], device)
    config = RenoConfig(num_steps=args.steps, guidance_scale=args.guidance_scale, iterations=args.reno_iterations,
                        lr=args.reno_lr)

    def generate(prompts: list[str], seeds: list[int]) -> torch.Tensor:
        return reno(backbone, reward, prompts, config, torch.Generator().manual_seed(seeds[0])).images.float().cpu()

    return generate


def _geneval_detector(args: argparse.Namespace):
    """(detector, colour classifier or None) for ``genalign eval geneval --score``."""
    if args.detector == "shapes":
        from genalign.shapes.evaluator import ShapesDetector

        return ShapesDetector(), None  # the parser knows each object's colour
    from genalign.rewards.detection import load_color_classifier, load_detector

    device = _device(args.device)
    return load_detector(args.detector, args.detector_path, device), load_color_classifier(args.clip_path, device)


def cmd_eval_geneval(args: argparse.Namespace) -> int:
    import dataclasses

    from genalign.core.geneval import GenEvalOptions
    from genalign.core.reference_data import geneval_metadata
    from genalign.eval import geneval
    from genalign.eval.report import markdown_table, write_report

    if not args.generate and not args.score:
        raise ConfigError("give --generate OUT (with --backbone) and/or --score DIR")
    folder = args.score
    if args.generate:
        metas = geneval.read_metadata(args.metadata or geneval_metadata())
        if args.limit:
            metas = metas[: args.limit]
        geneval.generate(_generator_from_args(args), metas, args.generate, args.images_per_prompt, args.seed,
                         args.batch_size)
        print(f"wrote {len(metas)} prompts x {args.images_per_prompt} images in GenEval's layout to {args.generate}")
    if not folder:
        return 0
    options = GenEvalOptions(args.threshold, args.counting_threshold, args.max_objects, args.max_overlap,
                             args.position_threshold)
    detector, colors = _geneval_detector(args)
    rows, records = geneval.score_folder(folder, detector, colors, options, args.batch_size)
    out = Path(args.report or Path(folder) / "results")
    out.mkdir(parents=True, exist_ok=True)
    geneval.write_results(out / "results.jsonl", rows)
    summary = geneval.summary(rows)
    summary["detector"] = args.detector
    summary["detector_weights"] = args.detector_path or getattr(detector, "default_path", args.detector)
    scale = getattr(detector, "scale", None)  # an optional attribute of a Detector
    if scale:
        summary["detector_scale"] = scale
    summary["options"] = dataclasses.asdict(options)
    write_report(out, summary, records)
    print(markdown_table(summary), end="")
    print(f"wrote {out / 'results.jsonl'} (official format), scores.json, report.md, report.html")
    return 0


OWLV2_COMPBENCH_THRESHOLD = 0.1  # transformers' OWLv2 examples; UniDet's official 0.5 is for its own scores


def cmd_eval_t2i_compbench(args: argparse.Namespace) -> int:
    from genalign.core.reference_data import t2i_compbench_dir
    from genalign.eval import t2i_compbench as cb
    from genalign.eval.report import markdown_table, write_report

    if not args.generate and not args.score:
        raise ConfigError("give --generate OUT (with --backbone) and/or --score ROOT")
    categories = args.category or list(cb.CATEGORIES)
    for category in categories:
        if category not in cb.CATEGORIES:
            raise ConfigError(f"unknown T2I-CompBench category {category!r}; known: {', '.join(cb.CATEGORIES)}")
    data_dir = args.data_dir or t2i_compbench_dir()
    if args.generate:
        generator = _generator_from_args(args)
        for category in categories:
            prompts = cb.read_prompts(cb.prompt_file(data_dir, category, args.split))[: args.limit]
            folder = cb.generate(generator, prompts, Path(args.generate) / category, args.images_per_prompt,
                                 args.seed, args.batch_size)
            print(f"{category}: {len(prompts)} prompts x {args.images_per_prompt} images in {folder}")
    if not args.score:
        return 0
    detector = None
    if set(categories) & set(cb.DETECTOR_CATEGORIES):
        from genalign.rewards.detection import load_detector

        detector = load_detector(args.detector, args.detector_path, _device(args.device))
    models = cb.CompBenchModels(detector=detector, blip=args.blip or cb.DEFAULT_BLIP, clip=args.clip or cb.DEFAULT_CLIP,
                                depth=args.depth or cb.DEFAULT_DEPTH, device=_device(args.device))
    threshold = args.detection_threshold
    if threshold is None:
        threshold = OWLV2_COMPBENCH_THRESHOLD if args.detector == "owlv2" else cb.CompBenchOptions().detection_threshold
    options = cb.CompBenchOptions(
        detection_threshold=threshold,
        images_per_prompt=args.images_per_prompt, batch_size=args.batch_size,
    )
    records, summary = cb.score_folder(args.score, categories, models, options, data_dir=data_dir)
    out = Path(args.report or Path(args.score) / "results")
    write_report(out, summary, records)
    print(markdown_table(summary), end="")
    print(f"wrote {out / 'scores.json'}, report.md, report.html")
    return 0


def cmd_eval_compare(args: argparse.Namespace) -> int:
    from genalign.eval.report import compare

    print(compare(args.run_a, args.run_b), end="")
    return 0


def cmd_shapes_prompts(args: argparse.Namespace) -> int:
    from genalign.eval.geneval import write_metadata
    from genalign.shapes.world import evaluation_set

    metas = evaluation_set(args.split, per_task=args.per_task, seed=args.seed)
    write_metadata(args.out, metas)
    print(f"wrote {len(metas)} GenEval metadata rows ({args.per_task} a task, {args.split} prompts) to {args.out}")
    return 0


# --------------------------------------------------------------------------- d3po sample


def cmd_d3po_sample(args: argparse.Namespace) -> int:
    """Pairs of trajectories (same initial noise, stochastic sampler) for human labelling."""
    import random
    from dataclasses import replace

    from genalign.core.experiment import load_experiment
    from genalign.finetuners import config_classes
    from genalign.finetuners.d3po import rollout, save_pairs
    from genalign.pipelines import load_backbone

    config = load_experiment(args.config, config_classes(), args.overrides)
    if config.sample.eta <= 0:
        raise ConfigError("d3po pairs need a stochastic sampler: set sample.eta > 0")
    torch.manual_seed(config.run.seed)
    backbone = load_backbone(replace(config.backbone, finetune="none"), _device(args.device))
    if args.lora:
        backbone.load_lora(args.lora)
    prompts = config.run.load_prompts()
    random.Random(args.seed).shuffle(prompts)
    chosen = [prompts[i % len(prompts)] for i in range(args.num_pairs)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    index = out / "pairs.jsonl"
    start = sum(1 for _ in index.open()) if index.is_file() else 0
    generator = torch.Generator().manual_seed(args.seed)
    written = 0
    for first in range(0, len(chosen), args.batch_size):
        batch = chosen[first : first + args.batch_size]
        trajectory, images = rollout(backbone, batch, 2, config.sample, generator)
        written += len(save_pairs(out, trajectory, images, batch, start + written))
    print(f"wrote {written} pairs to {out}: label them as JSON {{pair_id: 0 | 1 | \"tie\"}} (0: the first image "
          f"is better) and train with method.preferences=labels method.pairs_dir={out} method.labels=<file>")
    return 0


# --------------------------------------------------------------------------- list


def _summary(cls: type) -> str:
    text = getattr(cls, "summary", "") or (cls.__doc__ or "").strip().split("\n")[0]
    return text.rstrip(".")


def cmd_list(args: argparse.Namespace) -> int:
    from genalign.finetuners import METHODS
    from genalign.pipelines import BACKBONES
    from genalign.rewards import REWARDS

    sections = {
        "methods (method.name)": METHODS.all(),
        "backbones (backbone.family)": BACKBONES.all(),
        "rewards (reward.name)": REWARDS.all(),
    }
    for title, registry in sections.items():
        if args.what and not title.startswith(args.what):
            continue
        print(title)
        width = max(len(name) for name in registry)
        for name in sorted(registry):
            print(f"  {name:<{width}}  {_summary(registry[name])}")
    return 0


# --------------------------------------------------------------------------- reno


def cmd_reno(args: argparse.Namespace) -> int:
    import json

    from safetensors.torch import save_file
    from torchvision.utils import save_image

    from genalign.core.experiment import BackboneConfig, RewardConfig
    from genalign.finetuners.reno import RenoConfig, reno
    from genalign.pipelines import load_backbone
    from genalign.rewards import build_reward

    metas = None
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line.strip() for line in Path(args.prompt_file).read_text().splitlines() if line.strip()]
    if args.shapes_heldout:
        from genalign.shapes.world import evaluation_set

        metas = evaluation_set("heldout", per_task=args.shapes_heldout, seed=args.seed)
        prompts += [m["prompt"] for m in metas]
    if not prompts:
        raise ConfigError("genalign reno needs prompts: --prompt, --prompt-file or --shapes-heldout")
    paths = list(args.reward_path) + [None] * (len(args.reward) - len(args.reward_path))
    weights = list(args.reward_weight) + [1.0] * (len(args.reward) - len(args.reward_weight))
    if len(paths) != len(args.reward) or len(weights) != len(args.reward):
        raise ConfigError("give at most one --reward-path and one --reward-weight per --reward")
    device = _device(args.device)
    reward = build_reward([RewardConfig(name=n, path=p or None, weight=w) for n, p, w in zip(args.reward, paths, weights)],
                          device)
    backbone = load_backbone(BackboneConfig(family=args.family, path=args.backbone, finetune="none", dtype=args.dtype),
                             device)
    if args.lora:
        backbone.load_lora(args.lora)
    config = RenoConfig(num_steps=args.steps, guidance_scale=args.guidance_scale, iterations=args.iterations,
                        optimizer=args.optimizer, lr=args.lr, grad_clip=args.grad_clip, reg_weight=args.reg_weight,
                        seeds_per_prompt=args.seeds, patience=args.patience)
    out = Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "initial").mkdir(exist_ok=True)
    results, history = [], []
    for first in range(0, len(prompts), args.batch_size):
        batch = prompts[first : first + args.batch_size]
        result = reno(backbone, reward, batch, config, torch.Generator().manual_seed(args.seed * 1_000_003 + first),
                      progress=True)
        results.append(result)
        history.append(result.history)
    images = torch.cat([r.images for r in results])
    initial = torch.cat([r.initial_images for r in results])
    for i in range(len(prompts)):
        save_image(images[i], out / "images" / f"{i:04d}.png")
        save_image(initial[i], out / "initial" / f"{i:04d}.png")
    save_file({"noise": torch.cat([r.noise for r in results]).contiguous()}, str(out / "noise.safetensors"))
    before = torch.cat([r.initial_reward for r in results])
    after = torch.cat([r.best_reward for r in results])
    summary: dict = {"prompts": prompts, "reward_initial": before.tolist(), "reward_best": after.tolist(),
                     "history": history, "iterations_run": [r.iterations_run for r in results], "config": vars(config)}
    print(f"reward (weighted sum) of plain samples {before.mean():.4f} -> after ReNO {after.mean():.4f} "
          f"({len(prompts)} prompts, {config.seeds_per_prompt} seed(s) each)")
    if metas is not None:
        from genalign.shapes.evaluator import accuracy, evaluate
        from genalign.shapes.scoring import paired_gain

        shapes = len(metas)
        plain = [evaluate(image, meta)[0] for image, meta in zip(initial[-shapes:], metas)]
        optimised = [evaluate(image, meta)[0] for image, meta in zip(images[-shapes:], metas)]
        summary["gold_initial"], summary["gold_reno"] = accuracy(plain, metas), accuracy(optimised, metas)
        tags = [meta["tag"] for meta in metas]
        summary["gold_gain"] = paired_gain(plain, optimised, tags)
        summary["gold_verdicts"] = {"plain": plain, "reno": optimised, "tags": tags}
        print(f"gold score (held-out shapes prompts): plain {summary['gold_initial']['overall']:.3f} -> "
              f"ReNO {summary['gold_reno']['overall']:.3f}; paired gain {summary['gold_gain']['gain']:+.3f} "
              f"(standard error {summary['gold_gain']['standard_error']:.3f})")
    per_row = min(8, len(prompts))
    save_image(torch.cat([initial[:per_row], images[:per_row]]), out / "grid.png", nrow=per_row)
    (out / "reno.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out}/images (best), {out}/initial (plain samples), noise.safetensors, reno.json, grid.png "
          "(plain row above ReNO row)")
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="genalign", description="Reward fine-tuning of text-to-image diffusion and flow models."
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True)
    from genalign.pipelines import BACKBONES

    families = BACKBONES.names()  # read from the backbone files' source; imports none of them

    p = sub.add_parser("sample", help="prompts -> image files and a grid")
    p.add_argument("--backbone", required=True, help="diffusers checkpoint: hub id or local folder")
    p.add_argument("--family", default="sd", choices=families, help="model family of the checkpoint")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="text file with one prompt a line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--out", default="runs/samples", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=_positive_int, default=20)
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--images-per-prompt", type=_positive_int, default=1)
    p.add_argument("--batch-size", type=_positive_int, default=8, help="prompts per forward batch")
    p.add_argument("--lora", help="LoRA weights (diffusers format) to load")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--resolution", type=_positive_int, default=None)
    p.add_argument("--timestep-spacing", default=None, choices=["leading", "trailing", "linspace"])
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("train", help="fine-tune with a YAML experiment config")
    p.add_argument("config", nargs="?", help="experiment YAML (configs/...)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.beta=2500 run.steps=200")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="resume from the latest checkpoint of run.output_dir, or from the checkpoint folder given")
    p.add_argument("--resume-from", metavar="CHECKPOINT", help=argparse.SUPPRESS)  # older spelling of --resume PATH
    p.add_argument("--help-config", action="store_true", help="list every config key with its default and help")
    p.set_defaults(func=cmd_train)

    from genalign.demo import add_arguments as demo_arguments
    from genalign.demo import run as run_demo

    p = sub.add_parser("demo", help="Gradio page: compare fine-tuned variants side by side, label D3PO pairs")
    demo_arguments(p)
    p.set_defaults(func=run_demo)

    p = sub.add_parser("list", help="the registered methods, backbones and rewards, one line each")
    p.add_argument("what", nargs="?", choices=("methods", "backbones", "rewards"), help="only this section")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("tiny", help="build a tiny random model of a family (for tests and demos)")
    p.add_argument("family", choices=TINY_FAMILIES)
    p.add_argument("out", help="output folder (diffusers format)")
    p.add_argument("--prediction-type", default="epsilon", choices=["epsilon", "v_prediction"],
                   help="SD families only (flow models predict velocity)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_tiny)

    shapes = sub.add_parser("shapes", help="the embedded shapes world").add_subparsers(dest="shapes_command",
                                                                                       required=True)
    p = shapes.add_parser("build", help="train the world's tiny SD, SD3 and CLIP models from scratch (seeded)")
    p.add_argument("--out", default="models/shapes")
    p.add_argument("--seed", type=int, default=None)
    for name in ("dataset_size", "batch_size", "vae_steps", "sd_steps", "flow_steps", "clip_steps"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=_positive_int, default=None)
    p.add_argument("--stages", type=lambda text: tuple(text.split(",")), default=None,
                   help="comma-separated subset of sd,flow,clip (later stages alone reuse the saved sd/)")
    p.set_defaults(func=cmd_shapes_build)

    p = shapes.add_parser("prompts", help="write shapes-world prompts as a GenEval metadata file")
    p.add_argument("out", help="output .jsonl")
    p.add_argument("--per-task", type=_positive_int, default=50)
    p.add_argument("--split", default="heldout", choices=("train", "heldout"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_shapes_prompts)

    evals = sub.add_parser("eval", help="benchmark scoring").add_subparsers(dest="eval_command", required=True)
    p = evals.add_parser("shapes", help="gold score of a model on the shapes world's held-out prompts")
    p.add_argument("--backbone", default="models/shapes/sd", help="a shapes model (diffusers folder)")
    p.add_argument("--family", default="sd", choices=families)
    p.add_argument("--lora", help="LoRA weights (diffusers format) to load")
    p.add_argument("--per-task", type=_positive_int, default=50, help="prompts per task")
    p.add_argument("--steps", type=_positive_int, default=25)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clip", help="also report the proxy reward and how often this CLIP's top-1 prompt is right")
    p.add_argument("--with-base", action="store_true", help="score the base model too (same seeds), before vs after")
    p.add_argument("--diversity", type=_positive_int, metavar="K",
                   help="also report sample diversity: mean pairwise pixel distance of K images a prompt")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/eval-shapes")
    p.set_defaults(func=cmd_eval_shapes)
    p = evals.add_parser("geneval", help="GenEval: generate its image layout and/or score one")
    p.add_argument("--generate", metavar="OUT", help="write <OUT>/<index:05>/{metadata.jsonl,samples/NNNNN.png}")
    p.add_argument("--metadata", help="GenEval metadata for --generate (default: the official "
                   "evaluation_metadata.jsonl, shipped; `genalign shapes prompts` writes one for the shapes world)")
    p.add_argument("--limit", type=_positive_int, help="only the first N prompts of --metadata")
    p.add_argument("--score", metavar="DIR", help="score a GenEval image folder (ours or another tool's)")
    p.add_argument("--report", help="folder for results.jsonl and the reports (default: <DIR>/results)")
    p.add_argument("--backbone", help="diffusers checkpoint for --generate")
    p.add_argument("--family", default="sd", choices=families)
    p.add_argument("--lora", help="LoRA weights (diffusers format) to load")
    p.add_argument("--reno-reward", action="append", default=[],
                   help="generate with ReNO optimising this differentiable reward (repeatable: a sum)")
    p.add_argument("--reno-reward-path", action="append", default=[], help="weights of the matching --reno-reward")
    p.add_argument("--reno-iterations", type=int, default=50)
    p.add_argument("--reno-lr", type=float, default=5.0)
    p.add_argument("--images-per-prompt", type=_positive_int, default=4, help="GenEval's protocol: 4")
    p.add_argument("--steps", type=_positive_int, default=50)
    p.add_argument("--guidance-scale", type=float, default=9.0, help="GenEval's SD runs: 9")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--detector", default="mask2former", choices=("mask2former", "owlv2", "shapes"),
                   help="shapes: the shapes world's exact parser (for shapes-world folders)")
    p.add_argument("--detector-path", help="detector weights (default: the detector's hub id)")
    p.add_argument("--clip-path", help="CLIP ViT-L/14 for the colour classifier (default: openai/clip-vit-large-patch14)")
    p.add_argument("--threshold", type=float, default=0.3)
    p.add_argument("--counting-threshold", type=float, default=0.9)
    p.add_argument("--max-objects", type=_positive_int, default=16)
    p.add_argument("--max-overlap", type=float, default=1.0)
    p.add_argument("--position-threshold", type=float, default=0.1)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval_geneval)

    p = evals.add_parser("t2i-compbench", help="T2I-CompBench(++): generate its image layout and/or score it")
    p.add_argument("--generate", metavar="OUT", help="write <OUT>/<category>/{prompt}_{NNNNNN}.png")
    p.add_argument("--data-dir", help="folder of {category}_{split}.txt prompt files (default: the official "
                   "validation lists, shipped)")
    p.add_argument("--split", default="val", help="prompt file suffix: {category}_{split}.txt")
    p.add_argument("--limit", type=_positive_int, help="only the first N prompts of each category")
    p.add_argument("--score", metavar="ROOT", help="score <ROOT>/<category>/ folders (ours or another tool's)")
    p.add_argument("--category", action="append", help="a category (repeatable; default: all eight)")
    p.add_argument("--report", help="folder for scores.json and the reports (default: <ROOT>/results)")
    p.add_argument("--backbone", help="diffusers checkpoint for --generate")
    p.add_argument("--family", default="sd", choices=families)
    p.add_argument("--lora", help="LoRA weights (diffusers format) to load")
    p.add_argument("--reno-reward", action="append", default=[], help="generate with ReNO on this reward (repeatable)")
    p.add_argument("--reno-reward-path", action="append", default=[], help="weights of the matching --reno-reward")
    p.add_argument("--reno-iterations", type=int, default=50)
    p.add_argument("--reno-lr", type=float, default=5.0)
    p.add_argument("--images-per-prompt", type=_positive_int, default=10, help="the official protocol: 10")
    p.add_argument("--steps", type=_positive_int, default=30, help="the official SD runs: 30")
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--detector", default="owlv2", choices=("owlv2", "mask2former"),
                   help="stands in for UniDet (spatial, complex, numeracy, 3d_spatial); the default OWLv2 is open "
                        "vocabulary (COCO's 80 classes name both objects of 80 of the 300 spatial prompts)")
    p.add_argument("--detector-path", help="detector weights (default: the detector's hub id)")
    p.add_argument("--detection-threshold", type=float,
                   help="detector confidence kept (default: the official 0.5 for mask2former; 0.1 for owlv2, the "
                        "threshold of transformers' OWLv2 examples, not calibrated against UniDet)")
    p.add_argument("--blip", help="BLIP VQA model (default: Salesforce/blip-vqa-base)")
    p.add_argument("--clip", help="CLIP for non-spatial / complex (default: openai/clip-vit-base-patch32)")
    p.add_argument("--depth", help="depth model for 3d_spatial (default: Intel/dpt-hybrid-midas, the official DPT-Hybrid)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_eval_t2i_compbench)

    p = evals.add_parser("compare", help="two scoring runs side by side with the differences")
    p.add_argument("run_a", help="a report folder (or its scores.json)")
    p.add_argument("run_b")
    p.set_defaults(func=cmd_eval_compare)

    p = sub.add_parser("reno", help="ReNO: optimise initial noises of a few-step generator for rewards")
    p.add_argument("--backbone", required=True, help="diffusers checkpoint: hub id or local folder")
    p.add_argument("--family", default="sd", choices=families)
    p.add_argument("--lora", help="LoRA weights (diffusers format) to load")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompt-file", help="one prompt a line")
    p.add_argument("--shapes-heldout", type=_positive_int, help="add N held-out shapes prompts a task; report gold")
    p.add_argument("--reward", action="append", required=True, help="reward name (repeatable: a weighted sum)")
    p.add_argument("--reward-path", action="append", default=[], help="weights of the matching --reward")
    p.add_argument("--reward-weight", action="append", type=float, default=[], help="weight of the matching --reward")
    p.add_argument("--steps", type=_positive_int, default=1, help="generator steps (1-4)")
    p.add_argument("--guidance-scale", type=float, default=1.0)
    p.add_argument("--iterations", type=int, default=50,
                   help="reward evaluations, the first on the starting noise, each but the last followed by a "
                        "step (paper: 50)")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"))
    p.add_argument("--lr", type=float, default=5.0, help="paper: 5 with SGD, momentum 0.9, Nesterov")
    p.add_argument("--grad-clip", type=float, default=0.1)
    p.add_argument("--reg-weight", type=float, default=0.01, help="lambda of the noise-norm regulariser")
    p.add_argument("--seeds", type=_positive_int, default=1, help="initial noises per prompt (best kept)")
    p.add_argument("--patience", type=int, default=0, help="early stop after N iterations without improvement")
    p.add_argument("--batch-size", type=_positive_int, default=64, help="prompts optimised together")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/reno")
    p.set_defaults(func=cmd_reno)

    p = sub.add_parser("d3po", help="D3PO's human-feedback loop")
    d3po = p.add_subparsers(dest="d3po_command", required=True)
    p = d3po.add_parser("sample", help="write pairs of trajectories (and their images) for labelling")
    p.add_argument("config", help="the experiment YAML (backbone, sample and run.prompts are used)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sample.eta=1.0")
    p.add_argument("--out", required=True, help="folder for pairs.jsonl, images/ and trajectories/ (appended to)")
    p.add_argument("--num-pairs", type=_positive_int, default=16)
    p.add_argument("--batch-size", type=_positive_int, default=8)
    p.add_argument("--lora", help="sample from this LoRA (a later round of the loop)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_d3po_sample)
    return parser


OOM_HINTS = (
    "lower run.batch_size (and raise run.grad_accum to keep the effective batch)",
    "backbone.finetune=lora with a smaller backbone.lora_rank",
    "backbone.gradient_checkpointing=true",
    "run.mixed_precision=bf16 (or fp16) and backbone.dtype=bfloat16",
    "fewer sampling steps with gradients (e.g. a method's grad_last_k / timestep_fraction)",
    "a smaller backbone.resolution",
)


def _is_out_of_memory(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; errors a user meets are one clear line (exit 2 for bad input, 1 for failed
    runs), the traceback only with ``--debug``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.debug:
        return int(args.func(args))
    try:
        return int(args.func(args))
    except ConfigError as err:
        print(f"genalign: config error: {err}", file=sys.stderr)
        return 2
    except FileNotFoundError as err:  # missing weights, prompt files, checkpoints
        print(f"genalign: {err}", file=sys.stderr)
        return 2
    except NonFiniteError as err:
        print(f"genalign: {err}", file=sys.stderr)
        return 1
    except TrainingInterrupted as err:
        print(f"genalign: {err}", file=sys.stderr)
        return 128 + err.signal_number
    except ValueError as err:  # bad values found while loading (sizes, families, schedules, images)
        print(f"genalign: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genalign: interrupted (a training run resumes with --resume)", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - the last resort: one line, not a traceback
        if _is_out_of_memory(err):
            hints = "".join(f"\n  - {hint}" for hint in OOM_HINTS)
            print(f"genalign: out of memory: {str(err).splitlines()[0]}\nwhat usually fixes it:{hints}",
                  file=sys.stderr)
            return 1
        print(f"genalign: {type(err).__name__}: {err}\n(run again with --debug for the traceback)", file=sys.stderr)
        return 1

