"""The shapes text task (genalign/shapes/text.py): the glyphs pixel by pixel, the exact reader on every
string's render and on blurred, noisy, hue-shifted ones, the gold score by hand, the splits, the
reward; the text stage's models at toy scale; the shipped OCR reader on held-out strings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

from genalign.core.experiment import RewardConfig
from genalign.rewards import load_reward
from genalign.shapes.text import (
    DIGITS,
    all_texts,
    evaluation_texts,
    malformed,
    prompt_for,
    read_text,
    render_segments,
    render_text,
    split_texts,
    text_of,
    text_score,
)

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shapes" / "text"


def test_a_one_is_the_right_column_and_an_eight_lights_everything():
    """Glyphs are 8 x 14 px, strokes 2 px; one digit sits at x 12-20, y 9-23 (the centre of 32 px)."""
    one, eight = render_text("1")[..., 0], render_text("8")[..., 0]
    assert one[9:23, 18:20].min() == 1.0 and one[9:23, 12:18].max() == 0.0  # segments b, c only
    assert one.sum() == 2 * 14
    for y, x in [(9, 15), (10, 18), (10, 12), (16, 15), (20, 12), (20, 19), (22, 15)]:  # a, b, f, g, e, c, d
        assert eight[y, x] == 1.0
    assert eight[11:15, 14:16].max() == 0.0 and eight[18:21, 14:16].max() == 0.0  # the two holes
    assert eight[:, :12].max() == 0.0 and eight[:, 20:].max() == 0.0


def test_every_string_reads_back_from_its_render_and_from_degraded_ones():
    rng = np.random.default_rng(0)
    texts = all_texts()
    assert len(texts) == 10 + 100 + 1000
    assert [t for t in texts if read_text(render_text(t)) != t] == []
    wrong = []
    for text in texts[::3]:
        image = render_text(text)
        blurred = ndimage.gaussian_filter(image, (rng.uniform(0.4, 1.0), rng.uniform(0.4, 1.0), 0))
        degraded = blurred * rng.uniform(0.55, 1.0, 3) + rng.normal(0, 0.06, image.shape)
        if read_text(degraded) != text:
            wrong.append(text)
    assert wrong == []
    assert read_text(np.zeros((32, 32, 3))) == ""
    assert read_text(torch.from_numpy(render_text("407")).permute(2, 0, 1)) == "407"  # (3, H, W) tensors too


def test_a_glyph_that_is_no_digit_reads_as_a_question_mark():
    image = render_text("8")
    image[:, 18:] = 0  # an 8 without its right column (b, c) is an E: segments a, d, e, f, g
    assert read_text(image) == "?"
    assert read_text(np.concatenate([image[:, 5:], image[:, :5]], axis=1)) != "8"


def test_glyphs_that_are_no_digit_are_drawn_where_digits_are_and_read_as_question_marks():
    """The OCR reader's training strings with one glyph that is no digit: drawn by segments in the
    digits' layout, and the exact reader reads them as labelled."""
    assert np.array_equal(render_segments([DIGITS["4"], DIGITS["2"]]), render_text("42"))
    rng = np.random.default_rng(4)
    for _ in range(200):
        slots, label = malformed(rng)
        assert label.count("?") == 1 and len(label) == len(slots)
        assert read_text(render_segments(slots)) == label
    with pytest.raises(ValueError, match="segments a-g"):
        render_segments(["abz"])


def test_gold_scores_by_hand():
    image = render_text("12")
    assert text_score(image, "12") == (1.0, True)
    assert text_score(image, "17") == (0.5, False)  # one substitution in two
    assert text_score(image, "123") == (1 - 1 / 3, False)  # one insertion in three
    assert text_score(image, "9") == (0.0, False)  # distance 2, clipped at the length 1
    assert text_score(image, "2") == (0.0, False)  # no substring credit (flow_grpo's OCR reward gives 1)


def test_splits_and_prompts():
    train, heldout = split_texts("train"), split_texts("heldout")
    assert not set(train) & set(heldout) and sorted(train + heldout) == sorted(all_texts())
    assert all(len(t) > 1 for t in heldout) and {str(d) for d in range(10)} <= set(train)
    assert 0.15 < len(heldout) / (len(all_texts()) - 10) < 0.25
    chosen = evaluation_texts("heldout", 10, seed=1)
    assert len(chosen) == 10 and set(chosen) <= set(heldout) and sorted(len(t) for t in chosen) == [2] * 5 + [3] * 5
    assert prompt_for("07") == 'a sign that reads "07"' and text_of(prompt_for("07")) == "07"
    for bad in ("", "1234", "1a"):
        with pytest.raises(ValueError, match="digits"):
            prompt_for(bad)
    with pytest.raises(ValueError, match="not a shapes text prompt"):
        text_of('a poster that reads "07"')


def test_the_reward_scores_the_quoted_digits_or_the_metadata_text():
    reward = load_reward(RewardConfig(name="shapes_text_gold"))
    images = torch.stack([torch.from_numpy(render_text(t)).permute(2, 0, 1) for t in ("12", "345", "6")])
    prompts = [prompt_for("17"), prompt_for("345"), prompt_for("6")]
    scores, subs = reward(images, prompts)
    assert scores.tolist() == [0.5, 1.0, 1.0] and subs["text_strict"].tolist() == [0.0, 1.0, 1.0]
    scores, _ = reward(images, prompts, [{"text": "12"}, {}, {"text": "66"}])
    assert scores.tolist() == [1.0, 1.0, 0.5]
    strict = load_reward(RewardConfig(name="shapes_text_gold", options={"score": "strict"}))
    assert strict(images, prompts)[0].tolist() == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="not a shapes text prompt"):
        reward(images[:1], ["a red circle"])


def test_text_stage_builds_a_flux_model_and_a_got_ocr_reader(tmp_path):
    """Toy scale: a FluxPipeline genalign loads as flux, its prompt files, and a GOT-OCR 2.0 folder the
    ocr reward loads; a few OCR steps lower its loss."""
    from genalign.core.experiment import BackboneConfig
    from genalign.core.sampler import initial_noise, sample
    from genalign.pipelines import load_backbone
    from genalign.shapes.build import BuildConfig, build

    (tmp_path / "sd").symlink_to(SHIPPED.parent / "sd")
    log = build(BuildConfig(out=str(tmp_path), stages=("text",), text_dataset_size=40, text_steps=3,
                            text_batch_size=4, ocr_steps=60, ocr_batch_size=8))
    assert log["text"]["steps"] == 3 and np.isfinite(log["text"]["final_loss"])
    assert log["ocr"]["first_loss"] > log["ocr"]["final_loss"]
    folder = tmp_path / "text"
    heldout = (folder / "prompts_heldout.txt").read_text().splitlines()
    assert heldout == [prompt_for(t) for t in split_texts("heldout")]
    backbone = load_backbone(BackboneConfig(path=str(folder), family="flux", finetune="lora"))
    with torch.no_grad():
        images = backbone.decode(sample(backbone, backbone.encode_prompts(heldout[:2]), 2, 1.0,
                                        latents=initial_noise(backbone, 2, torch.Generator().manual_seed(0))).final)
    assert images.shape == (2, 3, 32, 32)
    ocr = load_reward(RewardConfig(name="ocr", path=str(folder / "ocr"), options={"max_new_tokens": 4}))
    scores, _ = ocr(images, heldout[:2])
    assert scores.shape == (2,) and ((scores >= 0) & (scores <= 1)).all()
    assert not (tmp_path / "build.json").exists()
    assert json.loads((folder / "build.json").read_text())["ocr"]["steps"] == 60


def test_the_shipped_ocr_reads_held_out_strings_through_the_ocr_reward():
    """The shipped tiny GOT-OCR, through the ocr reward (greedy reading, flow_grpo's formula), reads
    renders of held-out strings, also blurred and dimmed; and it is no oracle of shapes: a blank image
    scores below a correct render."""
    texts = evaluation_texts("heldout", 40, seed=2)
    renders = torch.stack([torch.from_numpy(render_text(t)).permute(2, 0, 1) for t in texts])
    blurred = torch.from_numpy(ndimage.gaussian_filter(renders.numpy(), (0, 0, 0.7, 0.7))) * 0.8
    reward = load_reward(RewardConfig(name="ocr", path=str(SHIPPED / "ocr"), options={"max_new_tokens": 6}))
    prompts = [prompt_for(t) for t in texts]
    for images in (renders, blurred):
        scores, _ = reward(images, prompts)
        assert scores.mean() >= 0.95
    blank, _ = reward(torch.zeros(4, 3, 32, 32), prompts[:4])
    assert blank.max() < 1.0
