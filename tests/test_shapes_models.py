"""`genalign shapes build` at toy scale, the loaders it must fit, and `genalign eval shapes`."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from genalign.cli import main
from genalign.core.experiment import BackboneConfig
from genalign.pipelines import load_backbone
from genalign.shapes.evaluator import score
from genalign.shapes.world import TASKS

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "shapes"


@pytest.fixture(scope="module")
def toy_build(tmp_path_factory):
    from genalign.shapes.build import BuildConfig, build

    out = tmp_path_factory.mktemp("shapes")
    log = build(BuildConfig(out=str(out), dataset_size=96, batch_size=8, vae_steps=2, sd_steps=2, flow_steps=2,
                            clip_steps=2))
    return out, log


def test_build_writes_loadable_sd_sd3_and_clip_folders(toy_build):
    out, log = toy_build
    assert {"vae", "sd", "flow", "clip"} <= set(log) and log["sd"]["steps"] == 2
    assert json.loads((out / "build.json").read_text())["config"]["seed"] == 0
    sd = load_backbone(BackboneConfig(family="sd", path=str(out / "sd"), finetune="none"))
    assert sd.latent_shape() == (4, 16, 16) and sd.resolution == 32
    ids = sd.pipe.tokenizer("a photo of a red circle").input_ids
    assert len(ids) == 8  # word-level: <start> a photo of a red circle <end>
    sd3 = load_backbone(BackboneConfig(family="sd3", path=str(out / "sd3"), finetune="none"))
    cond = sd3.encode_prompts(["a photo of a red circle"], guidance=False)
    assert cond.positive["prompt_embeds"].shape[1] == 16 + 1  # CLIP tokens + the 1-token T5 part (genalign.json)
    from genalign.core.experiment import RewardConfig
    from genalign.rewards import load_reward
    from genalign.shapes.scoring import clip_logits

    reward = load_reward(RewardConfig(name="clip", path=str(out / "clip")))
    prompts = ["a photo of a circle", "a photo of two squares", "a photo of a red square"]
    images = torch.rand(2, 3, 32, 32)
    logits = clip_logits(reward, images, prompts)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    # the pairwise matrix's diagonal is the reward's score
    torch.testing.assert_close(logits[:, :2].diagonal(), reward(images, prompts[:2])[0])


def test_reno_on_held_out_shapes_prompts_reports_the_paired_gold_gain(toy_build, tmp_path, capsys):
    out, _ = toy_build
    assert main(["reno", "--backbone", str(out / "sd"), "--shapes-heldout", "2", "--reward", "clip", "--reward-path",
                 str(out / "clip"), "--steps", "1", "--iterations", "2", "--device", "cpu", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "reno.json").read_text())
    verdicts = summary["gold_verdicts"]
    assert len(verdicts["plain"]) == len(verdicts["reno"]) == 2 * len(TASKS)
    # by hand: per task the mean and the sample variance of d = reno - plain; gain = mean over tasks,
    # SE = sqrt(sum of var / n) / number of tasks
    means, variance = [], 0.0
    for task in TASKS:
        d = [float(r) - float(p) for r, p, t in zip(verdicts["reno"], verdicts["plain"], verdicts["tags"]) if t == task]
        assert len(d) == 2
        mean = sum(d) / 2
        means.append(mean)
        variance += sum((x - mean) ** 2 for x in d) / 1 / 2
    gain = summary["gold_gain"]
    assert gain["gain"] == pytest.approx(sum(means) / len(TASKS))
    assert gain["gain"] == pytest.approx(summary["gold_reno"]["overall"] - summary["gold_initial"]["overall"])
    assert gain["standard_error"] == pytest.approx(variance**0.5 / len(TASKS))
    assert f"paired gain {gain['gain']:+.3f}" in capsys.readouterr().out


def test_eval_shapes_command_scores_every_task(toy_build, tmp_path, capsys):
    out, _ = toy_build
    assert main(["eval", "shapes", "--backbone", str(out / "sd"), "--per-task", "2", "--steps", "2",
                 "--device", "cpu", "--out", str(tmp_path), "--clip", str(out / "clip")]) == 0
    result = json.loads((tmp_path / "scores.json").read_text())
    assert set(result["gold"]) == {*TASKS, "overall"}
    assert all(0.0 <= v <= 1.0 for v in result["gold"].values())
    assert set(result["clip_agreement_on_ground_truth"]) == {*TASKS, "overall"}
    summary = result["summary"]  # the common report summary: eval compare reads shapes runs
    assert summary["overall"] == result["gold"]["overall"] and summary["proxy_reward"] == result["proxy_reward"]["overall"]
    assert "gold score" in capsys.readouterr().out
    assert main(["eval", "compare", str(tmp_path), str(tmp_path)]) == 0
    assert f"| **overall** | {summary['overall']:.4f} | {summary['overall']:.4f} | +0.0000 |" in capsys.readouterr().out
    assert (tmp_path / "grid.png").is_file()


def test_build_is_deterministic_for_a_seed(toy_build, tmp_path):
    """Same seed, same weights, byte for byte (CPU): the shipped models are reproducible."""
    from safetensors.torch import load_file

    from genalign.shapes.build import BuildConfig, build

    first, _ = toy_build
    build(BuildConfig(out=str(tmp_path), dataset_size=96, batch_size=8, vae_steps=2, sd_steps=2, flow_steps=2,
                      clip_steps=2))
    for part in ("sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors",
                 "sd3/transformer/diffusion_pytorch_model.safetensors", "clip/model.safetensors"):
        a, b = load_file(str(first / part)), load_file(str(tmp_path / part))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_shipped_models_exist_and_fit_the_size_budget():
    weights = [f for f in SHIPPED.rglob("*.safetensors")]
    assert {f.relative_to(SHIPPED).parts[0] for f in weights} == {"sd", "sd3", "clip", "clip_1", "clip_2", "kontext",
                                                                  "text", "video"}
    # 32 MiB, three proxies of 2.8 MiB, the editing model 7.3 MiB (its VAE a copy of sd's), the text
    # model 7.2 MiB and its OCR reader 1.1 MiB, the video model 4.3 MiB
    assert sum(f.stat().st_size for f in weights) <= 57 * 2**20


def test_shipped_sd_model_is_between_chance_and_perfect_on_heldout_prompts():
    """The quality bar (measured at 50 prompts a task in the README); 20 a task keeps this fast."""
    from genalign.shapes.scoring import evaluate_backbone

    backbone = load_backbone(BackboneConfig(family="sd", path=str(SHIPPED / "sd"), finetune="none"))
    scores, images, metas, verdicts = evaluate_backbone(backbone, per_task=20, num_steps=25, guidance_scale=2.0,
                                                        seed=0)
    assert images.shape == (120, 3, 32, 32)
    assert len(verdicts) == len(metas) == 120
    assert scores == score(list(images), metas)  # the verdicts summarised as the evaluator's score
    assert scores["single_object"] >= 0.6, scores
    assert 0.25 <= scores["overall"] <= 0.7, scores


def test_paired_gain_by_hand():
    from genalign.shapes.scoring import paired_gain

    # task a: d = [0, 1, 0, 0]: mean 0.25, sample variance 0.25, / 4 images = 0.0625
    # task b: d = [-1, 0]: mean -0.5, sample variance 0.5, / 2 images = 0.25
    # gain = (0.25 - 0.5) / 2 = -0.125; SE = sqrt(0.0625 + 0.25) / 2
    result = paired_gain([1, 0, 1, 0, 1, 1], [1, 1, 1, 0, 0, 1], ["a", "a", "a", "a", "b", "b"])
    assert result["gain"] == pytest.approx(-0.125)
    assert result["standard_error"] == pytest.approx(math.sqrt(0.3125) / 2)
    assert result["per_task"] == {"a": pytest.approx(0.25), "b": pytest.approx(-0.5)}
    # a task with one image adds its difference but no variance
    assert paired_gain([0], [1], ["a"]) == {"gain": 1.0, "standard_error": 0.0, "per_task": {"a": 1.0}}
    with pytest.raises(ValueError, match="one base and one tuned"):
        paired_gain([1, 0], [1], ["a", "a"])
    with pytest.raises(ValueError, match="at least one"):
        paired_gain([], [], [])


def test_pair_agreement_by_hand():
    from genalign.shapes.scoring import pair_agreement

    # group 0: proxy 3, 1, 2; gold 1, 0, 0: pairs (0,1) and (0,2) decided and ordered alike, (1,2) a gold tie
    # group 1: proxy 1, 2, 2; gold 1, 0, 1: (0,1) decided, ordered the other way; (1,2) decided, a proxy tie
    result = pair_agreement([3, 1, 2, 1, 2, 2], [1, 0, 0, 1, 0, 1], [0, 0, 0, 1, 1, 1])
    assert result["pairs"] == 6
    assert result["decided"] == pytest.approx(2 / 3) and result["decided_se"] == pytest.approx(0.0)
    assert result["agree"] == pytest.approx((2 + 0.5) / 4)  # a proxy tie counts a half
    # ratio estimator over groups: residuals a_g - r d_g = 2 - 1.25, 0.5 - 1.25; sqrt(1.125 / 2) * 2 / 4
    assert result["agree_se"] == pytest.approx(0.375)
    # net signal per pair, per group: 2 / 3 and -1 / 3; mean 1/6, SE = std([2/3, -1/3], ddof 1) / sqrt 2 = 0.5
    assert result["signal"] == pytest.approx(1 / 6) and result["signal_se"] == pytest.approx(0.5)
    # the gold as its own proxy agrees on every decided pair; a reversed one on none
    gold = [1, 0, 0, 1, 0, 1]
    assert pair_agreement(gold, gold, [0, 0, 0, 1, 1, 1])["agree"] == 1.0
    assert pair_agreement([-g for g in gold], gold, [0, 0, 0, 1, 1, 1])["signal"] == pytest.approx(-2 / 3)
    with pytest.raises(ValueError, match="two samples"):
        pair_agreement([1.0, 2.0], [0, 1], [0, 1])
    # a group of one sample has no pairs: left out, not a nan; the first case's figures stand
    beside = pair_agreement([3, 1, 2, 1, 2, 2, 5], [1, 0, 0, 1, 0, 1, 1], [0, 0, 0, 1, 1, 1, 2])
    assert beside["pairs"] == 6 and beside["decided"] == pytest.approx(2 / 3)
    assert beside["signal"] == pytest.approx(1 / 6) and beside["signal_se"] == pytest.approx(0.5)


def test_eval_shapes_compares_base_and_fine_tuned_on_the_same_seeds(toy_build, tmp_path, capsys):
    out, _ = toy_build
    backbone = load_backbone(BackboneConfig(family="sd", path=str(out / "sd"), finetune="lora"))
    lora = backbone.save_lora(tmp_path / "lora")
    assert main(["eval", "shapes", "--backbone", str(out / "sd"), "--per-task", "1", "--steps", "2",
                 "--device", "cpu", "--out", str(tmp_path / "eval"), "--lora", str(lora), "--with-base"]) == 0
    result = json.loads((tmp_path / "eval" / "scores.json").read_text())
    # a fresh LoRA (B = 0) is the base model: identical images, identical scores
    assert result["base"]["gold"] == result["gold"]
    assert result["gain"]["gain"] == 0.0 and result["gain"]["standard_error"] == 0.0
    text = capsys.readouterr().out
    assert "gold score (exact evaluator, held-out prompts), base:" in text and "fine-tuned:" in text
    assert "gold gain over the base, paired over the same prompts and seeds: +0.000 (standard error 0.000)" in text
    from PIL import Image

    from genalign.shapes.report import BORDER, CAPTION, CELL, FAIL, HEADER, LABEL, PASS

    grid = Image.open(tmp_path / "eval" / "grid.png").convert("RGB")
    assert grid.size == (LABEL + CELL, HEADER + 12 * (CELL + CAPTION))  # one image a row (per_task 1), two rows a task
    for row, passed in enumerate(v for pair in zip(result["base"]["verdicts"], result["verdicts"]) for v in pair):
        top = HEADER + row * (CELL + CAPTION)  # each frame's colour is its image's verdict
        assert grid.getpixel((LABEL + 1, top + 1)) == (PASS if passed else FAIL)
        inside = grid.crop((LABEL + BORDER, top + BORDER, LABEL + CELL - BORDER, top + CELL - BORDER))
        assert len(set(inside.getdata())) > 1  # the image itself, not the frame colour
    assert len(result["prompts"]) == len(result["verdicts"]) == 6
    from genalign.shapes.report import caption

    assert caption("a photo of two blue squares", True) == "pass\na photo of two\nblue squares"
    assert caption("a photo of a red circle and a green square", False).split("\n") == [
        "FAIL", "a photo of a", "red circle and", "a green square"]
