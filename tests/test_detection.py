"""Detectors and the colour classifier (rewards/detection.py) on tiny random Mask2Former, OWLv2 and
CLIP checkpoints built here and saved as hub folders, loaded through ``load_detector`` /
``load_color_classifier``; their outputs are checked against the formulas computed by hand from
the raw model outputs."""

from __future__ import annotations

import copy
import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from genalign.core.detection import Detection, box_iou, mask_to_box
from genalign.core.loading import WeightsNotFoundError
from genalign.rewards.base import clear_cache
from genalign.rewards.detection import (
    COLOR_TEMPLATES,
    GENEVAL_BACKGROUND,
    GENEVAL_CLASSES,
    ClipColorClassifier,
    Mask2FormerDetector,
    color_crop,
    geneval_name,
    label_map,
    load_color_classifier,
    load_detector,
    zero_shot_weights,
)
from tests.reward_models import save_tiny_transformers_clip, to_tensor

OBJECT_NAMES = Path(__file__).resolve().parents[1] / "genalign" / "data" / "geneval" / "object_names.txt"
# COCO's 80 classes as transformers' COCO configs (Mask2Former, DETR, ...) spell them in id2label
COCO_ID2LABEL = [
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
]
MOUSE = COCO_ID2LABEL.index("mouse")
WIDE = (48, 40)  # (W, H): non-square on purpose
TALL = (32, 56)


def noise_image(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def char_clip_tokenizer(folder: Path, max_length: int):
    """A character-level CLIPTokenizer whose special tokens come last: OWLv2 treats a query whose
    first id is 0 as padding, so <|startoftext|> must not be id 0 as in the shared tiny tokenizer."""
    from transformers import CLIPTokenizer

    chars = sorted(set(string.ascii_lowercase + string.digits + "-"))
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), model_max_length=max_length)
    assert len(tokenizer) == len(tokens)
    return tokenizer


@pytest.fixture(scope="module")
def mask2former_path(tmp_path_factory) -> str:
    """A tiny Swin Mask2Former with COCO's id2label whose class head prefers "mouse", saved with a
    processor whose size is not GenEval's (the detector must set the test scale itself)."""
    from transformers import (
        Mask2FormerConfig,
        Mask2FormerForUniversalSegmentation,
        Mask2FormerImageProcessor,
        SwinConfig,
    )

    folder = tmp_path_factory.mktemp("mask2former")
    backbone = SwinConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(
        backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=64,
        dim_feedforward=64, encoder_layers=1, decoder_layers=2, num_attention_heads=2, num_queries=10,
        id2label=dict(enumerate(COCO_ID2LABEL)), label2id={n: i for i, n in enumerate(COCO_ID2LABEL)},
    )
    torch.manual_seed(0)
    model = Mask2FormerForUniversalSegmentation(config)
    with torch.no_grad():
        model.class_predictor.bias.zero_()
        model.class_predictor.bias[MOUSE] = 8.0  # confident "mouse" everywhere: scores ~ mean mask prob
    model.save_pretrained(folder)
    Mask2FormerImageProcessor(size={"shortest_edge": 384, "longest_edge": 512}).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def owlv2_path(tmp_path_factory) -> str:
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    folder = tmp_path_factory.mktemp("owlv2")
    tokenizer = char_clip_tokenizer(folder, max_length=32)
    config = Owlv2Config(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 32,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 64, "patch_size": 16},
        projection_dim=32,
    )
    torch.manual_seed(0)
    Owlv2ForObjectDetection(config).save_pretrained(folder)
    Owlv2Processor(image_processor=Owlv2ImageProcessor(size={"height": 64, "width": 64}),
                   tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory) -> str:
    return str(save_tiny_transformers_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module", autouse=True)
def _fresh_model_cache():
    clear_cache()
    yield
    clear_cache()


# --- class names --------------------------------------------------------------------------------

def test_geneval_classes_are_genevals_object_names():
    assert list(GENEVAL_CLASSES) == OBJECT_NAMES.read_text().split("\n")[:80]
    assert len(set(GENEVAL_CLASSES)) == 80


def test_coco_labels_map_one_to_one_onto_geneval_names():
    mapping = label_map(dict(enumerate(COCO_ID2LABEL)))
    assert sorted(mapping.values()) == sorted(GENEVAL_CLASSES)  # all 80, each once
    assert [mapping[n] for n in COCO_ID2LABEL] == list(GENEVAL_CLASSES)  # same order as GenEval's file
    assert {k: v for k, v in mapping.items() if k != v} == {
        "mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard"}


@pytest.mark.parametrize("label,name", [
    ("motorbike", "motorcycle"), ("aeroplane", "airplane"), ("sofa", "couch"), ("tvmonitor", "tv"),
    ("diningtable", "dining table"), ("pottedplant", "potted plant"), ("hair dryer", "hair drier"),
    ("Traffic_Light", "traffic light"), ("tv", "tv"), ("giraffe", "giraffe"), ("unicorn", "unicorn"),
])
def test_other_spellings_map_to_geneval_names(label, name):
    assert geneval_name(label) == name


# --- Mask2Former --------------------------------------------------------------------------------

def reference_instances(path: str, image: Image.Image, min_score: float) -> list[tuple[str, float, np.ndarray]]:
    """GenEval's Mask2Former test pipeline (mmdetection: Resize scale (1333, 800) keep_ratio, then
    ``MaskFormerFusionHead.instance_postprocess``) by hand from the model's raw outputs: the input
    at shortest side 800; mask logits bilinear to the padded input, padding cut, bilinear to the
    image; top-Q (query, class) pairs by softmax probability (no-object column dropped); score =
    class prob x mean sigmoid over the pixels whose logit > 0 at the image size; empty masks dropped."""
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    model = Mask2FormerForUniversalSegmentation.from_pretrained(path).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    inputs = processor(images=[image], size={"shortest_edge": 800, "longest_edge": 1333}, return_tensors="pt")
    valid = inputs["pixel_mask"][0].bool()
    resized = (int(valid.any(1).sum()), int(valid.any(0).sum()))
    short, long = sorted((image.height, image.width))
    scale = min(800 / short, 1333 / long)  # mmdetection's keep-ratio rescale; transformers rounds to /32
    assert abs(min(resized) - scale * short) <= 32 and abs(max(resized) - scale * long) <= 32
    with torch.no_grad():
        out = model(**inputs)
    probs = out.class_queries_logits[0].softmax(-1)[:, :-1]  # (Q, K)
    num_queries, num_classes = probs.shape
    top, index = probs.flatten().topk(num_queries)
    logits = F.interpolate(out.masks_queries_logits, size=tuple(inputs["pixel_values"].shape[-2:]), mode="bilinear",
                           align_corners=False)[0][index // num_classes][:, : resized[0], : resized[1]]
    logits = F.interpolate(logits[None], size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
    binary = (logits > 0).float()
    mask_prob = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    scores = top * mask_prob
    rows = [(model.config.id2label[int(index[q] % num_classes)], float(scores[q]), binary[q].bool().numpy())
            for q in range(num_queries) if binary[q].any() and scores[q] > min_score]
    return sorted(rows, key=lambda r: -r[1])


@pytest.fixture(scope="module")
def mask2former_found(mask2former_path):
    detector = load_detector("mask2former", mask2former_path)
    images = [noise_image(WIDE, 0), noise_image(TALL, 1)]
    return detector, images, detector.detect(images)


def test_mask2former_matches_the_post_processing_formula(mask2former_path, mask2former_found):
    detector, images, found = mask2former_found
    assert detector.classes is not None and sorted(detector.classes) == sorted(GENEVAL_CLASSES)
    assert "800" in detector.scale and "1333" in detector.scale
    for image, detections in zip(images, found):
        expected = reference_instances(mask2former_path, image, detector.min_score)
        assert len(detections) == len(expected) > 0
        for det, (label, score, mask) in zip(detections, expected):
            assert det.label == geneval_name(label) == "computer mouse"
            assert det.score == pytest.approx(score, abs=2e-6)
            assert det.mask.shape == (image.height, image.width)
            assert np.array_equal(det.mask, mask)


def test_mask2former_detections_fit_the_contract(mask2former_found):
    detector, images, found = mask2former_found
    for image, detections in zip(images, found):
        scores = [d.score for d in detections]
        assert scores == sorted(scores, reverse=True)
        for det in detections:
            assert detector.min_score < det.score <= 1.0
            assert det.label in GENEVAL_CLASSES
            assert det.mask.dtype == bool and det.mask.shape == (image.height, image.width) and det.mask.any()
            assert det.box == mask_to_box(det.mask)
            x1, y1, x2, y2 = det.box
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height


def test_mask2former_labels_filter_and_floor(mask2former_path, mask2former_found):
    detector, images, found = mask2former_found
    assert detector.detect(images[:1], labels=["person", "dog"]) == [[]]
    same = detector.detect(images[:1], labels=["computer mouse"])[0]
    assert [(d.label, d.score, d.box) for d in same] == [(d.label, d.score, d.box) for d in found[0]]
    # the floor: everything above it comes back, nothing at or below it
    strict = load_detector("mask2former", mask2former_path, min_score=float(np.median([d.score for d in found[0]])))
    assert 0 < len(strict.detect(images[:1])[0]) < len(found[0])


def test_mask2former_refuses_non_finite_outputs(mask2former_found):
    detector, images, _ = mask2former_found
    broken = copy.deepcopy(detector.model)
    with torch.no_grad():
        broken.class_predictor.bias[3] = float("nan")
    with pytest.raises(FloatingPointError, match="dtype='float32'"):
        Mask2FormerDetector(broken, detector.processor).detect(images[:1])


# --- OWLv2 --------------------------------------------------------------------------------------

def reference_boxes(path: str, images: list[Image.Image], texts: list[str]) -> list[list[tuple[int, float, tuple]]]:
    """Per image and patch: query argmax, sigmoid of its logit, the (cx, cy, w, h) box in units of
    the padded square's side max(H, W), clipped to the image; boxes left empty dropped."""
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    model = Owlv2ForObjectDetection.from_pretrained(path).eval()
    processor = Owlv2Processor.from_pretrained(path)
    inputs = processor(text=[texts] * len(images), images=images, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs)
    rows = []
    for image, logits, boxes in zip(images, out.logits, out.pred_boxes):
        side = max(image.size)
        best, query = logits.max(-1)
        cx, cy, w, h = boxes.unbind(-1)
        corners = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], -1) * side
        corners[:, 0::2] = corners[:, 0::2].clamp(0, image.width)
        corners[:, 1::2] = corners[:, 1::2].clamp(0, image.height)
        keep = (corners[:, 2] > corners[:, 0]) & (corners[:, 3] > corners[:, 1])
        rows.append(sorted(((int(query[i]), float(best[i].sigmoid()), tuple(corners[i].tolist()))
                            for i in torch.nonzero(keep).flatten().tolist()), key=lambda r: -r[1]))
    return rows


def test_owlv2_boxes_land_in_original_pixels(owlv2_path):
    names = ["person", "dog", "computer mouse"]
    detector = load_detector("owlv2", owlv2_path, min_score=0.0, nms_iou=1.0)
    assert detector.classes is None
    images = [noise_image(WIDE, 2), noise_image(TALL, 3)]
    found = detector.detect(images, labels=names)
    expected = reference_boxes(owlv2_path, images, [f"a photo of a {n}" for n in names])
    for image, detections, rows in zip(images, found, expected):
        assert len(detections) == len(rows) > 0
        for det, (query, score, box) in zip(detections, rows):
            assert det.label == names[query] and det.mask is None
            assert det.score == pytest.approx(score, abs=1e-6)
            assert det.box == pytest.approx(box, abs=1e-4)
            x1, y1, x2, y2 = det.box
            assert 0 <= x1 < x2 <= image.width and 0 <= y1 < y2 <= image.height


def test_owlv2_defaults_query_genevals_classes_and_suppress_duplicates(owlv2_path):
    detector = load_detector("owlv2", owlv2_path, min_score=0.0)
    assert detector.queries == list(GENEVAL_CLASSES) and detector.nms_iou == 0.5
    detections = detector.detect([noise_image(WIDE, 4)])[0]
    assert detections and all(d.label in GENEVAL_CLASSES for d in detections)
    for i, a in enumerate(detections):
        for b in detections[i + 1:]:
            if a.label == b.label:
                assert box_iou(a.box, b.box) <= 0.5 + 1e-6


# --- factory errors -----------------------------------------------------------------------------

def test_load_detector_errors_say_what_to_do(tmp_path, mask2former_path):
    with pytest.raises(ValueError, match="unknown detector 'yolo'; available: mask2former, owlv2"):
        load_detector("yolo", None)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['threshold'\]"):
        load_detector("mask2former", mask2former_path, threshold=0.3)
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_detector("mask2former", mask2former_path, dtype="fp8")
    missing = str(tmp_path / "no-such-detector")
    with pytest.raises(WeightsNotFoundError, match="no-such-detector") as err:
        load_detector("owlv2", missing)
    assert isinstance(err.value, FileNotFoundError) and "detector path" in str(err.value)
    with pytest.raises(WeightsNotFoundError, match="no-such-clip"):
        load_color_classifier(str(tmp_path / "no-such-clip"))


# --- colour classifier --------------------------------------------------------------------------

def test_color_crop_paints_genevals_grey_outside_the_mask():
    image = noise_image(WIDE, 5)
    pixels = np.asarray(image)
    mask = np.zeros((40, 48), dtype=bool)
    mask[10:30, 5:20] = True
    mask[15, 8] = False  # a hole inside the box
    crop = np.asarray(color_crop(image, (5, 10, 20, 30), mask))
    assert crop.shape == (20, 15, 3)
    inside = mask[10:30, 5:20]
    assert np.array_equal(crop[inside], pixels[10:30, 5:20][inside])
    assert (crop[~inside] == (153, 153, 153)).all() and GENEVAL_BACKGROUND == (153, 153, 153)
    # no mask: a plain crop; float boxes round as PIL's crop does
    assert np.array_equal(np.asarray(color_crop(image, (4.6, 9.6, 20.4, 30.4))), pixels[10:30, 5:20])
    assert color_crop(image, (7, 7, 7, 7)).size == (1, 1)  # degenerate boxes still give a pixel
    with pytest.raises(ValueError, match="mask of shape"):
        color_crop(image, (0, 0, 4, 4), mask.T)


def test_zero_shot_weights_by_hand():
    """One class, templates (3, 4) and (0, 2): unit vectors (.6, .8) and (0, 1), mean (.3, .9),
    norm sqrt(.9) = .948683, so (.316228, .948683); a second class (1, 0), (5, 0) -> (1, 0)."""
    embeds = torch.tensor([[[3.0, 4.0], [0.0, 2.0]], [[1.0, 0.0], [5.0, 0.0]]])
    expected = torch.tensor([[0.316228, 0.948683], [1.0, 0.0]])
    assert torch.allclose(zero_shot_weights(embeds), expected, atol=1e-6)


@pytest.fixture(scope="module")
def color_classifier(clip_path):
    return load_color_classifier(clip_path, batch_size=2)


def test_text_classifier_is_genevals_template_average(color_classifier):
    encoder = color_classifier.encoder
    weights = color_classifier.text_classifier("apple")
    assert weights.shape == (10, encoder.model.config.projection_dim)
    for row, color in zip(weights, color_classifier.colors):
        texts = [f"a photo of a {color} apple", f"a photo of a {color}-colored apple", f"a photo of a {color} object"]
        assert [t.format(c=color, classname="apple") for t in COLOR_TEMPLATES] == texts
        with torch.no_grad():
            unit = [e / e.norm() for e in (encoder.text_embeds([t])[0] for t in texts)]
        mean = torch.stack(unit).mean(0)
        assert torch.allclose(row, mean / mean.norm(), atol=1e-5)
    assert color_classifier.text_classifier("apple") is weights  # cached per class name


def test_classify_is_argmax_over_masked_crops(color_classifier):
    image = noise_image(WIDE, 6)
    detections = []
    for i, (x1, y1, x2, y2) in enumerate([(0, 0, 20, 30), (10, 5, 48, 40), (30, 20, 40, 28)]):
        mask = np.zeros((40, 48), dtype=bool)
        mask[y1:y2, x1:x2] = True
        mask[y1 + 1 :: 3, x1::2] = False
        detections.append(Detection("apple", 0.9, mask_to_box(mask), mask if i != 2 else None))
    encoder = color_classifier.encoder
    with torch.no_grad():
        feats = torch.cat([encoder.image_embeds(to_tensor(color_crop(image, d.box, d.mask))) for d in detections])
    feats = feats / feats.norm(dim=-1, keepdim=True)
    logits = feats @ color_classifier.text_classifier("apple").T
    expected = [color_classifier.colors[i] for i in logits.argmax(-1).tolist()]
    assert color_classifier.classify(image, detections, "apple") == expected
    assert color_classifier.classify(image, [], "apple") == []
    # the crops really differ: each batch position sees its own object
    assert len({tuple(f.tolist()) for f in feats}) == 3


def test_color_classifier_shares_the_clip_reward_encoder(clip_path, color_classifier):
    from genalign.core.experiment import RewardConfig
    from genalign.rewards.clip import load_encoder

    encoder = load_encoder(RewardConfig(name="clip", path=clip_path), torch.device("cpu"), "unused")
    assert color_classifier.encoder is encoder
    assert isinstance(load_color_classifier(clip_path), ClipColorClassifier)
    # GenEval's colour crops go through open_clip's torchvision transform, which rounds the crop offset,
    # while the shared transformers encoder floors it as its processor does
    classifier = load_color_classifier(clip_path)
    assert classifier.encoder.transform.floor_crop and not classifier.transform.floor_crop
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bgcolor'\]"):
        load_color_classifier(clip_path, bgcolor="#999")


def test_the_geneval_report_names_the_detector_and_its_scale(mask2former_path, clip_path, tmp_path, capsys):
    """`genalign eval geneval --score` with Mask2Former: scores.json and report.md name the detector,
    its weights and its test scale (shortest side 800, longest 1333)."""
    from genalign.cli import main

    meta = {"tag": "single_object", "include": [{"class": "computer mouse", "count": 1}],
            "prompt": "a photo of a computer mouse"}
    folder = tmp_path / "run" / "00000"
    (folder / "samples").mkdir(parents=True)
    (folder / "metadata.jsonl").write_text(json.dumps(meta))
    noise_image(WIDE, 0).save(folder / "samples" / "00000.png")
    assert main(["eval", "geneval", "--score", str(tmp_path / "run"), "--detector", "mask2former",
                 "--detector-path", mask2former_path, "--clip-path", clip_path, "--device", "cpu"]) == 0
    summary = json.loads((tmp_path / "run" / "results" / "scores.json").read_text())["summary"]
    assert summary["detector"] == "mask2former" and summary["detector_weights"] == mask2former_path
    assert summary["detector_scale"].startswith("shortest side 800, longest at most 1333")
    assert "detector_scale: shortest side 800" in (tmp_path / "run" / "results" / "report.md").read_text()
