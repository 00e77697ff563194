"""Reward adapters: CLIP (transformers, open_clip), PickScore, HPSv2, LAION aesthetic, JPEG
(in)compressibility, the shapes gold reward, weighted sums, ensembles, per-prompt normalisation,
the registry and the tensor preprocessing. Tiny random models stand in for the published weights
and go through the same loading code."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.core.config import ConfigError
from genalign.core.experiment import RewardConfig
from genalign.core.loading import WeightsNotFoundError
from genalign.core.normalize import PerPromptStatTracker
from genalign.rewards import REWARDS, build_reward, load_reward
from genalign.rewards.base import RewardInputError, RewardModel, clear_cache
from genalign.rewards.combine import Ensemble, WeightedSum
from genalign.rewards.preprocess import CLIP_MEAN, CLIP_STD, ImageTransform, clip_transform
from tests.reward_models import (
    AESTHETIC_MLP,
    board_photo,
    register_tiny_open_clip,
    save_tiny_open_clip_checkpoint,
    save_tiny_transformers_clip,
    to_tensor,
)

PROMPTS = ["a red circle", "a blue square", "a photo"]


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    return save_tiny_transformers_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="module")
def open_clip_name(tmp_path_factory):
    return register_tiny_open_clip(tmp_path_factory.mktemp("open_clip_cfg"))


def _images(n: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8-exact images so that PIL-based reference paths see the same pixels."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, size, size, generator=g) * 255).round() / 255


def _pil(images: torch.Tensor) -> list[Image.Image]:
    arrays = (images * 255).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arrays]


# ------------------------------------------------------------------ preprocessing


def _normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


@pytest.mark.parametrize("size", [224, 32])
def test_clip_preprocessing_matches_the_official_pil_transform_on_a_photo(size):
    """open_clip's eval transform (torchvision on PIL: bicubic shortest side, center crop, CLIP
    normalisation) vs ours on tensors. Measured on board.jpg: mean |diff| 0.0046, max 0.048 in
    normalised units (max 3.4/255 in pixels, from uint8 rounding and PIL's fixed-point filter)."""
    import open_clip

    photo = board_photo()
    ours = clip_transform(size)(to_tensor(photo))[0]
    official = open_clip.image_transform(size, is_train=False)(photo)
    assert ours.shape == official.shape == (3, size, size)
    assert (ours - official).abs().mean() < 0.01
    assert (ours - official).abs().max() < 0.08


@pytest.mark.parametrize("box", [None, (0, 0, 360, 237), (0, 0, 237, 238)], ids=["landscape", "odd-pad", "portrait"])
def test_hps_longest_side_pad_matches_pil(box):
    """HPSv2's eval resize: longest side to 224, zero-padded to a centred square with HPSv2's split
    (``ResizeMaxSize``: [pad_w // 2, pad_h // 2, rest]), the PIL reference built by hand; on the
    non-square photo, on a crop whose padding is odd (77 rows: 38 above, 39 below) and a portrait
    one (padding left and right). The padded rows and columns are exactly black in both."""
    photo = board_photo() if box is None else board_photo().crop(box)
    scale = 224 / max(photo.size)
    width, height = round(photo.width * scale), round(photo.height * scale)
    canvas = Image.new("RGB", (224, 224))
    left, top = (224 - width) // 2, (224 - height) // 2
    canvas.paste(photo.resize((width, height), Image.BICUBIC), (left, top))
    official = _normalise(to_tensor(canvas)[0])
    ours = ImageTransform(224, None, longest_pad=True)(to_tensor(photo))[0]
    assert (ours - official).abs().mean() < 0.01
    assert (ours - official).abs().max() < 0.08
    pixels = ImageTransform(224, None, longest_pad=True, mean=(0, 0, 0), std=(1, 1, 1))(to_tensor(photo))[0]
    inside = pixels[:, top : top + height, left : left + width]
    assert inside.shape[1:] == (height, width) and float(inside.amax(dim=0).mean()) > 0.05
    assert float(pixels.sum()) == pytest.approx(float(inside.sum()))  # nothing outside the pasted box


def test_center_crop_offsets_follow_each_models_reference():
    """An image 16 x 19 (crop offset 1.5): transformers' CLIPImageProcessor (transformers CLIP,
    PickScore) floors it to column 1 and our transformers-CLIP transform matches the processor's
    output; torchvision's CenterCrop (open_clip, HPS, ImageReward) rounds it to 2 and our open_clip
    transform matches torchvision."""
    from torchvision.transforms import functional as tvf
    from transformers import CLIPImageProcessor

    g = torch.Generator().manual_seed(0)
    image = (torch.rand(1, 3, 16, 19, generator=g) * 255).round() / 255
    processor = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    official = torch.as_tensor(processor(images=_pil(image), return_tensors="pt").pixel_values)
    floor_transform = ImageTransform(16, (16, 16), floor_crop=True)
    torch.testing.assert_close(floor_transform(image), official, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ImageTransform(16, (16, 16))(image), official, atol=1e-3)
    torch.testing.assert_close(ImageTransform(16, (16, 16))(image)[0], _normalise(tvf.center_crop(image[0], [16, 16])))
    assert tvf.center_crop(image[0], [16, 16]).equal(image[0, :, :, 2:18])  # torchvision rounds 1.5 to 2


def test_the_transformers_clip_reward_floors_its_crop(hf_clip):
    from genalign.rewards.clip import TransformersCLIP

    encoder = TransformersCLIP(str(hf_clip), torch.device("cpu"), torch.float32)
    assert encoder.transform.floor_crop


def test_transform_is_differentiable_and_batched():
    images = torch.rand(2, 3, 48, 64, requires_grad=True)
    out = clip_transform(32)(images)
    assert out.shape == (2, 3, 32, 32)
    out[0].sum().backward()
    assert images.grad[0].abs().sum() > 0 and images.grad[1].abs().sum() == 0


# ------------------------------------------------------------------ contract checks


class _Mean(RewardModel):
    name = "mean"

    def score(self, images, prompts, metadata):
        return images.mean(dim=(1, 2, 3))


@pytest.mark.parametrize(
    "images,prompts,match",
    [
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], r"in \[0, 1\].*\(x \+ 1\) / 2"),
        (torch.rand(2, 3, 8, 8), ["a"], "2 images but 1 prompts"),
        (torch.rand(3, 8, 8), ["a"], r"\(B, 3, H, W\)"),
        (torch.rand(2, 3, 8, 8), "a red circle", "sequence of strings"),
        ((torch.rand(2, 3, 8, 8) * 255).byte(), ["a", "b"], "float images"),
    ],
)
def test_bad_inputs_are_explained(images, prompts, match):
    with pytest.raises(RewardInputError, match=match):
        _Mean()(images, prompts)


def test_metadata_length_is_checked():
    with pytest.raises(RewardInputError, match="2 images but 1 metadata rows"):
        _Mean()(torch.rand(2, 3, 8, 8), ["a", "b"], [{}])


# ------------------------------------------------------------------ CLIP (transformers)


def test_transformers_clip_score_matches_clipmodel_logits(hf_clip):
    """CLIPModel's own forward on the official processor's inputs gives logits_per_image =
    logit_scale.exp() * cos; the adapter's score is its diagonal."""
    from transformers import CLIPModel, CLIPProcessor

    reward = load_reward(RewardConfig(name="clip", path=str(hf_clip)))
    images = _images()
    scores, sub = reward(images, PROMPTS)
    model = CLIPModel.from_pretrained(hf_clip).eval()
    processor = CLIPProcessor.from_pretrained(hf_clip)
    inputs = processor(text=PROMPTS, images=_pil(images), return_tensors="pt", padding="max_length", max_length=16)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal()
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(sub["clip"], scores)


def test_shapes_proxy_clip_loads_through_the_clip_adapter():
    """models/shapes/clip is the shapes world's proxy reward; matching prompts score higher."""
    from genalign.shapes.world import evaluation_set, sample_example

    metas = evaluation_set("heldout", per_task=4)[:8]
    images = torch.stack([torch.from_numpy(sample_example(m, seed=i)[0]).permute(2, 0, 1) for i, m in enumerate(metas)])
    prompts = [m["prompt"] for m in metas]
    reward = load_reward(RewardConfig(name="clip", path="models/shapes/clip"))
    matched, _ = reward(images.float(), prompts)
    shuffled, _ = reward(images.float(), prompts[1:] + prompts[:1])
    assert matched.mean() > shuffled.mean() + 1.0


def test_clip_gradients_reach_pixels_and_checkpointing_changes_nothing(hf_clip):
    images = _images(size=40)
    grads = []
    for checkpointing in (False, True):
        reward = load_reward(RewardConfig(name="clip", path=str(hf_clip), gradient_checkpointing=checkpointing))
        pixels = images.clone().requires_grad_(True)
        scores, _ = reward(pixels, PROMPTS)
        scores.sum().backward()
        grads.append(pixels.grad)
        assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
        assert not any(p.requires_grad for p in reward.encoder.parameters())
        assert not reward.encoder.model.training
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


def test_reward_models_are_loaded_once(hf_clip):
    first = load_reward(RewardConfig(name="clip", path=str(hf_clip)))
    second = load_reward(RewardConfig(name="clip", path=str(hf_clip), weight=2.0))
    assert first.encoder is second.encoder


def test_bf16_reward_is_close_to_fp32(hf_clip):
    images = _images()
    fp32, _ = load_reward(RewardConfig(name="clip", path=str(hf_clip)))(images, PROMPTS)
    bf16_reward = load_reward(RewardConfig(name="clip", path=str(hf_clip), dtype="bfloat16"))
    bf16, _ = bf16_reward(images, PROMPTS)
    assert bf16.dtype == torch.float32
    assert next(bf16_reward.encoder.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)


def test_pickscore_takes_tokenizer_and_processor_from_another_repo(hf_clip, tmp_path):
    """PickScore's weights repo has no processor files; they come from options.processor."""
    from transformers import CLIPModel

    weights_only = tmp_path / "pickscore"
    model = CLIPModel.from_pretrained(hf_clip)
    model.save_pretrained(weights_only)
    with pytest.raises(WeightsNotFoundError):
        load_reward(RewardConfig(name="pickscore", path=str(weights_only)))
    reward = load_reward(RewardConfig(name="pickscore", path=str(weights_only), options={"processor": str(hf_clip)}))
    clip_scores, _ = load_reward(RewardConfig(name="clip", path=str(hf_clip)))(_images(), PROMPTS)
    scores, sub = reward(_images(), PROMPTS)
    torch.testing.assert_close(scores, clip_scores)
    assert set(sub) == {"pickscore"}


# ------------------------------------------------------------------ open_clip, HPSv2


def test_open_clip_score_matches_the_model_forward(open_clip_name, tmp_path):
    file = tmp_path / "open_clip_pytorch_model.bin"
    model = save_tiny_open_clip_checkpoint(file, open_clip_name)
    reward = load_reward(RewardConfig(name="clip", path=str(file), options={"model": open_clip_name}))
    images = _images()
    scores, _ = reward(images, PROMPTS)
    import open_clip

    preprocess = open_clip.image_transform(32, is_train=False)
    pixels = torch.stack([preprocess(im) for im in _pil(images)])
    with torch.no_grad():
        image_features, text_features, logit_scale = model(pixels, open_clip.get_tokenizer(open_clip_name)(PROMPTS))
    expected = logit_scale * (image_features * text_features).sum(-1)
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)


def test_hps_score_is_the_cosine_of_the_hps_weights(open_clip_name, tmp_path):
    """HPSv2 = open_clip architecture + the HPS state dict; score = cos(image, text), no scale."""
    import open_clip

    model = save_tiny_open_clip_checkpoint(tmp_path / "HPS_v2.1_compressed.pt", open_clip_name, seed=3)
    reward = load_reward(RewardConfig(name="hps", path=str(tmp_path), options={"model": open_clip_name}))
    images = _images()
    scores, subs = reward(images, PROMPTS)
    assert list(subs) == ["hps_v2.1"]  # logs and reports name the version
    with torch.no_grad():
        image_features, text_features, _ = model(clip_transform(32)(images), open_clip.get_tokenizer(open_clip_name)(PROMPTS))
    torch.testing.assert_close(scores, (image_features * text_features).sum(-1), atol=1e-5, rtol=1e-5)
    assert scores.abs().max() <= 1.0
    pixels = images.clone().requires_grad_(True)
    reward(pixels, PROMPTS)[0].sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0


def test_hps_version_selects_the_checkpoint_file(open_clip_name, tmp_path):
    save_tiny_open_clip_checkpoint(tmp_path / "HPS_v2.1_compressed.pt", open_clip_name)
    with pytest.raises(WeightsNotFoundError, match="HPS_v2_compressed.pt"):
        load_reward(RewardConfig(name="hps", path=str(tmp_path), options={"model": open_clip_name, "version": "v2"}))
    save_tiny_open_clip_checkpoint(tmp_path / "HPS_v2_compressed.pt", open_clip_name)
    v2 = load_reward(RewardConfig(name="hps", path=str(tmp_path), options={"model": open_clip_name, "version": "v2"}))
    assert v2.label == "hps_v2" and list(v2(_images(), PROMPTS)[1]) == ["hps_v2"]
    with pytest.raises(ValueError, match="options.version"):
        load_reward(RewardConfig(name="hps", path=str(tmp_path), options={"version": "v3"}))


# ------------------------------------------------------------------ LAION aesthetic


def test_aesthetic_mlp_loads_and_computes_what_its_layers_say(tmp_path):
    """The published MLP is five affine maps (the dropouts are identity in eval mode): the module's
    output equals the chain W7(W6(W4(W2(W0 x + b0) + b2) + b4) + b6) + b7 computed from its state dict."""
    from safetensors.torch import load_file

    from genalign.rewards.aesthetic import load_mlp

    mlp = load_mlp(str(AESTHETIC_MLP))
    state = load_file(str(AESTHETIC_MLP))
    embeds = torch.nn.functional.normalize(torch.randn(4, 768, generator=torch.Generator().manual_seed(0)), dim=-1)
    x = embeds
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    torch.testing.assert_close(mlp(embeds), x)
    assert not mlp.training and not any(p.requires_grad for p in mlp.parameters())
    # the published torch format (a plain state dict) loads to the same module
    torch.save(state, tmp_path / "sac+logos+ava1-l14-linearMSE.pth")
    torch.testing.assert_close(load_mlp(str(tmp_path / "sac+logos+ava1-l14-linearMSE.pth"))(embeds), x)


def test_aesthetic_score_is_the_mlp_of_the_normalised_clip_embedding(tmp_path):
    from transformers import CLIPModel

    from genalign.rewards.aesthetic import load_mlp

    folder = save_tiny_transformers_clip(tmp_path / "clip-l", projection_dim=768)
    reward = load_reward(RewardConfig(name="aesthetic", path=str(folder), options={"mlp": str(AESTHETIC_MLP)}))
    images = _images(size=32)
    scores, sub = reward(images, PROMPTS)
    model = CLIPModel.from_pretrained(folder).eval()
    with torch.no_grad():
        embeds = model.get_image_features(pixel_values=clip_transform(32)(images)).pooler_output
        expected = load_mlp(str(AESTHETIC_MLP))(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
    torch.testing.assert_close(scores, expected, atol=1e-5, rtol=1e-5)
    assert set(sub) == {"aesthetic"}
    pixels = images.clone().requires_grad_(True)
    reward(pixels, PROMPTS)[0].sum().backward()
    assert pixels.grad.abs().sum() > 0


def test_missing_weights_name_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="not-a-real/clip-model"):
        load_reward(RewardConfig(name="clip", path="not-a-real/clip-model"))
    with pytest.raises(WeightsNotFoundError, match="HPS_v2.1_compressed.pt"):
        load_reward(RewardConfig(name="hps", path="not-a-real/hps"))
    with pytest.raises(WeightsNotFoundError, match="aesthetic-model.pth"):
        from genalign.rewards.aesthetic import load_mlp

        load_mlp("not-a-real/repo/aesthetic-model.pth")


# ------------------------------------------------------------------ non-differentiable rewards


def test_jpeg_compressibility_is_the_negative_jpeg_size_in_kb():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    images = torch.cat([flat, noise])
    compress, _ = load_reward(RewardConfig(name="jpeg_compressibility"))(images, ["a", "b"])
    incompress, _ = load_reward(RewardConfig(name="jpeg_incompressibility"))(images, ["a", "b"])
    buffer = io.BytesIO()
    Image.fromarray((noise[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=95)
    assert incompress[1].item() == pytest.approx(buffer.tell() / 1000)
    torch.testing.assert_close(compress, -incompress)
    assert compress[0] > compress[1]
    assert not REWARDS.get("jpeg_compressibility").differentiable


def test_shapes_gold_reward_counts_satisfied_clauses():
    """A two-object prompt on an image holding only its first object satisfies 1 of 2 clauses."""
    from genalign.shapes.world import render, sample_example

    meta = {"tag": "two_object", "prompt": "a photo of a circle and a square",
            "include": [{"class": "circle", "count": 1}, {"class": "square", "count": 1}]}
    both, objects = sample_example(meta, seed=0)
    only_first = render([o for o in objects if o.shape == "circle"])
    images = torch.from_numpy(np.stack([both, only_first])).permute(0, 3, 1, 2).float()
    reward = load_reward(RewardConfig(name="shapes_gold"))
    scores, sub = reward(images, [meta["prompt"]] * 2, [meta, meta])
    assert scores.tolist() == [1.0, 0.5]
    assert sub["shapes_strict"].tolist() == [1.0, 0.0]
    strict, _ = load_reward(RewardConfig(name="shapes_gold", options={"score": "strict"}))(images, [meta["prompt"]] * 2)
    assert strict.tolist() == [1.0, 0.0]  # metadata looked up from the world's prompts


# ------------------------------------------------------------------ combinations


class _Constant(RewardModel):
    def __init__(self, name, values, differentiable=True):
        super().__init__()
        self.name, self.values, self.differentiable = name, torch.tensor(values), differentiable

    def score(self, images, prompts, metadata):
        return self.values.clone()


def test_weighted_sum_values_and_subscores():
    a, b = _Constant("a", [1.0, 2.0]), _Constant("b", [10.0, -10.0], differentiable=False)
    total, sub = WeightedSum([a, b], [0.5, 0.1])(torch.rand(2, 3, 4, 4), ["x", "y"])
    assert total.tolist() == pytest.approx([0.5 + 1.0, 1.0 - 1.0])
    assert sub["a"].tolist() == [1.0, 2.0] and sub["b"].tolist() == [10.0, -10.0]
    assert not WeightedSum([a, b], [1, 1]).differentiable and WeightedSum([a, a], [1, 1]).differentiable
    assert set(WeightedSum([a, a], [1, 1])(torch.rand(2, 3, 4, 4), ["x", "y"])[1]) == {"a", "a_2", "weighted_sum"}


def test_ensemble_aggregations_by_hand():
    """Members (1, 3, 8) on image 0: mean 4, worst 1, population variance (9 + 1 + 16) / 3 = 26/3,
    UWO with lambda 0.5: 4 - 13/3. Image 1: (2, 2, 2): all 2, variance 0."""
    members = [_Constant("a", [1.0, 2.0]), _Constant("b", [3.0, 2.0]), _Constant("c", [8.0, 2.0])]
    images, prompts = torch.rand(2, 3, 4, 4), ["x", "y"]
    mean, sub = Ensemble(members, "mean")(images, prompts)
    worst, _ = Ensemble(members, "worst")(images, prompts)
    uwo, _ = Ensemble(members, "uncertainty", uncertainty_weight=0.5)(images, prompts)
    assert mean.tolist() == pytest.approx([4.0, 2.0])
    assert worst.tolist() == pytest.approx([1.0, 2.0])
    assert uwo.tolist() == pytest.approx([4.0 - 13 / 3, 2.0])
    assert sub["ensemble_variance"].tolist() == pytest.approx([26 / 3, 0.0])
    standardised, _ = Ensemble(members[:2], "mean", member_stats=[[1.0, 2.0], [3.0, 1.0]])(images, prompts)
    assert standardised.tolist() == pytest.approx([(0.0 + 0.0) / 2, (0.5 - 1.0) / 2])
    each, _ = Ensemble(members[:2], "mean", member_stats=[[1.0, 2.0], [3.0, 1.0]]).member_scores(images, prompts)
    assert each.flatten().tolist() == pytest.approx([0.0, 0.5, 0.0, -1.0])  # (1-1)/2, (2-1)/2; (3-3)/1, (2-3)/1
    assert each.shape == (2, 2)


def test_rewards_are_selected_by_name_from_a_config(hf_clip, tmp_path):
    from genalign.core.experiment import build_experiment
    from genalign.finetuners import config_classes
    from tests import toy  # noqa: F401  (registers the toy methods)

    data = {
        "method": {"name": "toy_regression"},
        "reward": [{"name": "clip", "path": str(hf_clip), "weight": 2.0}, {"name": "jpeg_compressibility", "weight": 0.5}],
    }
    experiment = build_experiment(data, config_classes(), "test.yaml")
    reward = build_reward(experiment.reward)
    images = _images()
    total, sub = reward(images, PROMPTS)
    torch.testing.assert_close(total, 2.0 * sub["clip"] + 0.5 * sub["jpeg_compressibility"])
    ensemble = build_reward([RewardConfig(name="ensemble", options={
        "aggregate": "worst", "members": [{"name": "clip", "path": str(hf_clip)}, {"name": "jpeg_compressibility"}]})])
    worst, _ = ensemble(images, PROMPTS)
    torch.testing.assert_close(worst, torch.minimum(sub["clip"], sub["jpeg_compressibility"]))
    with pytest.raises(ConfigError, match="unknown reward.name 'pickscor'.*pickscore"):
        build_reward([RewardConfig(name="pickscor")])
    with pytest.raises(ValueError, match="unknown option"):
        build_reward([RewardConfig(name="clip", path=str(hf_clip), options={"modle": "x"})])


# ------------------------------------------------------------------ per-prompt normalisation


def test_per_prompt_stat_tracker_by_hand():
    """min_count 2: the first batch has one reward per prompt, so it uses the batch's statistics
    (mean 2, std 1); the second batch's prompt 'a' then has history (1, 3) -> mean 2, std 1."""
    tracker = PerPromptStatTracker(buffer_size=4, min_count=2)
    first = tracker.update(["a", "b"], torch.tensor([1.0, 3.0]))
    assert first.tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    second = tracker.update(["a"], torch.tensor([3.0]))
    # history of 'a' is now (1, 3): mean 2, population std 1
    assert second.tolist() == pytest.approx([1.0], abs=1e-5)
    restored = PerPromptStatTracker()
    restored.load_state_dict(tracker.state_dict())
    assert restored.update(["a"], torch.tensor([2.0])).tolist() == tracker.update(["a"], torch.tensor([2.0])).tolist()


def test_group_normalisation_without_history():
    """buffer_size 0: GRPO's group statistics; group a = (1, 3) -> (-1, 1), group b = (5, 5) -> (0, 0)."""
    tracker = PerPromptStatTracker(buffer_size=0, min_count=2)
    advantages = tracker.update(["a", "b", "a", "b"], torch.tensor([1.0, 5.0, 3.0, 5.0]))
    assert advantages.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-5)
