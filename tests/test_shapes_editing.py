"""The shapes editing task (genalign/shapes/editing.py): its exact evaluator on rendered ground truth,
on blurred noisy renders, on edits that are wrong in one way each; the reward; the editing model's
build stage at toy scale, loaded as a FLUX.1 Kontext backbone with its source images."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from genalign.core.experiment import RewardConfig
from genalign.rewards import load_reward
from genalign.rewards.combine import WithSourceImages
from genalign.shapes.editing import (
    KINDS,
    EditExample,
    edit_checks,
    edit_score,
    edit_set,
    parse_instruction,
    render_pair,
)
from genalign.shapes.world import COLORS, ShapeObject, render


@pytest.fixture(scope="module")
def examples() -> list[EditExample]:
    return edit_set("train", 90, seed=3)


def test_instructions_parse_and_bad_ones_are_refused():
    assert parse_instruction("a red circle then make the circle blue") == {
        "kind": "recolor", "shape": "circle", "color": "blue"}
    assert parse_instruction("a red circle and a blue square then move the circle left of the square") == {
        "kind": "move", "shape": "circle", "relation": "left of", "reference": "square"}
    assert parse_instruction("a red circle then add an orange triangle") == {
        "kind": "add", "shape": "triangle", "color": "orange"}
    for prompt in ("a photo of a red circle", "a red circle then paint the circle blue",
                   "a red circle then make the hexagon blue"):
        with pytest.raises(ValueError, match="shapes edit"):
            parse_instruction(prompt)


def test_examples_cover_the_kinds_and_the_splits_are_disjoint(examples):
    assert {e.kind for e in examples} == set(KINDS)
    heldout = {e.prompt for e in edit_set("heldout", 90, seed=3)}
    assert not heldout & {e.prompt for e in examples}
    for e in examples:  # the prompt names the source and the instruction
        assert e.prompt.endswith(" then " + e.instruction)
        assert len(e.target) == len(e.source) + (e.kind == "add")


def test_ground_truth_edits_pass_and_doing_nothing_fails(examples):
    rng = np.random.default_rng(0)
    for e in examples:
        source, target = render_pair(e)
        assert edit_score(target, source, e.prompt) == (1.0, True), edit_checks(target, source, e.prompt)
        noisy = np.clip(ndimage.gaussian_filter(target, sigma=(0.6, 0.6, 0)) + rng.normal(0, 0.04, target.shape), 0, 1)
        assert edit_score(noisy, source, e.prompt)[1]
        share, ok = edit_score(source, source, e.prompt)  # the source returned unedited
        assert not ok and share < 1.0


def _wrong(e: EditExample) -> list[ShapeObject]:
    """The target with one thing wrong: another colour, the move undone, the added object's colour."""
    objects = list(e.target)
    if e.kind == "recolor":
        index = next(i for i, (a, b) in enumerate(zip(e.source, e.target)) if a.color != b.color)
        wrong = next(c for c in COLORS if c not in (e.source[index].color, e.target[index].color))
        o = objects[index]
        objects[index] = ShapeObject(o.shape, wrong, o.cx, o.cy, o.radius)
    elif e.kind == "move":
        objects[0] = e.source[0]
    else:
        o = objects[-1]
        wrong = next(c for c in COLORS if c != o.color)
        objects[-1] = ShapeObject(o.shape, wrong, o.cx, o.cy, o.radius)
    return objects


def test_each_wrong_edit_fails_its_check(examples):
    for e in examples:
        source, _ = render_pair(e)
        checks, reason = edit_checks(render(_wrong(e)), source, e.prompt)
        assert not all(checks), (e.prompt, reason)
    # an untouched object that moved fails "nothing else changed" while the edit itself holds
    e = next(x for x in examples if x.kind == "add")
    moved = list(e.target)
    o = moved[0]
    shift = 4.0 if o.cx < 16 else -4.0
    moved[0] = ShapeObject(o.shape, o.color, o.cx + shift, o.cy, o.radius)
    source, _ = render_pair(e)
    checks, reason = edit_checks(render(moved), source, e.prompt)
    assert checks[:2] == [True, True] and not all(checks[2:]) and "changed" in reason, (e.prompt, reason)


def test_the_reward_needs_the_source_images_that_editing_runs_pass(examples):
    reward = load_reward(RewardConfig(name="shapes_edit_gold"))
    pairs = [render_pair(e) for e in examples[:6]]
    targets = torch.stack([torch.from_numpy(t).permute(2, 0, 1) for _, t in pairs])
    sources = {e.prompt: torch.from_numpy(s).permute(2, 0, 1) for e, (s, _) in zip(examples[:6], pairs)}
    prompts = [e.prompt for e in examples[:6]]
    with pytest.raises(ValueError, match="source_image"):
        reward(targets, prompts)
    scores, subs = WithSourceImages(reward, sources)(targets, prompts)
    assert scores.tolist() == [1.0] * 6 and subs["edit_strict"].tolist() == [1.0] * 6
    unedited = torch.stack([sources[p] for p in prompts])
    scores, subs = WithSourceImages(reward, sources)(unedited, prompts)
    assert (subs["edit_strict"] == 0).all() and (scores < 1).all()


def test_edit_stage_builds_a_kontext_model_that_loads_with_its_source_images(tmp_path):
    """Toy scale: a few steps; the folder is a FluxKontextPipeline genalign loads as flux-kontext,
    with the edit sets in backbone.source_images' format."""
    from pathlib import Path

    from genalign.core.experiment import BackboneConfig
    from genalign.core.sampler import initial_noise, sample
    from genalign.pipelines import load_backbone
    from genalign.shapes.build import BuildConfig, build

    (tmp_path / "sd").symlink_to(Path(__file__).resolve().parents[1] / "models" / "shapes" / "sd")
    log = build(BuildConfig(out=str(tmp_path), stages=("edit",), dataset_size=8, edit_dataset_size=40, edit_steps=3,
                            edit_batch_size=4, edit_sets=(8, 6)))
    assert log["edit"]["steps"] == 3 and np.isfinite(log["edit"]["final_loss"])
    folder = tmp_path / "kontext"
    rows = [json.loads(line) for line in (folder / "edits" / "heldout.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and len({r["prompt"] for r in rows}) == 6
    backbone = load_backbone(BackboneConfig(path=str(folder), family="flux-kontext", finetune="lora",
                                            source_images=str(folder / "edits" / "heldout.jsonl")))
    prompts = [r["prompt"] for r in rows[:2]]
    with torch.no_grad():
        cond = backbone.encode_prompts(prompts)
        images = backbone.decode(sample(backbone, cond, 2, 1.0,
                                        latents=initial_noise(backbone, 2, torch.Generator().manual_seed(0))).final)
    assert images.shape == (2, 3, 32, 32)
    assert not (tmp_path / "build.json").exists()  # an edit-only build leaves the world's build log alone
    assert json.loads((folder / "build.json").read_text())["edit"]["steps"] == 3


def test_an_editing_run_defaults_its_prompts_to_the_edits_and_its_reward_sees_the_sources(tiny_models, tmp_path):
    """`genalign train` of a FLUX.1 Kontext model on shapes_edit_gold: the prompts come from
    backbone.source_images, the reward (which refuses rows without a source image) gets them."""
    import yaml
    from PIL import Image

    from genalign.cli import main

    examples = edit_set("train", 4, seed=5)
    rows = []
    for index, example in enumerate(examples):
        source, _ = render_pair(example)
        small = Image.fromarray((source * 255).round().astype(np.uint8)).resize((16, 16))  # the tiny model's size
        small.save(tmp_path / f"{index}.png")
        rows.append(json.dumps({"prompt": example.prompt, "source_image": f"{index}.png"}))
    (tmp_path / "edits.jsonl").write_text("\n".join(rows) + "\n")
    config = {
        "backbone": {"family": "flux-kontext", "path": tiny_models("flux-kontext"), "lora_rank": 4,
                     "source_images": str(tmp_path / "edits.jsonl")},
        "reward": {"name": "shapes_edit_gold"},
        "method": {"name": "flow_grpo", "samples_per_prompt": 2, "minibatches": 1},
        "sample": {"num_steps": 3, "guidance_scale": 1.0, "eta": 0.7},
        "run": {"output_dir": str(tmp_path / "run"), "steps": 2, "batch_size": 2, "tracker": "none",
                "checkpoint_every": 0},
    }
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "exp.yaml")]) == 0
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(history) == 2 and all("reward_mean" in h for h in history)  # scored: the sources reached it
    assert (tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors").is_file()
