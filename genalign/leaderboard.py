"""The shapes leaderboard: which method works, by how much, at what cost.

Every given shapes config (default: each ``configs/shapes/*.yaml``) is trained under several
training seeds to the largest reward-query budget, exporting its weights at every budget's step
(``run.export_every``: with a constant learning rate each export is the run stopped there, so one
run gives the whole learning curve). Each budget's export (every export of a run trained on a proxy,
whose curve between budgets shows over-optimisation) is scored by the exact evaluator on held-out
prompts at several evaluation seeds and paired, image by image, with the base model's verdicts on
the same prompts and seeds (``genalign.shapes.scoring.paired_gain``). A run's gain at a budget is
the mean over evaluation seeds; a method's gain is the mean over training seeds, and its standard
error pools the training noise (the seeds' spread) with the evaluation's (the paired per-image
spread of the seeds' mean difference: every run shares the base's images, whose noise the seeds'
spread cannot show; ``genalign.shapes.scoring.pooled_paired_gain``): the noise of another draw of
the noise seeds, given each task's held-out prompt pool (at 100 a task the pools are cycled
through whole). The CLIP proxy's gain, a mean score without per-image values, has the seeds'
spread alone for its standard error. Budgets are equal in reward
queries (images the training reward scored, from the config's batch shape) and, separately, in
training minutes (the last export within the minutes; a run with none within them counts as its base,
gain 0). Minutes are CPU minutes: the training process's CPU time over all its threads, exports
left out (``export.json``'s ``train_cpu_seconds``), the same whatever else the machine runs; the
wall-clock minutes are kept beside them. Each method is also compared with a reference on its
backbone (``--references``, default Flow-GRPO on the flow model and DDPO on the SD one): the
difference of the two gains paired image by image, and seed by seed where both ran the same training
seeds (a seed's runs share its initialisation, prompts and first rollouts). ``--trl`` adds TRL
0.23.1's DDPOTrainer at configs/shapes/ddpo.yaml's settings, the outside reference (one run a seed,
its LoRA saved at each budget's epoch).

Two folders: ``out`` (default ``runs/leaderboard``) holds the runs (weights, metrics), and
``records`` (default ``bench/leaderboard``, kept in git) the small files the numbers come from: each
finished run's ``points.json`` (its exports' steps, reward queries and minutes) and each evaluation
(the base's per family and evaluation seed, each export's) as a JSON file with its per-image
verdicts, and the report's ``leaderboard.json`` (a run without ``--docs`` leaves its own, and its
plots, in ``out``). A run with its ``points.json`` is finished and never trained again; an unfinished
one resumes from its last checkpoint (kept at every export; its minutes add up its launches); an
evaluation on record is never repeated. Stop it any time and run it again, on this machine or on a
fresh checkout: it goes on where it stopped. A record is tied to the settings it was made from (the
config's YAML as parsed, its comments aside, the seed, budgets and export interval): one made from
others stops the run before anything starts, unless ``--redo`` replaces it.

    .venv/bin/python bench/leaderboard.py                       # every shapes config, 3 seeds, 800 and 3,200 queries, 4 and 8 min
    .venv/bin/python bench/leaderboard.py --configs configs/shapes/flow_grpo.yaml --seeds 0 --budgets 80 160 \
        --per-task 5 --records runs/try/records --out runs/try   # a quick try, beside the records
    # a 2-core machine: two shards at one thread each (1.3x the runs an hour of one process at two), then the report
    .venv/bin/python bench/leaderboard.py --shard 0/2 --threads 1 & .venv/bin/python bench/leaderboard.py --shard 1/2 --threads 1
    .venv/bin/python bench/leaderboard.py --threads 1 --trl --docs docs --readme README.md   # the report, TRL's DDPO too
    .venv/bin/python bench/leaderboard.py --recorded      # meanwhile: the table of what is on record
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from genalign.shapes.world import TASKS

MARK_BEGIN = "<!-- leaderboard: begin (written by bench/leaderboard.py; edits here are overwritten) -->"
MARK_END = "<!-- leaderboard: end -->"
PROXY_REWARDS = ("clip", "ensemble")  # trained on a proxy: the CLIP proxy is scored beside the gold


@dataclass
class Settings:
    configs: list[str]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    budgets: list[int] = field(default_factory=lambda: [800, 3200])
    minutes: list[float] = field(default_factory=lambda: [4.0, 8.0])
    per_task: int = 100
    eval_seeds: list[int] = field(default_factory=lambda: [1, 2])
    eval_steps: int = 25
    guidance_scale: float = 2.0
    split: str = "heldout"
    clip: str = "models/shapes/clip"
    trl: bool = False
    out: str = "runs/leaderboard"
    records: str = "bench/leaderboard"
    device: str = "cpu"
    recorded: bool = False  # report what is on record; train and evaluate nothing, delete nothing
    redo: bool = False  # replace records made from other settings (otherwise: refuse, naming them)
    references: list[str] = field(default_factory=lambda: ["flow_grpo", "ddpo"])  # compared with, per backbone


# ------------------------------------------------------------------ pure pieces


def queries_per_step(config: dict[str, Any]) -> float:
    """Images the training reward scores per optimizer step, from a config's batch shape (a YAML dict)."""
    method, run = config["method"], config["run"]
    prompts = run.get("batch_size", 1) * run.get("grad_accum", 1)
    samples = method.get("samples_per_prompt", 1)
    name = method["name"]
    if name in ("ddpo", "flow_grpo"):  # one rollout serves minibatches x inner_epochs steps
        return prompts * samples / (method.get("minibatches", 1) * method.get("inner_epochs", 1))
    if name in ("diffusion_dpo", "inversion_dpo"):
        return prompts * samples / method.get("pairs_reuse", 1)
    if name == "adjoint_matching":
        return prompts  # one reward gradient per sample
    return prompts * samples


def budget_steps(per_step: float, budgets: Sequence[int]) -> dict[int, int]:
    """The optimizer steps that make each budget's reward queries (rounded up to whole steps)."""
    return {q: max(1, math.ceil(q / per_step - 1e-9)) for q in budgets}


def export_interval(steps: Sequence[int]) -> int:
    """The export interval that lands on every budget's step: their greatest common divisor."""
    interval = 0
    for s in steps:
        interval = math.gcd(interval, s)
    return interval


def pooled(per_seed: Sequence[float]) -> tuple[float, float]:
    """Mean over training seeds and its standard error (sample std / sqrt(n); 0 with one seed)."""
    n = len(per_seed)
    mean = sum(per_seed) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((g - mean) ** 2 for g in per_seed) / (n - 1) / n)


def _errors(pooled_gain: dict[str, Any]) -> dict[str, Any]:
    """A budget's cell: the pooled gain, its standard error and the two parts of it, and each seed's gain."""
    return {key: pooled_gain[key] for key in ("gain", "standard_error", "seeds_error", "images_error", "per_seed")}


def within_minutes(points: Sequence[dict[str, Any]], minutes: float) -> dict[str, Any] | None:
    """The last export of a run whose training time (CPU minutes) is within ``minutes`` (None: none is)."""
    inside = [p for p in points if p["minutes"] <= minutes + 1e-9]
    return max(inside, key=lambda p: p["step"]) if inside else None


# ------------------------------------------------------------------ training and evaluation (cached)


def scored_points(points: Sequence[dict[str, Any]], budget_steps: Any, minutes: Sequence[float]) -> list[dict[str, Any]]:
    """The exports a run is scored at: each reward-query budget's step and the last export within
    each minute budget."""
    keep = set(budget_steps)
    for m in minutes:
        chosen = within_minutes(points, m)
        if chosen is not None:
            keep.add(chosen["step"])
    return [p for p in points if p["step"] in keep]


def orphaned(points: Sequence[dict[str, Any]], evals: Path, s: Settings) -> bool:
    """Whether a recorded run cannot be scored: a point whose weights are gone (a fresh checkout) and
    whose evaluations are not all in ``evals``."""
    return any(not Path(p["weights"]).is_dir() and not evaluated([p], evals, s) for p in points)


def on_record(record: Path, made_from: str, base: Path, s: Settings) -> list[dict[str, Any]] | None:
    """A run's recorded points if its record was made from ``made_from`` and the base's evaluations
    are on record; None otherwise. Reads only: what ``--recorded`` reports from."""
    if not record.is_file() or not all((base / _eval_name(s, e)).is_file() for e in s.eval_seeds):
        return None
    data = json.loads(record.read_text())
    return data["points"] if data.get("fingerprint") == made_from else None


def evaluated(points: Sequence[dict[str, Any]], evals: Path, s: Settings) -> bool:
    """Whether every evaluation of these points is in ``evals``."""
    return all((evals / f"step-{p['step']:06d}-{_eval_name(s, e)}").is_file() for p in points for e in s.eval_seeds)


def fingerprint(*parts: Any) -> str:
    """What a record was made from (a config's settings, the steps, the seed ...): a changed one is redone."""
    import hashlib

    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:16]


def read_points(record: Path, made_from: str) -> list[dict[str, Any]] | None:
    """A run's recorded points, or None (and its stale evaluations removed) when there is no record
    or it was made from something else (an edited config, other budgets)."""
    if record.is_file():
        data = json.loads(record.read_text())
        if data.get("fingerprint") == made_from:
            return data["points"]
    shutil.rmtree(record.parent / "evals", ignore_errors=True)
    return None


def made_elsewhere(record: Path, made_from: str) -> bool:
    """Whether ``record`` is there and was made from something other than ``made_from`` (what
    ``read_points`` would throw away)."""
    return record.is_file() and json.loads(record.read_text()).get("fingerprint") != made_from


def write_points(record: Path, made_from: str, points: list[dict[str, Any]]) -> None:
    _write(record, json.dumps({"fingerprint": made_from, "points": points}, indent=1) + "\n")


def _write(path: Path, text: str) -> None:
    """Whole or not at all (shards side by side read each other's base evaluations)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    partial.write_text(text)
    partial.replace(path)


def run_overrides(seed: int, steps: int, every: int, folder: Path) -> dict[str, Any]:
    """What the leaderboard sets in every config it trains, whatever the config says. compile and
    merge_lora: how every record so far was made (eager, the LoRA unmerged); a speed default changed
    since would mix rounding-level differences and other minutes into one table: change them with new
    records only."""
    return {"run.seed": seed, "run.steps": steps, "run.output_dir": folder, "run.export_every": every,
            "run.checkpoint_every": every, "run.keep_checkpoints": 1, "run.sample_every": 0, "run.tracker": "none",
            "backbone.compile": "none", "backbone.merge_lora": "false"}


def config_settings(config_path: str, overridden: Iterable[str]) -> str:
    """A config's settings as canonical JSON: its YAML as parsed (so that its comments and layout can
    change), less the ``section.key`` settings a run ``overridden`` sets itself: what a record of a
    run of it was made from."""
    from genalign.core.config import read_yaml

    settings = read_yaml(config_path)
    for key in overridden:
        section, name = key.split(".", 1)
        if isinstance(settings.get(section), dict):
            settings[section].pop(name, None)
    return json.dumps(settings, sort_keys=True, default=str)


def run_fingerprint(config_path: str, seed: int, steps: int, every: int) -> str:
    """What a run's record was made from: its config's settings (less what ``run_overrides`` sets),
    seed, steps and export interval."""
    return fingerprint(config_settings(config_path, run_overrides(seed, steps, every, Path())), seed, steps, every)


def train_run(config_path: str, seed: int, steps: int, every: int, folder: Path, record: Path,
              per_step: float) -> bool:
    """Train ``config_path`` at ``run.seed = seed`` for ``steps`` steps in ``folder``, exporting every
    ``every``, and write its points (step, reward queries, minutes, weights folder) to ``record``,
    unless ``record`` already holds them for these settings, seed, steps and interval. A run stopped
    part way (its folder made from the same, with a checkpoint: one is kept at every export) resumes
    from its last checkpoint, exactly, its minutes the sum of its launches'. Returns whether it trained."""
    made_from = run_fingerprint(config_path, seed, steps, every)
    if read_points(record, made_from) is not None:
        return False
    from genalign.core.experiment import load_experiment
    from genalign.finetuners import config_classes
    from genalign.launch import run_experiment

    stamp = folder / "leaderboard-run.json"  # what the folder's checkpoints were made from
    resumable = (stamp.is_file() and json.loads(stamp.read_text()).get("fingerprint") == made_from
                 and any((folder / "checkpoints").glob("step-*/COMPLETE")))
    if not resumable:
        shutil.rmtree(folder, ignore_errors=True)
        _write(stamp, json.dumps({"fingerprint": made_from}) + "\n")
    overrides = [f"{key}={value}" for key, value in run_overrides(seed, steps, every, folder).items()]
    run_experiment(load_experiment(config_path, config_classes(), overrides), resume="latest" if resumable else None)
    points = []
    for where in sorted((folder / "exports").glob("step-*")) + [folder / "final"]:
        meta = json.loads((where / "export.json").read_text())
        points.append({"step": meta["step"], "queries": meta["step"] * per_step,
                       "minutes": meta["train_cpu_seconds"] / 60, "wall_minutes": meta["train_seconds"] / 60,
                       "weights": str(where)})
    write_points(record, made_from, points)
    return True


def resolved(config_path: str) -> dict[str, Any]:
    """A config as the trainer reads it, every default filled in (for the batch shape)."""
    from dataclasses import asdict as fields_of

    from genalign.core.experiment import load_experiment
    from genalign.finetuners import config_classes

    config = load_experiment(config_path, config_classes())
    return {"method": {"name": config.method_name, **fields_of(config.method)}, "run": fields_of(config.run),
            "backbone": fields_of(config.backbone), "reward": [fields_of(r) for r in config.reward]}


_BACKBONES: dict[tuple[str, str, str], Any] = {}  # one loaded base a model: LoRAs are loaded and unloaded


def evaluate(family: str, path: str, weights: str | None, eval_seed: int, s: Settings, cache: Path,
             with_proxy: bool) -> dict[str, Any]:
    """The exact evaluator's per-image verdicts (and the CLIP proxy's score when asked) of the
    backbone at ``path`` with ``weights`` (None: the base), cached in ``cache``."""
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if not with_proxy or "proxy_reward" in cached:
            return cached
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone
    from genalign.shapes.report import evaluate_models

    lora = None
    if weights is not None:
        lora = str(Path(weights) / "pytorch_lora_weights.safetensors")
        if not Path(lora).is_file():
            raise FileNotFoundError(f"{lora} is not there to score (a LoRA run whose weights are gone: delete its "
                                    f"points.json under the records to train it again)")
    key = (family, path, s.device)
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(BackboneConfig(family=family, path=path, finetune="none", merge_lora=False),
                                        s.device)
    backbone = _BACKBONES[key]
    try:
        result, _ = evaluate_models(backbone, lora, False, s.per_task, s.eval_steps, s.guidance_scale, eval_seed,
                                    s.clip if with_proxy else None, split=s.split)
    finally:
        if lora is not None:
            backbone.unload_lora()
    kept = {"gold": result["gold"], "verdicts": result["verdicts"], "tags": result["tags"],
            "eval_seed": eval_seed, "per_task": s.per_task, "steps": s.eval_steps, "guidance_scale": s.guidance_scale}
    if with_proxy:
        kept["proxy_reward"] = result["proxy_reward"]["overall"]
    _write(cache, json.dumps(kept) + "\n")
    return kept


def _eval_name(s: Settings, eval_seed: int) -> str:
    split = "" if s.split == "heldout" else f"-{s.split}"
    device = "" if s.device == "cpu" else f"-{s.device.replace(':', '')}"  # numerics differ by device
    return f"eval-seed{eval_seed}-p{s.per_task}-n{s.eval_steps}-g{s.guidance_scale:g}{split}{device}.json"


class StaleRecords(ValueError):
    """Run records made from other settings than the ones asked for (``--redo`` replaces them)."""


def run_shape(config_path: str, s: Settings) -> tuple[dict[str, Any], float, dict[int, int], int]:
    """A config's resolved settings, reward queries a step, each budget's step and the export interval."""
    config = resolved(config_path)
    per_step = queries_per_step(config)
    steps = budget_steps(per_step, s.budgets)
    return config, per_step, steps, export_interval(list(steps.values()))


def made_otherwise(s: Settings, shapes: dict[str, tuple[Any, float, dict[int, int], int]]) -> list[str]:
    """The run records in ``s.records`` that these settings would replace: made from other settings
    (an edited config, other budgets or export interval), for the same config name and seed.
    ``shapes``: each config's ``run_shape``."""
    records = Path(s.records)
    found = []
    for config_path, (_, _, steps, every) in shapes.items():
        for seed in s.seeds:
            record = records / "runs" / Path(config_path).stem / f"seed{seed}" / "points.json"
            if made_elsewhere(record, run_fingerprint(config_path, seed, max(steps.values()), every)):
                found.append(str(record.parent))
    for seed in s.seeds if s.trl else []:
        record = records / "runs" / TRL_NAME / f"seed{seed}" / "points.json"
        if made_elsewhere(record, trl_fingerprint(seed, s)):
            found.append(str(record.parent))
    return found


def measure(s: Settings, log: Any = print) -> dict[str, Any]:
    """Train and evaluate what is missing; return every number the report needs. Records made from
    other settings are replaced only with ``s.redo``: otherwise nothing starts (StaleRecords names them)."""
    out, records = Path(s.out), Path(s.records)
    methods: dict[str, Any] = {}
    differences: dict[str, Any] = {}  # for comparisons
    names = [Path(c).stem for c in s.configs]
    if len(set(names)) < len(names):
        raise ValueError(f"two configs of the same name among {s.configs}: their records would mix")
    shapes = {config_path: run_shape(config_path, s) for config_path in s.configs}
    stale = [] if s.recorded or s.redo else made_otherwise(s, shapes)
    if stale:
        raise StaleRecords(f"{len(stale)} run record(s) in {records} were made from other settings (an edited "
                           f"config's settings, other budgets): {', '.join(stale)}. Replace them (their evaluations "
                           "too) with --redo, or keep them and write elsewhere with --records")
    for config_path, name in zip(s.configs, names):
        config, per_step, steps, every = shapes[config_path]
        family, path = config["backbone"]["family"], config["backbone"]["path"]
        reward = "+".join(r["name"] for r in config["reward"]) or "-"
        with_proxy = reward in PROXY_REWARDS
        runs: dict[int, list[dict[str, Any]]] = {}
        for seed in s.seeds:  # each run is scored as soon as it is trained: its records are whole when committed
            record = records / "runs" / name / f"seed{seed}" / "points.json"
            folder = out / "runs" / name / f"seed{seed}"
            if s.recorded:
                points = on_record(record, run_fingerprint(config_path, seed, max(steps.values()), every),
                                   base_folder(records, family, path), s)
                if points is not None and not with_proxy:
                    points = scored_points(points, steps.values(), s.minutes)
                if points is None or not evaluated(points, record.parent / "evals", s):
                    log(f"{name} seed {seed}: not on record (or not every evaluation is): left out")
                    continue
                base = score_runs(name, family, path, with_proxy, {seed: points}, records, s, log)
                runs[seed] = points
                continue
            for attempt in range(2):
                started = time.monotonic()
                if train_run(config_path, seed, max(steps.values()), every, folder, record, per_step):
                    log(f"{name} seed {seed}: trained {max(steps.values())} steps in {(time.monotonic() - started) / 60:.1f} min")
                points = json.loads(record.read_text())["points"]
                if not with_proxy:  # only a proxy-trained run's curve between budgets is read (over-optimisation)
                    points = scored_points(points, steps.values(), s.minutes)
                if not attempt and orphaned(points, record.parent / "evals", s):
                    log(f"{name} seed {seed}: its weights are gone and not every evaluation is on record: trained again")
                    record.unlink()
                    continue
                break
            base = score_runs(name, family, path, with_proxy, {seed: points}, records, s, log)
            runs[seed] = points
        if not runs:
            log(f"{name}: no run on record: left out of the report")
            continue
        methods[name], differences[name] = summarise(name, config_path, family, reward, per_step, steps, runs, base, s)
        methods[name]["model"] = differences[name]["model"] = path
        differences[name]["draws"] = "genalign"  # whose seeds: runs of one seed share draws only within one code
    if s.trl:
        steps = trl_steps(s)
        runs = {}
        for seed in s.seeds:  # scored like genalign's gold-trained runs: the budgets' epochs and the minutes'
            if s.recorded:
                points = on_record(records / "runs" / TRL_NAME / f"seed{seed}" / "points.json", trl_fingerprint(seed, s),
                                   base_folder(records, "sd", TRL_MODEL), s)
                points = None if points is None else scored_points(points, steps.values(), s.minutes)
                if points is None or not evaluated(points, records / "runs" / TRL_NAME / f"seed{seed}" / "evals", s):
                    continue
            else:
                points = scored_points(trl_run(seed, s, out, records, log), steps.values(), s.minutes)
            runs[seed] = points
        if runs:
            base = score_runs(TRL_NAME, "sd", TRL_MODEL, False, runs, records, s, log)
            described = "bench/trl_ddpo.py: TRL 0.23.1 DDPOTrainer, configs/shapes/ddpo.yaml settings"
            methods[TRL_NAME], differences[TRL_NAME] = summarise(TRL_NAME, described, "sd", "shapes_gold",
                                                                 TRL_QUERIES_PER_EPOCH, steps, runs, base, s)
            methods[TRL_NAME]["model"] = differences[TRL_NAME]["model"] = TRL_MODEL
            differences[TRL_NAME]["draws"] = "trl"
    return {"settings": asdict(s), "date": time.strftime("%Y-%m-%d"), "machine": machine(), "methods": methods,
            "comparisons": comparisons(differences, s.references)}


def comparisons(methods: dict[str, Any], references: Sequence[str]) -> list[dict[str, Any]]:
    """``methods``: each method's per-image differences from its base (summarise's second value, with
    its ``model``). Each method against the reference method on its backbone (the first of ``references`` on the
    same model), at every budget both have: the difference of their gains, paired image by image
    (the base cancels). Runs of the same training seed share its draws (initialisation, prompts,
    first rollouts) when one code drew them (each method's ``draws``: "genalign", "trl"), so where
    both methods ran the same seeds of one code the difference is paired by seed too
    (``pooled_paired_gain`` of the per-seed, per-image differences); otherwise the seeds are
    independent (``pooled_difference``: TRL's seed 0 shares nothing with genalign's)."""
    from genalign.shapes.scoring import pooled_difference, pooled_paired_gain

    out = []
    for name, m in methods.items():
        reference = next((r for r in references if r in methods and methods[r]["model"] == m["model"]), None)
        if reference is None or reference == name:
            continue
        ref = methods[reference]
        if ref["tags"] != m["tags"]:
            raise ValueError(f"{name} and {reference} were scored on other images: they cannot be paired")
        row: dict[str, Any] = {"method": name, "reference": reference}
        for kind in ("budgets", "minutes"):
            row[kind] = {}
            for key, a in m[kind].items():
                b = ref[kind].get(key)
                if b is None:
                    continue
                if sorted(a) == sorted(b) and m.get("draws") == ref.get("draws"):
                    both = pooled_paired_gain([[x - y for x, y in zip(a[seed], b[seed])] for seed in a], m["tags"])
                    d = {"difference": both["gain"], "standard_error": both["standard_error"], "paired_seeds": True}
                else:
                    one = pooled_difference(list(a.values()), list(b.values()), m["tags"])
                    d = {"difference": one["difference"], "standard_error": one["standard_error"], "paired_seeds": False}
                row[kind][key] = {**d, "seeds": [len(a), len(b)]}
        out.append(row)
    return out


def base_folder(records: Path, family: str, path: str) -> Path:
    """Where the base model's evaluations are kept (shared by every method on that backbone)."""
    return records / "base" / f"{family}-{Path(path).name}-{fingerprint(path)[:8]}"


def score_runs(name: str, family: str, path: str, with_proxy: bool, runs: dict[int, list[dict[str, Any]]],
               records: Path, s: Settings, log: Any) -> dict[int, dict[str, Any]]:
    """Each run point's paired gain over the base (per evaluation seed, per task; the proxy's gain
    when asked), in place; returns the base's evaluations."""
    from genalign.shapes.scoring import paired_gain

    folder = base_folder(records, family, path)
    base = {e: evaluate(family, path, None, e, s, folder / _eval_name(s, e), with_proxy) for e in s.eval_seeds}
    for seed, points in runs.items():
        for point in points:
            point["gains"], point["per_task"], point["proxy_gain"], point["differences"] = {}, {}, {}, []
            for e in s.eval_seeds:
                cache = records / "runs" / name / f"seed{seed}" / "evals" / f"step-{point['step']:06d}-{_eval_name(s, e)}"
                tuned = evaluate(family, path, point["weights"], e, s, cache, with_proxy)
                if tuned["tags"] != base[e]["tags"]:
                    raise ValueError(f"{point['weights']}: evaluated on other prompts than the base")
                gain = paired_gain(base[e]["verdicts"], tuned["verdicts"], tuned["tags"])
                point["gains"][e] = gain["gain"]
                point["differences"] += [float(t) - float(b) for b, t in zip(base[e]["verdicts"], tuned["verdicts"])]
                point["per_task"][e] = gain["per_task"]
                if with_proxy:
                    point["proxy_gain"][e] = tuned["proxy_reward"] - base[e]["proxy_reward"]
        last = points[-1]
        log(f"{name} seed {seed}: gain {sum(last['gains'].values()) / len(last['gains']):+.3f} at "
            f"{last['queries']:.0f} queries")
    return base


TRL_NAME, TRL_MODEL, TRL_QUERIES_PER_EPOCH = "trl_ddpo", "models/shapes/sd", 16


def trl_steps(s: Settings) -> dict[int, int]:
    """Each reward-query budget's TRL epoch."""
    return {q: math.ceil(q / TRL_QUERIES_PER_EPOCH) for q in s.budgets}


def trl_epochs(s: Settings) -> list[int]:
    """The epochs a TRL run saves its LoRA at: every ``export_interval`` of the budgets' epochs, as
    genalign's runs export (the minute budgets read them)."""
    budgets = sorted(set(trl_steps(s).values()))
    every = export_interval(budgets)
    return list(range(every, budgets[-1] + 1, every))


def trl_fingerprint(seed: int, s: Settings) -> str:
    return fingerprint("trl_ddpo", seed, trl_epochs(s))


def trl_run(seed: int, s: Settings, out: Path, records: Path, log: Any) -> list[dict[str, Any]]:
    """TRL's DDPOTrainer (bench/trl_ddpo.py, its own environment) at configs/shapes/ddpo.yaml's settings,
    one run to the largest budget's epoch, its LoRA saved at every ``trl_epochs`` (the run stopped there:
    a constant learning rate, and the epochs before it are the same whatever the run's length): the
    points of a seed."""
    import subprocess
    import sys

    record = records / "runs" / TRL_NAME / f"seed{seed}" / "points.json"
    all_epochs = trl_epochs(s)
    made_from = trl_fingerprint(seed, s)
    known = read_points(record, made_from)
    if known is not None:
        return known
    folder = out / "runs" / "trl_ddpo" / f"seed{seed}"
    shutil.rmtree(folder, ignore_errors=True)
    subprocess.run([sys.executable, "bench/trl_ddpo.py", "train", "--epochs", str(all_epochs[-1]), "--seed", str(seed),
                    "--train-out", str(folder), "--save-at", *[str(e) for e in all_epochs[:-1]]], check=True)
    trained = {e["epoch"]: e for e in json.loads((folder / "epochs.json").read_text())}
    if all_epochs[-1] not in trained:
        raise RuntimeError(f"TRL's run in {folder} stopped before epoch {all_epochs[-1]}: see its output above")
    points = []
    for epochs in all_epochs:
        where = folder / ("final" if epochs == all_epochs[-1] else f"epoch-{epochs:06d}")
        points.append({"step": epochs, "queries": trained[epochs]["queries"],
                       "minutes": trained[epochs]["cpu_seconds"] / 60, "wall_minutes": trained[epochs]["seconds"] / 60,
                       "weights": str(where)})
    log(f"{TRL_NAME} seed {seed}: {all_epochs[-1]} epochs in {points[-1]['minutes']:.1f} min")
    write_points(record, made_from, points)
    return points


def summarise(name: str, config_path: str, family: str, reward: str, per_step: float, steps: dict[int, int],
              runs: dict[int, list[dict[str, Any]]], base: dict[int, dict[str, Any]],
              s: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """Pool a method's runs: per budget (queries and minutes) and per export step (the curve). Also
    returns what comparisons pair: each budget's per-seed, per-image differences and the images' tags."""
    from genalign.shapes.scoring import pooled_paired_gain

    def mean(values: Any) -> float:
        values = list(values)
        return sum(values) / len(values)

    tags = [tag for e in s.eval_seeds for tag in base[e]["tags"]]  # every point's differences, image by image

    def rows(points: Sequence[dict[str, Any] | None]) -> list[list[float]]:
        """These runs' points' per-image differences (one a seed; None: the base, no difference)."""
        return [p["differences"] if p is not None else [0.0] * len(tags) for p in points]

    def pool(points: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        """The gain of these runs' points with its standard error."""
        return pooled_paired_gain(rows(points), tags)

    inputs: dict[str, Any] = {"budgets": {}, "minutes": {}, "tags": tags}  # for comparisons, by seed

    by_step: dict[int, list[dict[str, Any]]] = {}
    for points in runs.values():
        for point in points:
            by_step.setdefault(point["step"], []).append(point)
    curve = []
    for step in sorted(by_step):
        points = by_step[step]
        pooled_gain = pool(points)
        row = {"step": step, "queries": step * per_step, "minutes": mean(p["minutes"] for p in points),
               "gain": pooled_gain["gain"], "standard_error": pooled_gain["standard_error"], "seeds": len(points)}
        if points[0]["proxy_gain"]:
            row["proxy_gain"], row["proxy_standard_error"] = pooled([mean(p["proxy_gain"].values()) for p in points])
        curve.append(row)
    budgets = {}
    base_gold = mean(b["gold"]["overall"] for b in base.values())
    for q, step in steps.items():
        points = by_step.get(step, [])
        if not points:
            print(f"warning: {name} has no export at step {step} ({q} reward queries): left out of the table")
            continue
        pooled_gain = pool(points)
        inputs["budgets"][str(q)] = {seed: p["differences"] for seed in runs for p in runs[seed] if p["step"] == step}
        per_task = {t: mean(mean(p["per_task"][e].get(t, 0.0) for e in p["per_task"]) for p in points) for t in TASKS}
        budgets[str(q)] = {"step": step, **_errors(pooled_gain),
                           "minutes": mean(p["minutes"] for p in points), "base_gold": base_gold,
                           "gold": base_gold + pooled_gain["gain"], "per_task": per_task}
    by_minutes = {}
    for m in s.minutes:
        chosen = [within_minutes(points, m) for points in runs.values()]
        if all(c is None for c in chosen):  # no run exported within m minutes: a blank cell, not a gain of 0
            continue
        by_minutes[f"{m:g}"] = {**_errors(pool(chosen)),
                                "queries": mean(p["queries"] if p is not None else 0.0 for p in chosen)}
        inputs["minutes"][f"{m:g}"] = dict(zip(runs, rows(chosen)))
    return {"config": config_path, "family": family, "reward": reward, "queries_per_step": per_step,
            "budgets": budgets, "minutes": by_minutes, "curve": curve,
            "runs": {str(seed): [{k: v for k, v in p.items() if k not in ("weights", "differences")} for p in points]
                     for seed, points in runs.items()}}, inputs


def machine() -> str:
    import torch

    threads = torch.get_num_threads()
    return f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} at {threads} thread{'s' * (threads != 1)}"


# ------------------------------------------------------------------ the report


def table(results: dict[str, Any]) -> list[str]:
    """The markdown table: a row per method, a column per budget (gain, standard error, seeds)."""
    s = results["settings"]
    budgets = [str(q) for q in s["budgets"]]
    minutes = [f"{m:g}" for m in s["minutes"]]
    head = ["method (config)", "backbone", "training reward", *(f"gain at {int(q):,} queries" for q in budgets),
            *(f"gain in {m} min" for m in minutes), "CPU min a run (largest budget)", "3 SE at the largest budget",
            "CLIP proxy's gain (largest budget)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in results["methods"].items():
        cells = [f"`{name}`", m["family"], m["reward"]]
        for q in budgets:
            b = m["budgets"].get(q)
            cells.append(_cell(b["gain"], b["standard_error"], len(b["per_seed"])) if b else "-")
        for key in minutes:
            b = m["minutes"].get(key)
            cells.append(_cell(b["gain"], b["standard_error"], len(b["per_seed"])) if b else "-")
        last = m["budgets"].get(budgets[-1]) if budgets else None
        cells.append(f"{last['minutes']:.1f}" if last else "-")
        cells.append("-" if not last else "yes" if last["standard_error"] > 0 and len(last["per_seed"]) >= 3
                     and last["gain"] >= 3 * last["standard_error"] else "no")
        # a proxy-trained method: how far it moved what it was trained on, beside the gold it gained; the
        # proxy's error is the seeds' spread alone, so one seed has none to show
        row = next((r for r in m.get("curve", []) if last and r["step"] == last["step"] and "proxy_gain" in r), None)
        if row is None:
            cells.append("-")
        else:
            error = f"{row['proxy_standard_error']:.2f}" if row["seeds"] > 1 else "1 seed"
            cells.append(f"{row['proxy_gain']:+.2f} ({error})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def comparison_table(results: dict[str, Any]) -> list[str]:
    """The markdown table of each method against its backbone's reference (none: no lines)."""
    rows = results.get("comparisons") or []
    if not rows:
        return []
    s = results["settings"]
    budgets, minutes = [str(q) for q in s["budgets"]], [f"{m:g}" for m in s["minutes"]]
    head = ["method", "against", *(f"difference at {int(q):,} queries" for q in budgets),
            *(f"difference in {m} min" for m in minutes)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['method']}`", f"`{row['reference']}`"]
        for kind, keys in (("budgets", budgets), ("minutes", minutes)):
            for key in keys:
                d = row[kind].get(key)
                if d is None:
                    cells.append("-")
                    continue
                seeds = f"{d['seeds'][0]} seeds, paired" if d["paired_seeds"] else f"{d['seeds'][0]} v {d['seeds'][1]} seeds"
                cells.append(_cell(d["difference"], d["standard_error"], seeds))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


COMPARED = ("Each method against the reference on its backbone: the difference of the two gains, paired image by "
            "image (the base's images cancel) and, where both ran the same training seeds in one code, seed by seed "
            "(runs of one seed share its initialisation, prompts and first rollouts; TRL's share nothing with "
            "genalign's); its standard error pools the seeds' spread with the evaluation's:")


def _cell(gain: float, error: float, seeds: int | str) -> str:
    """``+g (se, k SE; n seeds)``; ``seeds`` a count, or the words for it."""
    sigmas = f", {gain / error:.1f} SE" if error > 0 else ""
    words = seeds if isinstance(seeds, str) else f"{seeds} seed{'s' * (seeds != 1)}"
    return f"{gain:+.3f} ({error:.3f}{sigmas}; {words})"


def plot(results: dict[str, Any], folder: Path) -> list[Path]:
    """PNG plots: gain against reward queries and against minutes (standard-error bands; the held-out
    gold itself on each panel's right axis), per-task gains at the largest budget, and proxy against
    gold over training for CLIP-trained methods."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    methods = results["methods"]
    written = []
    cols = min(4, max(1, len(methods)))
    rows = max(1, math.ceil(len(methods) / cols))
    for x, label, name in (("queries", "reward queries", "leaderboard_queries.png"),
                           ("minutes", "CPU minutes of training", "leaderboard_minutes.png")):
        # small multiples: each method's curve with its band, every other method faint behind it
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows + 0.6), sharex=True, sharey=True,
                                 squeeze=False)
        curves = {method: ([0.0] + [c[x] for c in m["curve"]], [0.0] + [c["gain"] for c in m["curve"]],
                           [0.0] + [c["standard_error"] for c in m["curve"]]) for method, m in methods.items()}
        for ax, (method, (xs, ys, se)) in zip(axes.flat, curves.items()):
            for other, (ox, oy, _) in curves.items():
                if other != method:
                    ax.plot(ox, oy, color="0.82", lw=0.8)
            ax.plot(xs, ys, marker="o", ms=3, color="tab:blue")
            ax.fill_between(xs, [y - e for y, e in zip(ys, se)], [y + e for y, e in zip(ys, se)], color="tab:blue",
                            alpha=0.2, linewidth=0)
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_title(f"{method} ({methods[method]['family']}, {methods[method]['reward']})", fontsize=8)
            ax.tick_params(labelsize=7)
            base = next((b["base_gold"] for b in methods[method]["budgets"].values() if "base_gold" in b), None)
            if base is not None:  # the held-out gold itself on the right: gain + the method's base
                gold = ax.secondary_yaxis("right", functions=(lambda g, b=base: g + b, lambda y, b=base: y - b))
                gold.set_ylabel(f"held-out gold (base {base:.3f})", fontsize=7)
                gold.tick_params(labelsize=7)
        for ax in axes.flat[len(curves):]:
            ax.set_visible(False)
        for ax in axes[-1]:
            ax.set_xlabel(label, fontsize=8)
        for ax in axes[:, 0]:
            ax.set_ylabel("held-out gold gain", fontsize=8)
        fig.suptitle("shapes world: paired gain over the base, band one standard error (training seeds and evaluation)",
                     fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / name, dpi=110)
        plt.close(fig)
        written.append(folder / name)
    budget = str(results["settings"]["budgets"][-1])
    # one panel a task, one bar a method (named on the axis: no legend colours to match), coloured by backbone
    names = [n for n, m in methods.items() if budget in m["budgets"]]
    families = sorted({methods[n]["family"] for n in names})
    colours = {f: f"C{i}" for i, f in enumerate(families)}
    task_rows = math.ceil(len(TASKS) / 3)
    fig, axes = plt.subplots(task_rows, 3, figsize=(11, 1.2 + 0.25 * task_rows * max(3, len(names))), sharex=True,
                             sharey=True, squeeze=False)  # one scale: the tasks' gains compare
    for ax, task in zip(axes.flat, TASKS):
        gains = [methods[n]["budgets"][budget]["per_task"][task] for n in names]
        ax.barh(range(len(names)), gains, color=[colours[methods[n]["family"]] for n in names])
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(task, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_yticks(range(len(names)), names)
    for ax in axes.flat[len(TASKS):]:
        ax.set_visible(False)
    axes[0, 0].invert_yaxis()  # the first method on top (the axis is shared)
    for ax in axes[-1]:
        ax.set_xlabel(f"gold gain at {int(budget):,} queries", fontsize=8)
        ax.tick_params(labelbottom=True)
    fig.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=colours[f]) for f in families], labels=families,
               loc="upper right", fontsize=8, title="backbone", title_fontsize=8)
    fig.suptitle(f"shapes world: held-out gold gain per task at {int(budget):,} reward queries (mean over training "
                 "seeds)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.93, 1))
    fig.savefig(folder / "leaderboard_tasks.png", dpi=110)
    plt.close(fig)
    written.append(folder / "leaderboard_tasks.png")
    proxied = {n: m for n, m in methods.items() if m["curve"] and "proxy_gain" in m["curve"][0]}
    if proxied:
        cols = min(3, len(proxied) + 1)
        rows = math.ceil((len(proxied) + 1) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(max(6.0, 4.4 * cols), 3.4 * rows + 0.4), squeeze=False)
        for ax in axes.flat[len(proxied) + 1:]:
            ax.set_visible(False)
        def limits(key: str) -> tuple[float, float]:  # one scale for every panel: the methods compare
            values = [0.0] + [c[f"{key}gain"] + sign * c[f"{key}standard_error"] for m in proxied.values()
                              for c in m["curve"] for sign in (-1, 1)]
            pad = 0.05 * (max(values) - min(values) or 1.0)
            return min(values) - pad, max(values) + pad

        for ax, (method, m) in zip(axes.flat, proxied.items()):
            xs = [0.0] + [c["queries"] for c in m["curve"]]
            twin = ax.twinx()
            ax.set_ylim(*limits(""))
            twin.set_ylim(*limits("proxy_"))
            for axis, key, colour, marker in ((ax, "", "tab:blue", "o"), (twin, "proxy_", "tab:red", "s")):
                ys = [0.0] + [c[f"{key}gain"] for c in m["curve"]]
                se = [0.0] + [c[f"{key}standard_error"] for c in m["curve"]]
                axis.plot(xs, ys, marker=marker, ms=3, color=colour)
                axis.fill_between(xs, [y - e for y, e in zip(ys, se)], [y + e for y, e in zip(ys, se)], color=colour,
                                  alpha=0.15, linewidth=0)
            ax.axhline(0.0, color="grey", linewidth=0.6)
            ax.set_title(f"{method} (trained on {m['reward']})", fontsize=9)
            ax.set_xlabel("reward queries")
            ax.set_ylabel("gold gain (exact evaluator)", color="tab:blue")
            twin.set_ylabel(f"proxy gain ({Path(results['settings']['clip']).name})", color="tab:red")
        # every method in one panel, gold against the proxy (Gao et al.'s picture): a curve that bends
        # down as the proxy keeps rising is over-optimisation
        ax = axes.flat[len(proxied)]
        for method, m in proxied.items():
            ax.plot([0.0] + [c["proxy_gain"] for c in m["curve"]], [0.0] + [c["gain"] for c in m["curve"]],
                    marker="o", ms=3, label=method)
        ax.axhline(0.0, color="grey", linewidth=0.6)
        ax.axvline(0.0, color="grey", linewidth=0.6)
        ax.set_title("gold against proxy over training (each point an export)", fontsize=9)
        ax.set_xlabel(f"proxy gain ({Path(results['settings']['clip']).name})")
        ax.set_ylabel("gold gain (exact evaluator)")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))  # beside the lines, not on them
        fig.suptitle("over-optimisation: the proxy trained on and the gold (bands: one standard error)", fontsize=9)
        fig.tight_layout()
        fig.savefig(folder / "leaderboard_overoptimisation.png", dpi=110)
        plt.close(fig)
        written.append(folder / "leaderboard_overoptimisation.png")
    return written


def report(results: dict[str, Any], plots: Sequence[Path], relative_to: Path) -> str:
    """The markdown block written into docs/results.md."""
    s = results["settings"]
    lines = [MARK_BEGIN, "", f"### Leaderboard ({results['date']}, {results['machine']})", "",
             f"Each method's shipped config trained under training seeds {s['seeds']}, scored by the exact "
             f"evaluator on {s['per_task']} {'held-out' if s['split'] == 'heldout' else s['split'] + '-split'} "
             f"prompts a task at evaluation seeds {s['eval_seeds']} "
             f"({s['eval_steps']} ODE/DDIM steps, guidance {s['guidance_scale']:g}) and paired image by image "
             "with the base; the gain is the mean over training seeds, and its standard error pools the "
             "seeds' spread with the evaluation's (the per-image spread of the seeds' mean difference; "
             "SE: how many standard errors the gain is).", "", *table(results), ""]
    if comparison_table(results):
        lines += [COMPARED, "", *comparison_table(results), ""]
    for path in plots:
        lines.append(f"![{path.stem}]({path.relative_to(relative_to).as_posix()})")
    lines += ["", MARK_END]
    return "\n".join(lines)


README_BEGIN = "<!-- leaderboard table: begin (written by bench/leaderboard.py --readme) -->"
README_END = "<!-- leaderboard table: end -->"


def write_readme(results: dict[str, Any], readme: Path) -> None:
    """The table (and its date and machine) between the README's leaderboard markers."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme} has no leaderboard markers: put the lines\n{README_BEGIN}\n{README_END}\n"
                         "where the table goes")
    s = results["settings"]
    block = [README_BEGIN, "", f"{results['date']}, {results['machine']}; training seeds {s['seeds']}, "
             f"{s['per_task']} held-out prompts a task at evaluation seeds {s['eval_seeds']}, gain over the base "
             "paired image by image (standard error pooling the training seeds' spread and the evaluation's; "
             "SE: how many of them):", "",
             *table(results), "", *([COMPARED, "", *comparison_table(results), ""] if comparison_table(results) else []),
             README_END]
    write_block(readme, "\n".join(block), README_BEGIN, README_END)


def write_docs(results: dict[str, Any], docs: Path) -> list[Path]:
    """Plots under ``docs/img/`` and the block in ``docs/results.md`` (replaced, or added at the end)."""
    plots = plot(results, docs / "img")
    target = docs / "results.md"
    write_block(target, report(results, plots, docs), MARK_BEGIN, MARK_END)
    return [target, *plots]


def write_block(target: Path, block: str, begin: str, end: str) -> None:
    """``block`` (which starts with ``begin`` and ends with ``end``) in place of the text between
    those markers in ``target``, or added at its end (a new page when there is none)."""
    text = target.read_text() if target.is_file() else "# Results\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    target.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=None, help="shapes configs (default: configs/shapes/*.yaml)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (run.seed)")
    p.add_argument("--budgets", type=int, nargs="+", default=[800, 3200], help="reward-query budgets")
    p.add_argument("--minutes", type=float, nargs="*", default=[4.0, 8.0],
                   help="training-minute budgets (CPU minutes, from the same runs; none: no minute columns)")
    p.add_argument("--per-task", type=int, default=100, help="held-out prompts a task")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--eval-steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--split", default="heldout", choices=("heldout", "train"),
                   help="score on the held-out prompts (report) or the training ones (choose settings on these)")
    p.add_argument("--clip", default="models/shapes/clip", help="the CLIP proxy scored beside the gold for CLIP-trained methods")
    p.add_argument("--trl", action="store_true", help="also TRL 0.23.1's DDPOTrainer (bench/trl_ddpo.py; its own "
                   "environment, made on first use) at configs/shapes/ddpo.yaml's settings, the outside reference")
    p.add_argument("--references", nargs="*", default=["flow_grpo", "ddpo"],
                   help="methods every other on the same backbone is compared with, paired image by image "
                        "(the first one present on a backbone)")
    p.add_argument("--out", default="runs/leaderboard", help="the runs: weights and metrics")
    p.add_argument("--records", default="bench/leaderboard",
                   help="what the numbers come from (kept in git): runs' points, evaluations, and with --docs the "
                        "report's leaderboard.json")
    p.add_argument("--docs", default=None, help="write results.md's block and img/*.png here (e.g. docs)")
    p.add_argument("--readme", default=None, help="write the table between this README's leaderboard markers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--recorded", action="store_true",
                   help="report only the runs on record (with every evaluation): train, evaluate and delete nothing; "
                        "the interim table of a leaderboard still running, its cells giving their seeds")
    p.add_argument("--redo", action="store_true",
                   help="replace run records made from other settings (an edited config, other budgets); without "
                        "it such records stop the run before anything starts")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="measure only every N-th config from the I-th (0-based), to run N processes side by side; "
                        "a run without --shard then reports them all from the records")
    p.add_argument("--threads", type=int, default=None,
                   help="torch's CPU threads (default: torch's choice); on a small machine, shards at 1 thread "
                        "each give more runs an hour than one process at all cores")
    args = p.parse_args(argv)
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # what run.threads 0 (automatic) then keeps
    configs = args.configs or sorted(str(c) for c in Path("configs/shapes").glob("*.yaml"))
    if not configs:
        raise SystemExit("no configs: run from the repository root or give --configs")
    if args.shard:
        try:
            index, count = (int(x) for x in args.shard.split("/"))
        except ValueError:
            raise SystemExit(f"--shard takes I/N, e.g. 0/2; got {args.shard!r}") from None
        if not 0 <= index < count:
            raise SystemExit(f"--shard {args.shard}: I must be in [0, N)")
        if args.docs or args.readme:
            raise SystemExit("--shard measures part of the configs: write --docs / --readme from a run without it")
        configs = configs[index::count]
    budgets = sorted(set(args.budgets))
    if min(budgets) < 1:
        raise SystemExit("budgets are reward queries: give positive numbers")
    s = Settings(configs=configs, seeds=args.seeds, budgets=budgets, minutes=sorted(set(args.minutes)),
                 per_task=args.per_task, eval_seeds=args.eval_seeds, eval_steps=args.eval_steps,
                 guidance_scale=args.guidance_scale, split=args.split, clip=args.clip, trl=args.trl, out=args.out,
                 records=args.records, device=args.device, recorded=args.recorded, references=args.references,
                 redo=args.redo)
    try:
        results = measure(s)
    except StaleRecords as err:
        raise SystemExit(f"leaderboard: {err}") from None
    # the report (--docs) keeps its numbers beside the records they came from; any other run (a shard,
    # --recorded, a try) leaves its numbers and plots with its runs, so that the report's stay whole
    kept = Path(s.records) if args.docs else Path(s.out)
    name = f"leaderboard-shard{index}of{count}.json" if args.shard else "leaderboard.json"  # shards share --out
    _write(kept / name, json.dumps(results, indent=1) + "\n")
    print("\n".join(table(results)))
    if args.shard:
        print(f"wrote {kept / name} (the plots come with the report, a run without --shard)")
        return 0
    written = write_docs(results, Path(args.docs)) if args.docs else plot(results, kept)
    if args.readme:
        write_readme(results, Path(args.readme))
        written.append(Path(args.readme))
    print(f"wrote {kept / name} and {', '.join(str(w) for w in written)}")
    return 0


__all__ = ["Settings", "budget_steps", "comparison_table", "comparisons", "config_settings", "export_interval", "main", "measure", "plot",
           "pooled", "queries_per_step", "scored_points", "table", "within_minutes", "write_block", "write_docs", "write_readme"]
