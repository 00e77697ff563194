"""The headline run and what limits the shapes models: how far the best recipe gets on the exact
evaluator in a fixed number of CPU minutes, on held-out and on training prompts, and a measured
probe for each candidate limit.

    python bench/headline.py run configs/shapes/diffusion_nft.yaml --minutes 60 --export-every 250
    python bench/headline.py probes --family sd3 --path models/shapes/sd3
    python bench/headline.py report --docs docs

``run`` trains CONFIG (reward: its own, e.g. ``shapes_gold``) for ``--minutes`` CPU minutes of
training (``run.max_cpu_minutes``: the process's CPU time over its threads, exports not counted),
exporting every ``--export-every`` steps, and scores the base and every export by the exact
evaluator on the held-out and the training split (100 prompts a task, evaluation seed 1, 25 steps,
guidance 2 unless told). ``probes`` measures the candidates:

* held-out colour combinations: the base's and the fine-tuned model's gold on both splits (from
  ``run``), and ``sft-heldout`` against ``sft-train`` below;
* capacity: supervised fine-tuning (the world's own denoising loss, ``genalign.shapes.build``) on
  exact renders of the *held-out* prompts, through the same rank-8 LoRA the fine-tuners train
  (``sft-heldout-lora``) and through every denoiser weight (``sft-heldout-full``): what the network
  can draw when it is shown the answer, the ceiling no reward can lift it past;
  ``sft-train-lora`` is the same on the training prompts (does seeing more of them transfer);
* the frozen text encoder: a linear probe (logistic regression) from its last hidden state at each
  shape word to that shape's colour, fit on the training prompts and scored on the held-out ones:
  whether the prompt's binding of colour to shape reaches the denoiser for combinations it never saw.

Everything is cached under ``--records`` (default ``bench/headline``, kept in git; weights under
``runs/headline``): stop and run again to go on. ``report`` writes the figures and a block in
``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from genalign.leaderboard import (  # noqa: E402
    Settings,
    config_settings,
    evaluate,
    fingerprint,
    made_elsewhere,
    read_points,
    write_block,
    write_points,
)

MARK_BEGIN = "<!-- headline: begin (written by bench/headline.py; edits here are overwritten) -->"
MARK_END = "<!-- headline: end -->"
SPLITS = ("heldout", "train")
TARGETS = {"sd": 0.75, "sd3": 0.70}  # the held-out gold the headline asks of each shapes model


def _settings(args: argparse.Namespace, split: str) -> Settings:
    return Settings(configs=[], per_task=args.per_task, eval_steps=args.eval_steps, guidance_scale=args.guidance_scale,
                    split=split, device=args.device)


def _eval_file(folder: Path, s: Settings, seed: int) -> Path:
    return folder / f"eval-{s.split}-seed{seed}-p{s.per_task}-n{s.eval_steps}-g{s.guidance_scale:g}.json"


def scores(family: str, path: str, weights: str | None, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Gold overall and per task on each split (mean over evaluation seeds), cached in ``folder``."""
    out: dict[str, Any] = {}
    for split in SPLITS:
        s = _settings(args, split)
        runs = [evaluate(family, path, weights, e, s, _eval_file(folder, s, e), False)["gold"] for e in args.eval_seeds]
        out[split] = {task: sum(r[task] for r in runs) / len(runs) for task in runs[0]}
    return out


# ------------------------------------------------------------------ the long run


def long_run(args: argparse.Namespace) -> dict[str, Any]:
    from genalign.core.experiment import load_experiment
    from genalign.finetuners import config_classes
    from genalign.launch import run_experiment

    name = Path(args.config).stem
    records, folder = Path(args.records) / "runs" / name, Path(args.out) / "runs" / name
    record = records / "points.json"
    overrides = {"run.seed": args.seed, "run.steps": 1000000, "run.max_cpu_minutes": args.minutes,
                 "run.export_every": args.export_every, "run.output_dir": folder, "run.checkpoint_every": 0,
                 "run.sample_every": 0, "run.tracker": "none"}
    made_from = fingerprint(config_settings(args.config, overrides), args.seed, args.minutes, "cpu", args.export_every)
    if made_elsewhere(record, made_from) and not args.redo:
        raise SystemExit(f"{record} was made from other settings (the config's, --seed, --minutes or --export-every): "
                         "--redo replaces it and its evaluations, or keep it and write elsewhere with --records")
    points = read_points(record, made_from)
    if points is None:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
        config = load_experiment(args.config, config_classes(), [f"{k}={v}" for k, v in overrides.items()])
        if config.run.lr_scheduler != "constant":
            raise SystemExit(f"{args.config}: a run stopped by the clock needs run.lr_scheduler: constant")
        run_experiment(config)
        points = []
        for where in sorted((folder / "exports").glob("step-*")) + [folder / "final"]:
            meta = json.loads((where / "export.json").read_text())
            points.append({"step": meta["step"], "minutes": meta["train_seconds"] / 60,
                           "cpu_minutes": meta["train_cpu_seconds"] / 60, "weights": str(where)})
        write_points(record, made_from, points)
    config = load_experiment(args.config, config_classes())
    family, path = config.backbone.family, config.backbone.path
    base = scores(family, path, None, Path(args.records) / "base" / f"{family}-{Path(path).name}", args)
    curve = []
    for point in points:
        print(f"{name}: scoring step {point['step']} ({point['cpu_minutes']:.1f} CPU min)")
        curve.append({"step": point["step"], "minutes": point["minutes"], "cpu_minutes": point["cpu_minutes"],
                      "gold": scores(family, path, point["weights"], records / "evals" / f"step-{point['step']:06d}", args)})
    result = {"config": args.config, "family": family, "path": path, "seed": args.seed, "minutes": args.minutes,
              "date": time.strftime("%Y-%m-%d"), "base": base, "curve": curve,
              "settings": {"per_task": args.per_task, "eval_seeds": args.eval_seeds, "eval_steps": args.eval_steps,
                           "guidance_scale": args.guidance_scale}}
    (records / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    best = curve[-1]["gold"]
    print(f"{name}: held-out {base['heldout']['overall']:.3f} -> {best['heldout']['overall']:.3f}, "
          f"train split {base['train']['overall']:.3f} -> {best['train']['overall']:.3f} in {curve[-1]['cpu_minutes']:.1f} CPU min")
    return result


# ------------------------------------------------------------------ probes


def text_probe(path: str, steps: int = 3000) -> dict[str, Any]:
    """Logistic regression from the frozen text encoder's last hidden state at a shape word to that
    shape's colour (colors and color_attr prompts): fit on the training split, scored on the held-out
    one. For SD3 the shapes model's two text encoders are the SD model's: the probe reads the first."""
    import torch
    from transformers import AutoTokenizer, CLIPTextModel

    from genalign.shapes.world import COLORS, SHAPES, split_prompts

    folder = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32).eval()
    colours = list(COLORS)

    def examples(split: str) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        features, labels, groups = [], [], []
        for meta in split_prompts(split):
            if meta["tag"] not in ("colors", "color_attr"):
                continue
            ids = tokenizer(meta["prompt"], padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
            with torch.no_grad():
                hidden = encoder(ids).last_hidden_state[0]
            words = tokenizer.convert_ids_to_tokens(ids[0].tolist())
            shapes = [i for i, w in enumerate(words) if w.replace("</w>", "") in SHAPES]
            for k, (i, item) in enumerate(zip(shapes, meta["include"])):
                features.append(hidden[i])
                labels.append(colours.index(item["color"]))
                groups.append("one_object" if meta["tag"] == "colors" else ("first_object", "second_object")[k])
        return torch.stack(features), torch.tensor(labels), groups

    x_train, y_train, _ = examples("train")
    x_test, y_test, groups = examples("heldout")
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    torch.manual_seed(0)
    probe = torch.nn.Linear(x_train.shape[1], len(colours))
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe((x_train - mean) / std), y_train).backward()
        optimizer.step()
    with torch.no_grad():
        train_acc = (probe((x_train - mean) / std).argmax(1) == y_train).float().mean().item()
        right = probe((x_test - mean) / std).argmax(1) == y_test
    by_group = {g: right[[i for i, h in enumerate(groups) if h == g]].float().mean().item() for g in sorted(set(groups))}
    return {"train_accuracy": train_acc, "heldout_accuracy": right.float().mean().item(), "chance": 1 / len(colours),
            "heldout_by_word": by_group, "train_words": len(y_train), "heldout_words": len(y_test)}


def supervised(family: str, path: str, data_split: str, finetune: str, steps: int, lr: float, out: Path,
               seed: int = 0, dataset_size: int = 4096) -> str:
    """Fine-tune the denoiser by the world's own denoising loss on exact renders of ``data_split``'s
    prompts (``finetune``: ``lora`` rank 8, as the fine-tuners, or ``full``); returns the folder of
    its weights (a LoRA file, or the whole model)."""
    import torch

    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone
    from genalign.shapes import build

    torch.manual_seed(seed)
    backbone = load_backbone(BackboneConfig(family=family, path=path, finetune=finetune, lora_rank=8, lora_alpha=8), "cpu")
    pipe = backbone.pipe
    images, captions = build.make_dataset(dataset_size, seed + 101, split=data_split)
    latents = build.encode_latents(pipe.vae, images)
    config = build.BuildConfig(seed=seed, batch_size=64, sd_steps=steps, flow_steps=steps, lr=lr, flow_lr=lr)
    log: dict[str, Any] = {}
    if family == "sd3":
        build.train_flow(latents, captions, pipe, config, log, transformer=pipe.transformer)
    else:
        pipe.text_encoder.requires_grad_(False)  # frozen, as the fine-tuners keep it
        build.train_sd(latents, captions, pipe.tokenizer, config, log, unet=pipe.unet, text_encoder=pipe.text_encoder)
    backbone.unwrapped_denoiser.eval()
    out.mkdir(parents=True, exist_ok=True)
    if finetune == "lora":
        backbone.save_lora(str(out))
    else:
        pipe.save_pretrained(out, safe_serialization=True)
        extra = Path(path) / "genalign.json"
        if extra.is_file():
            (out / "genalign.json").write_text(extra.read_text())
    (out / "supervised.json").write_text(json.dumps(log, indent=1) + "\n")
    return str(out)


PROBES = (("sft-heldout-lora", "heldout", "lora"), ("sft-heldout-full", "heldout", "full"),
          ("sft-train-lora", "train", "lora"))


def probes(args: argparse.Namespace) -> dict[str, Any]:
    records = Path(args.records) / "probes" / f"{args.family}-{Path(args.path).name}"
    records.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"family": args.family, "path": args.path, "date": time.strftime("%Y-%m-%d"),
                              "sft_steps": args.sft_steps}
    text = records / "text_probe.json"
    if not text.is_file():
        text.write_text(json.dumps(text_probe(args.path)) + "\n")
    result["text_probe"] = json.loads(text.read_text())
    print(f"text probe: colour of each shape word, held-out accuracy {result['text_probe']['heldout_accuracy']:.3f}")
    result["base"] = scores(args.family, args.path, None, Path(args.records) / "base" / f"{args.family}-{Path(args.path).name}", args)
    for name, split, finetune in PROBES:
        folder = records / name
        marker = folder / f"made-from-{fingerprint(args.sft_steps, args.sft_lr[finetune], args.path)[:12]}"
        weights_dir = Path(args.out) / "probes" / f"{args.family}-{Path(args.path).name}" / name
        if not marker.is_file():
            started = time.monotonic()
            supervised(args.family, args.path, split, finetune, args.sft_steps, args.sft_lr[finetune], weights_dir)
            for stale in folder.glob("*"):
                stale.unlink()
            folder.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"{(time.monotonic() - started) / 60:.1f} min\n")
        if finetune == "lora":
            gold = scores(args.family, args.path, str(weights_dir), folder, args)
        else:
            gold = scores(args.family, str(weights_dir), None, folder, args)
        result[name] = gold
        print(f"{name}: held-out {gold['heldout']['overall']:.3f}, train split {gold['train']['overall']:.3f}")
    (records / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


# ------------------------------------------------------------------ report


def report(args: argparse.Namespace) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from genalign.shapes.world import TASKS

    records, docs = Path(args.records), Path(args.docs)
    runs = [json.loads(p.read_text()) for p in sorted((records / "runs").glob("*/result.json"))]
    found = [json.loads(p.read_text()) for p in sorted((records / "probes").glob("*/result.json"))]
    (docs / "img").mkdir(parents=True, exist_ok=True)
    written, lines = [], [MARK_BEGIN, ""]
    if runs:
        fig, axes = plt.subplots(1, len(runs), figsize=(5.0 * len(runs), 3.8), squeeze=False)
        for ax, run in zip(axes[0], runs):
            xs = [0.0] + [c["cpu_minutes"] for c in run["curve"]]
            for split, style in (("heldout", "-o"), ("train", "--s")):
                ax.plot(xs, [run["base"][split]["overall"]] + [c["gold"][split]["overall"] for c in run["curve"]], style,
                        ms=3, label=f"{split} prompts")
            if run["family"] in TARGETS:
                ax.axhline(TARGETS[run["family"]], color="grey", linestyle=":", linewidth=1,
                           label=f"target, held-out ({TARGETS[run['family']]:.2f})")
            ax.set_title(f"{Path(run['config']).stem} on {Path(run['path']).name}", fontsize=9)
            ax.set_xlabel("training minutes (CPU)")
            ax.set_ylabel("gold (exact evaluator)")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(docs / "img" / "headline_runs.png", dpi=110)
        plt.close(fig)
        written.append(docs / "img" / "headline_runs.png")
        lines += ["| run | CPU minutes | held-out gold: base -> tuned | train-split gold: base -> tuned | held-out per task (tuned) |",
                  "|---|---|---|---|---|"]
        for run in runs:
            last = run["curve"][-1]["gold"]
            tasks = ", ".join(f"{t} {last['heldout'][t]:.2f}" for t in TASKS)
            lines.append(f"| `{run['config']}` on `{run['path']}` ({run['date']}) | {run['curve'][-1]['cpu_minutes']:.0f} | "
                         f"{run['base']['heldout']['overall']:.3f} -> {last['heldout']['overall']:.3f} | "
                         f"{run['base']['train']['overall']:.3f} -> {last['train']['overall']:.3f} | {tasks} |")
        lines.append("")
    for probe in found:
        t = probe["text_probe"]
        lines += [f"Probes on `{probe['path']}` ({probe['date']}; supervised fine-tuning {probe['sft_steps']} steps of 64 "
                  f"renders): the frozen text encoder's colour of each shape word is read by a linear probe at "
                  f"{t['heldout_accuracy']:.3f} on held-out prompts ({t['train_accuracy']:.3f} on training ones, "
                  f"chance {t['chance']:.3f}).", "",
                  "| model | held-out gold | train-split gold | " + " | ".join(f"held-out {x}" for x in TASKS) + " |",
                  "|---|---|---|" + "---|" * len(TASKS)]
        for name in ("base", *(n for n, _, _ in PROBES)):
            g = probe[name]
            lines.append(f"| {name} | {g['heldout']['overall']:.3f} | {g['train']['overall']:.3f} | "
                         + " | ".join(f"{g['heldout'][x]:.2f}" for x in TASKS) + " |")
        lines.append("")
    for path in written:
        lines.append(f"![{path.stem}]({path.relative_to(docs).as_posix()})")
    lines += ["", MARK_END]
    target = docs / "results.md"
    write_block(target, "\n".join(lines), MARK_BEGIN, MARK_END)
    return [target, *written]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", "probes", "report"):
        q = sub.add_parser(name)
        q.add_argument("--records", default="bench/headline")
        q.add_argument("--out", default="runs/headline")
        q.add_argument("--per-task", type=int, default=100)
        q.add_argument("--eval-seeds", type=int, nargs="+", default=[1])
        q.add_argument("--eval-steps", type=int, default=25)
        q.add_argument("--guidance-scale", type=float, default=2.0)
        q.add_argument("--device", default="cpu")
        if name == "run":
            q.add_argument("config")
            q.add_argument("--minutes", type=float, default=60.0)
            q.add_argument("--export-every", type=int, default=250)
            q.add_argument("--seed", type=int, default=0)
            q.add_argument("--redo", action="store_true", help="replace a record made from other settings")
        if name == "probes":
            q.add_argument("--family", default="sd3", choices=("sd", "sd3"))
            q.add_argument("--path", default="models/shapes/sd3")
            q.add_argument("--sft-steps", type=int, default=400)
            q.add_argument("--sft-lr-lora", type=float, default=1e-3)
            q.add_argument("--sft-lr-full", type=float, default=2e-4)
        if name == "report":
            q.add_argument("--docs", default="docs")
    args = p.parse_args(argv)
    if args.command == "run":
        long_run(args)
    elif args.command == "probes":
        args.sft_lr = {"lora": args.sft_lr_lora, "full": args.sft_lr_full}
        probes(args)
    else:
        print("wrote", ", ".join(str(w) for w in report(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
