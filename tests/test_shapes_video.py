"""The moving-shapes world (genalign/shapes/video.py): prompts and splits, renders, and the exact
evaluator: right on every prompt's render and on degraded ones, wrong in each way it can be."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genalign.shapes.video import (
    FRAMES,
    KINDS,
    all_video_prompts,
    parse_video_prompt,
    split_video_prompts,
    video_checks,
    video_evaluation_set,
    video_example,
    video_scene,
    video_score,
)
from genalign.shapes.world import ShapeObject


def _meta(prompt):
    return parse_video_prompt(prompt)


def test_prompts_splits_and_evaluation_sets():
    metas = all_video_prompts()
    assert len(metas) == 7 * 3 * 4 + 3 * 7 * 6 and len({m["prompt"] for m in metas}) == len(metas)
    train, held = split_video_prompts("train"), split_video_prompts("heldout")
    assert {m["prompt"] for m in train}.isdisjoint(m["prompt"] for m in held) and len(train) + len(held) == len(metas)
    assert all(any(m["kind"] == kind for m in held) for kind in KINDS) and 0.15 < len(held) / len(metas) < 0.35
    chosen = video_evaluation_set("heldout", per_kind=10)
    assert len(chosen) == 20 and {_meta(p)["kind"] for p in chosen[:10]} == {"motion"}
    assert set(chosen) <= {m["prompt"] for m in held}
    assert _meta("a red circle moving to the right")["direction"] == "to the right"
    with pytest.raises(ValueError, match="not a moving-shapes prompt"):
        parse_video_prompt("a red circle")


def test_motion_scenes_move_the_named_way_inside_the_frame():
    rng = np.random.default_rng(0)
    for direction, (dx, dy) in (("to the right", (1, 0)), ("to the left", (-1, 0)), ("up", (0, -1)), ("down", (0, 1))):
        objects = video_scene(_meta(f"a red circle moving {direction}"), rng)
        assert len(objects) == FRAMES and len({o.radius for o in objects}) == 1
        travel = (objects[-1].cx - objects[0].cx) * dx + (objects[-1].cy - objects[0].cy) * dy
        assert 12 <= travel <= 16
        assert all(o.radius <= o.cx <= 32 - o.radius and o.radius <= o.cy <= 32 - o.radius for o in objects)


def test_every_prompts_render_passes_every_check():
    for meta in all_video_prompts():
        checks, why = video_checks(video_example(meta, 0), meta["prompt"])
        assert all(checks) and len(checks) == 5, (meta["prompt"], why)


def test_degraded_renders_still_pass():
    """Soft edges (a Gaussian blur of 0.7 px in each frame), a hue drift and pixel noise, as a
    generator's frames have."""
    from scipy import ndimage

    rng = np.random.default_rng(1)
    for meta in all_video_prompts()[::5]:
        video = video_example(meta, 3)
        blurred = ndimage.gaussian_filter(video, (0, 0.7, 0.7, 0))
        drifted = blurred * np.array([0.92, 1.0, 1.06])
        noisy = np.clip(drifted + rng.normal(0, 0.03, drifted.shape), 0, 1)
        checks, why = video_checks(noisy, meta["prompt"])
        assert all(checks), (meta["prompt"], why)


def test_each_way_a_video_can_be_wrong_fails_its_check():
    motion = "a red circle moving to the right"
    video = video_example(_meta(motion), 0)
    assert video_checks(video[::-1], motion)[0] == [True, True, True, False, False]  # moves left
    jumped = video[[0, 1, 2, 3, 8, 4, 5, 6, 7]]  # the end shown in the middle: a jump there and back
    assert video_checks(jumped, motion)[0] == [True, True, True, True, False]
    still = np.repeat(video[:1], FRAMES, axis=0)
    assert video_checks(still, motion)[0][3] is False
    blue = video_example(_meta("a blue circle moving to the right"), 0)
    assert video_checks(blue, motion)[0] == [True, True, False, True, True]
    squares = video_example(_meta("a red square moving to the right"), 0)
    assert video_checks(squares, motion)[0][1] is False
    crowded = video.copy()
    from genalign.shapes.world import render

    crowded[4] = np.maximum(crowded[4], render([ShapeObject("square", "green", 5.0, 5.0, 3.0)]))
    checks, why = video_checks(crowded, motion)
    assert checks[0] is False and "objects per frame" in why

    change = "a square turning from red to blue"
    video = video_example(_meta(change), 0)
    assert video_checks(video[::-1], change)[0] == [True, True, False, False, True]
    flicker = video[[0, 1, 8, 2, 3, 8, 8, 8, 8]]  # red, blue, red, blue: more than one change
    assert video_checks(flicker, change)[0] == [True, True, True, True, False]
    moved = video_example(_meta("a red square moving to the right"), 0)
    moved[FRAMES // 2 :] = video_example(_meta("a blue square moving to the right"), 0)[FRAMES // 2 :]
    assert video_checks(moved, change)[0] == [True, True, True, True, False]  # changes colour, but not in place


def test_tensors_and_the_gold_reward():
    from genalign.core.experiment import RewardConfig
    from genalign.rewards import load_reward
    from genalign.rewards.base import RewardInputError

    motion = "a red circle moving to the right"
    video = torch.from_numpy(video_example(_meta(motion), 0)).permute(0, 3, 1, 2)  # (F, 3, H, W)
    assert video_score(video, motion) == (1.0, True)
    reward = load_reward(RewardConfig(name="shapes_video_gold"))
    scores, sub = reward(torch.stack([video, video.flip(0)]), [motion, motion])
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.6]))
    torch.testing.assert_close(sub["video_strict"], torch.tensor([1.0, 0.0]))
    strict = load_reward(RewardConfig(name="shapes_video_gold", options={"score": "strict"}))
    torch.testing.assert_close(strict(video[None], [motion])[0], torch.tensor([1.0]))
    with pytest.raises(RewardInputError, match="scores videos"):
        reward(video, [motion] * FRAMES)


def test_video_stages_build_a_wan_model_and_video_alone_reuses_the_saved_vae(tmp_path):
    """Toy scale, in an empty folder (the video stages need no sd/): video_vae then video writes a
    WanPipeline folder genalign loads as wan (32 px, 9 frames, 12 word-level prompt tokens) with its
    prompt files; the stage video alone trains on the saved VAE and leaves it as it was."""
    import json

    from safetensors.torch import load_file

    from genalign.core.experiment import BackboneConfig
    from genalign.core.sampler import initial_noise, sample
    from genalign.pipelines import load_backbone
    from genalign.shapes.build import BuildConfig, build

    small = dict(video_dataset_size=8, video_vae_steps=2, video_vae_batch_size=2, video_steps=2, video_batch_size=2)
    build(BuildConfig(out=str(tmp_path), stages=("video_vae", "video"), **small))
    folder = tmp_path / "video"
    vae_file = folder / "vae" / "diffusion_pytorch_model.safetensors"
    before = load_file(str(vae_file))
    log = build(BuildConfig(out=str(tmp_path), stages=("video",), **{**small, "video_steps": 3}))
    after = load_file(str(vae_file))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert log["video"]["steps"] == 3 and "video_vae" not in log
    saved = json.loads((folder / "build.json").read_text())
    assert saved["video"]["steps"] == 3 and saved["video_vae"]["steps"] == 2  # both stages' logs kept
    assert (folder / "prompts_heldout.txt").read_text().splitlines() == [m["prompt"] for m in
                                                                          split_video_prompts("heldout")]
    backbone = load_backbone(BackboneConfig(family="wan", path=str(folder), finetune="lora"))
    assert (backbone.resolution, backbone.frames, backbone.max_sequence_length) == (32, 9, 12)
    assert len(backbone.pipe.tokenizer("a square turning from purple to yellow").input_ids) == 9  # word-level
    with torch.no_grad():
        videos = backbone.decode(sample(backbone, backbone.encode_prompts(["a red circle moving up"]), 2, 1.0,
                                        latents=initial_noise(backbone, 1, torch.Generator().manual_seed(0))).final)
    assert videos.shape == (1, FRAMES, 3, 32, 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video"]
