"""Object detectors and GenEval's colour classifier on transformers models, fitting the contract of
:mod:`genalign.core.detection` (GenEval, T2I-CompBench and the detector rewards take them as objects).

- :class:`Mask2FormerDetector` (``mask2former``, the default): closed vocabulary, the 80 COCO
  classes under GenEval's names, instance masks. GenEval's own detector is mmdetection's
  Mask2Former Swin-S COCO instance model; this one is the transformers port of the original
  (detectron2) Swin-S COCO instance weights, run at GenEval's test scale (shortest side 800) with
  masks scored at the image size, so GenEval numbers can differ slightly from the official ones
  through the weights (see the class docstring).
- :class:`OWLv2Detector` (``owlv2``): open vocabulary, boxes only, text queries per call.
- :class:`ClipColorClassifier`: GenEval's colour check, zero-shot CLIP ViT-L/14 on the object's
  masked crop (djghosh13/geneval ``evaluation/evaluate_images.py``, ``color_classification``).

Select them with :func:`load_detector` and :func:`load_color_classifier`; weights load by hub id
or local folder (transformers prefers ``*.safetensors``; no remote code is ever run).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from genalign.core.detection import Detection, mask_to_box
from genalign.core.geneval import COLORS
from genalign.core.loading import from_pretrained_or_explain
from genalign.rewards.base import DTYPES, cached, freeze

# GenEval's class names (evaluation/object_names.txt): COCO's 80 in COCO order, with three
# spelled out ("computer mouse", "tv remote", "computer keyboard")
GENEVAL_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock",
    "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)

# Other spellings of those classes in checkpoints' id2label: the COCO / detectron2 names that
# transformers' COCO configs use (mouse, remote, keyboard), Pascal-VOC-style names, common variants
LABEL_ALIASES: dict[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "television": "tv",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "hair dryer": "hair drier",
    "brocolli": "broccoli",
    "doughnut": "donut",
    "cellphone": "cell phone",
    "mobile phone": "cell phone",
    "ball": "sports ball",
}

# GenEval's colour prompts: {c} is the colour, {classname} the object's class
COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {c} {classname}",
    "a photo of a {c}-colored {classname}",
    "a photo of a {c} object",
)
GENEVAL_BACKGROUND = (153, 153, 153)  # GenEval's default bgcolor "#999" behind the masked object

def geneval_name(label: str) -> str:
    """A checkpoint's class name under GenEval's spelling; names outside COCO's 80 stay as they are."""
    key = " ".join(label.strip().lower().replace("_", " ").split())
    if key in GENEVAL_CLASSES:
        return key
    return LABEL_ALIASES.get(key, label)


def label_map(id2label: Mapping[int, str]) -> dict[str, str]:
    """{checkpoint label: GenEval name} for a checkpoint's ``id2label``."""
    return {str(label): geneval_name(str(label)) for label in id2label.values()}


def _batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _check_finite(what: str, model: Any, *tensors: Tensor) -> None:
    """Non-finite outputs would silently detect nothing: say so, with the usual cause."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise FloatingPointError(
            f"{what} gave non-finite outputs in {model.dtype} on {model.device} (Mask2Former's deformable "
            "attention does so in bfloat16 on CPU); load it with dtype='float32'"
        )


def _rgb(image: Any) -> Image.Image:
    if not isinstance(image, Image.Image):
        raise TypeError(f"detectors take PIL images, got {type(image).__name__}")
    return image if image.mode == "RGB" else image.convert("RGB")


class Mask2FormerDetector:
    """Mask2Former instance segmentation (Cheng et al. 2022) as a closed-vocabulary detector, run
    as GenEval runs it (mmdetection's Mask2Former test pipeline and ``MaskFormerFusionHead
    .instance_postprocess``):

    - the image is resized with its aspect ratio to shortest side ``shortest_edge`` (800), the
      longest at most ``longest_edge`` (1333), bilinear, ImageNet-normalised;
    - mask logits are bilinearly upsampled to the padded input, the padding is cut off and they are
      bilinearly resized to the original image, where everything below is computed;
    - the top ``num_queries`` (query, class) pairs by softmax class probability (no-object column
      dropped; mmdetection's ``max_per_image`` 100 is the model's 100 queries), score = class
      probability x mean sigmoid mask probability over the pixels whose logit is > 0, binary mask =
      logit > 0, ``box = mask_to_box(mask)`` (x2, y2 exclusive, as ``mask2bbox``), the class under
      GenEval's name (:func:`geneval_name`); instances at or below ``min_score`` (0.05, far below
      GenEval's 0.3 / 0.9, which the caller applies) or with an empty mask are dropped.

    Two differences remain: the weights are the transformers port of the detectron2-trained Swin-S
    COCO release (GenEval's are mmdetection's own training), and transformers' processor rounds
    the resized size to a multiple of 32 where mmdetection pads to it (the same for square 512 and
    1024 px images: 800 x 800). ``scale`` names the setting for reports.
    """

    default_path = "facebook/mask2former-swin-small-coco-instance"

    def __init__(self, model: Any, processor: Any, min_score: float = 0.05, batch_size: int = 8,
                 shortest_edge: int = 800, longest_edge: int = 1333):
        if not 0.0 <= min_score < 1.0:
            raise ValueError(f"mask2former: min_score must be in [0, 1), got {min_score}")
        if batch_size < 1:
            raise ValueError(f"mask2former: batch_size must be >= 1, got {batch_size}")
        if not 32 <= shortest_edge <= longest_edge:
            raise ValueError(f"mask2former: need 32 <= shortest_edge <= longest_edge, got {shortest_edge}, {longest_edge}")
        self.model = model
        self.processor = processor
        self.min_score = float(min_score)
        self.batch_size = int(batch_size)
        self.shortest_edge, self.longest_edge = int(shortest_edge), int(longest_edge)
        id2label = model.config.id2label
        self.label_names = [geneval_name(str(id2label[i])) for i in range(len(id2label))]
        self.classes: Sequence[str] | None = list(dict.fromkeys(self.label_names))

    @property
    def scale(self) -> str:
        """The test scale, for reports."""
        return f"shortest side {self.shortest_edge}, longest at most {self.longest_edge}; masks scored at the image size"

    def detect(self, images: Sequence[Any], labels: Sequence[str] | None = None) -> list[list[Detection]]:
        """Per image its instances; with ``labels``, only those classes (names outside the
        vocabulary find nothing, as for every closed-vocabulary detector)."""
        wanted = None if labels is None else set(labels)
        rgb = [_rgb(im) for im in images]
        found: list[list[Detection] | None] = [None] * len(rgb)
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, im in enumerate(rgb):  # batches never mix sizes: no padding, as GenEval's one image a call
            by_size.setdefault(im.size, []).append(i)
        for indices in by_size.values():
            for chunk in _batches(indices, self.batch_size):
                for i, detections in zip(chunk, self._detect_batch([rgb[i] for i in chunk], wanted)):
                    found[i] = detections
        return [f if f is not None else [] for f in found]

    @torch.no_grad()
    def _detect_batch(self, images: Sequence[Image.Image], wanted: set[str] | None) -> list[list[Detection]]:
        size = {"shortest_edge": self.shortest_edge, "longest_edge": self.longest_edge}
        inputs = self.processor(images=list(images), size=size, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.model.device, self.model.dtype)  # (B, 3, Hpad, Wpad)
        pixel_mask = inputs["pixel_mask"].to(self.model.device)
        outputs = self.model(pixel_values=pixels, pixel_mask=pixel_mask)
        class_logits = outputs.class_queries_logits.float()  # (B, Q, K + 1)
        mask_logits = outputs.masks_queries_logits.float()  # (B, Q, Hpad / 4, Wpad / 4)
        _check_finite("mask2former", self.model, class_logits, mask_logits)
        found = []
        for b, image in enumerate(images):
            valid = pixel_mask[b].bool()
            height, width = int(valid.any(dim=1).sum()), int(valid.any(dim=0).sum())  # the resized image
            found.append(self._instances(class_logits[b], mask_logits[b], tuple(pixels.shape[-2:]), (height, width),
                                         (image.height, image.width), wanted))
        return found

    def _instances(self, class_logits: Tensor, mask_logits: Tensor, padded: tuple[int, int], resized: tuple[int, int],
                   original: tuple[int, int], wanted: set[str] | None) -> list[Detection]:
        probs = class_logits.softmax(-1)[:, :-1]  # (Q, K)
        num_queries, num_classes = probs.shape
        top, index = probs.flatten().topk(num_queries)
        logits = torch.nn.functional.interpolate(mask_logits[None], size=padded, mode="bilinear", align_corners=False)
        logits = logits[:, index // num_classes, : resized[0], : resized[1]]
        logits = torch.nn.functional.interpolate(logits, size=original, mode="bilinear", align_corners=False)[0]
        binary = logits > 0  # (Q, H, W)
        mask_prob = (logits.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
        scores = (top * mask_prob).tolist()
        detections = []
        for q in range(num_queries):
            label = self.label_names[int(index[q]) % num_classes]
            if scores[q] <= self.min_score or (wanted is not None and label not in wanted):
                continue
            mask = binary[q].cpu().numpy()
            if mask.any():
                detections.append(Detection(label, float(scores[q]), mask_to_box(mask), mask))
        return sorted(detections, key=lambda d: -d.score)


class OWLv2Detector:
    """OWLv2 (Minderer et al. 2023, "Scaling Open-Vocabulary Object Detection") as an
    open-vocabulary detector: boxes only (``mask=None``).

    Text queries: the ``labels`` given to :meth:`detect`, else ``queries`` (default GenEval's 80
    classes), each written into ``template`` (default ``"a photo of a {}"``, the prompt form of
    transformers' OWLv2 examples; ``"{}"`` queries the bare name). Each box gets the query of its
    highest logit, score = sigmoid of that logit (transformers' ``post_process_object_detection``),
    kept above ``min_score`` (default 0.1). OWLv2 predicts one box per image patch, so one object
    gets several near-identical boxes: class-wise NMS at IoU ``nms_iou`` (default 0.5; 1.0 turns it
    off) keeps the best, which GenEval's counting needs. These scores are not calibrated like
    Mask2Former's, so GenEval's thresholds (0.3, 0.9) mean something else here.

    Geometry: the processor pads each image at the bottom / right to a square of side max(H, W)
    before resizing, so normalised boxes scale by that side on both axes; boxes are then clipped
    to the image and those left empty (entirely in the padding) dropped.
    """

    default_path = "google/owlv2-base-patch16-ensemble"

    def __init__(self, model: Any, processor: Any, queries: Sequence[str] = GENEVAL_CLASSES,
                 template: str = "a photo of a {}", min_score: float = 0.1, nms_iou: float = 0.5,
                 batch_size: int = 4):
        if "{}" not in template:
            raise ValueError(f"owlv2: template must contain '{{}}' for the class name, got {template!r}")
        if not 0.0 <= min_score < 1.0 or not 0.0 < nms_iou <= 1.0:
            raise ValueError(f"owlv2: min_score must be in [0, 1) and nms_iou in (0, 1], got {min_score}, {nms_iou}")
        if batch_size < 1 or not queries:
            raise ValueError("owlv2: batch_size must be >= 1 and queries non-empty")
        self.model = model
        self.processor = processor
        self.queries = [str(q) for q in queries]
        self.template = template
        self.min_score = float(min_score)
        self.nms_iou = float(nms_iou)
        self.batch_size = int(batch_size)
        self.classes: Sequence[str] | None = None

    def detect(self, images: Sequence[Any], labels: Sequence[str] | None = None) -> list[list[Detection]]:
        names = list(dict.fromkeys(labels)) if labels is not None else self.queries
        if not names:
            return [[] for _ in images]
        found: list[list[Detection]] = []
        for chunk in _batches([_rgb(im) for im in images], self.batch_size):
            found.extend(self._detect_batch(chunk, names))
        return found

    @torch.no_grad()
    def _detect_batch(self, images: Sequence[Image.Image], names: list[str]) -> list[list[Detection]]:
        from torchvision.ops import batched_nms

        texts = [self.template.format(name) for name in names]
        inputs = self.processor(text=[texts] * len(images), images=list(images), return_tensors="pt")
        device = self.model.device
        outputs = self.model(input_ids=inputs["input_ids"].to(device),
                             attention_mask=inputs["attention_mask"].to(device),
                             pixel_values=inputs["pixel_values"].to(device, self.model.dtype))
        outputs = SimpleNamespace(logits=outputs.logits.float(),  # (B, patches, queries)
                                  pred_boxes=outputs.pred_boxes.float())  # (B, patches, 4) cx, cy, w, h in [0, 1]
        _check_finite("owlv2", self.model, outputs.logits, outputs.pred_boxes)
        # the padded square's side on both axes (older transformers scaled y by the height instead)
        sides = [(max(im.size),) * 2 for im in images]
        results = self.processor.image_processor.post_process_object_detection(
            outputs, threshold=self.min_score, target_sizes=sides)
        found = []
        for image, result in zip(images, results):
            boxes = result["boxes"].clone()  # (N, 4) x1, y1, x2, y2 in pixels
            boxes[:, 0::2] = boxes[:, 0::2].clamp(0, image.width)
            boxes[:, 1::2] = boxes[:, 1::2].clamp(0, image.height)
            scores, label_ids = result["scores"], result["labels"]
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, scores, label_ids = boxes[keep], scores[keep], label_ids[keep]
            if self.nms_iou < 1.0 and len(boxes):
                kept = batched_nms(boxes, scores, label_ids, self.nms_iou)
                boxes, scores, label_ids = boxes[kept], scores[kept], label_ids[kept]
            order = torch.argsort(scores, descending=True)
            found.append([Detection(names[int(label_ids[i])], float(scores[i]),
                                    tuple(float(v) for v in boxes[i].tolist()))  # type: ignore[arg-type]
                          for i in order.tolist()])
        return found


def color_crop(image: Image.Image, box: Sequence[float], mask: np.ndarray | None = None,
               background: tuple[int, int, int] = GENEVAL_BACKGROUND) -> Image.Image:
    """GenEval's ``ImageCrops`` item: the image with everything outside ``mask`` painted
    ``background`` (when there is a mask), cropped to ``box`` (PIL's crop, which rounds the
    coordinates; grown to at least one pixel so a degenerate box still gives an image)."""
    image = _rgb(image)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (image.height, image.width):
            raise ValueError(f"mask of shape {mask.shape} for an image of (H, W) = {(image.height, image.width)}")
        pixels = np.asarray(image)  # (H, W, 3) uint8
        image = Image.fromarray(np.where(mask[..., None], pixels, np.asarray(background, dtype=np.uint8)))
    x1, y1, x2, y2 = (round(float(v)) for v in box[:4])
    x1, y1 = min(max(x1, 0), image.width - 1), min(max(y1, 0), image.height - 1)
    return image.crop((x1, y1, max(x2, x1 + 1), max(y2, y1 + 1)))


def zero_shot_weights(text_embeds: Tensor) -> Tensor:
    """clip_benchmark's ``zero_shot_classifier`` (as GenEval calls it): text embeddings
    (classes, templates, D) -> one unit vector per class (classes, D): each template's embedding
    normalised, averaged over the templates, normalised again."""
    unit = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    mean = unit.mean(dim=1)
    return mean / mean.norm(dim=-1, keepdim=True)


class ClipColorClassifier:
    """GenEval's colour check: each detection's masked crop (:func:`color_crop`) is classified
    zero-shot among ``COLORS`` by CLIP with GenEval's three templates (:data:`COLOR_TEMPLATES`);
    logits = normalised image embedding . :func:`zero_shot_weights` (clip_benchmark's
    ``run_classification``; its factor 100 does not change the argmax).

    ``encoder``: a :class:`genalign.rewards.clip.TransformersCLIP` (``openai/clip-vit-large-patch14``
    are the weights of open_clip's ViT-L-14 ``openai`` that GenEval loads); crops are preprocessed
    by its tensor transform (bicubic resize of the short side to 224, centre crop, CLIP
    normalisation, as open_clip's PIL pipeline). The per-class text classifier is cached.
    """

    def __init__(self, encoder: Any, batch_size: int = 16, background: tuple[int, int, int] = GENEVAL_BACKGROUND):
        if batch_size < 1:
            raise ValueError(f"color classifier: batch_size must be >= 1, got {batch_size}")
        self.encoder = encoder
        # GenEval crops with open_clip's torchvision pipeline, which rounds the centre-crop offset (the
        # shared transformers encoder floors it, as its image processor does)
        self.transform = dataclasses.replace(encoder.transform, floor_crop=False)
        self.batch_size = int(batch_size)
        red, green, blue = background
        self.background = (int(red), int(green), int(blue))
        self.colors: tuple[str, ...] = tuple(COLORS)
        self._classifiers: dict[str, Tensor] = {}

    @torch.no_grad()
    def text_classifier(self, classname: str) -> Tensor:
        """(colours, D) unit vectors for ``classname``, built once."""
        if classname not in self._classifiers:
            texts = [t.format(c=c, classname=classname) for c in self.colors for t in COLOR_TEMPLATES]
            embeds = self.encoder.text_embeds(texts).float()  # (colours * templates, D)
            self._classifiers[classname] = zero_shot_weights(embeds.view(len(self.colors), len(COLOR_TEMPLATES), -1))
        return self._classifiers[classname]

    @torch.no_grad()
    def image_embeds(self, crops: Sequence[Image.Image]) -> Tensor:
        """(N, D) CLIP image embeddings of PIL crops of any sizes, in batches."""
        chunks = []
        for chunk in _batches(list(crops), self.batch_size):
            pixels = torch.cat([self.transform(_pil_to_tensor(c).to(self.encoder.model.device))
                                for c in chunk])  # (b, 3, 224, 224)
            features = self.encoder.model.get_image_features(pixel_values=pixels.to(self.encoder.dtype))
            chunks.append(getattr(features, "pooler_output", features).float())
            _check_finite("the colour classifier's CLIP", self.encoder.model, chunks[-1])
        return torch.cat(chunks)

    def classify(self, image: Any, detections: Sequence[Detection], classname: str) -> list[str]:
        if not detections:
            return []
        crops = [color_crop(image, d.box, d.mask, self.background) for d in detections]
        features = self.image_embeds(crops)
        features = features / features.norm(dim=-1, keepdim=True)
        logits = features @ self.text_classifier(classname).to(features.device).T  # (N, colours)
        return [self.colors[i] for i in logits.argmax(dim=-1).tolist()]


def _pil_to_tensor(image: Image.Image) -> Tensor:
    """(1, 3, H, W) float in [0, 1], as torchvision's ToTensor."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float() / 255


DETECTORS: dict[str, type[Mask2FormerDetector] | type[OWLv2Detector]] = {
    "mask2former": Mask2FormerDetector, "owlv2": OWLv2Detector}
DETECTOR_OPTIONS = {
    "mask2former": ("min_score", "batch_size", "shortest_edge", "longest_edge"),
    "owlv2": ("queries", "template", "min_score", "nms_iou", "batch_size"),
}


def _dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def _load_mask2former(path: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

    hint = "Set the detector path to a local folder holding a transformers Mask2Former checkpoint, or download it"
    model = from_pretrained_or_explain(Mask2FormerForUniversalSegmentation, path, dtype=dtype, hint=hint)
    processor = from_pretrained_or_explain(AutoImageProcessor, path, hint=hint)
    return freeze(model).to(device), processor


def _load_owlv2(path: str, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any]:
    from transformers import Owlv2ForObjectDetection, Owlv2Processor

    hint = "Set the detector path to a local folder holding a transformers OWLv2 checkpoint, or download it"
    model = from_pretrained_or_explain(Owlv2ForObjectDetection, path, dtype=dtype, hint=hint)
    processor = from_pretrained_or_explain(Owlv2Processor, path, hint=hint)
    return freeze(model).to(device), processor


def load_detector(name: str, path: str | None = None, device: str | torch.device = "cpu", dtype: str = "float32",
                  **options: Any) -> Mask2FormerDetector | OWLv2Detector:
    """A detector by name (``mask2former`` or ``owlv2``) on weights ``path`` (hub id or local
    folder; None: the default checkpoint). The model is loaded once per (name, path, device,
    dtype); ``options`` are the detector's keyword arguments (unknown ones are errors).
    Missing weights raise :class:`genalign.core.loading.WeightsNotFoundError` (a FileNotFoundError)."""
    if name not in DETECTORS:
        raise ValueError(f"unknown detector {name!r}; available: {', '.join(sorted(DETECTORS))}")
    unknown = sorted(set(options) - set(DETECTOR_OPTIONS[name]))
    if unknown:
        raise ValueError(f"detector {name}: unknown option(s) {unknown}; known: {', '.join(DETECTOR_OPTIONS[name])}")
    cls = DETECTORS[name]
    path = path or cls.default_path
    device = torch.device(device)
    torch_dtype = _dtype(dtype)
    loader = _load_mask2former if name == "mask2former" else _load_owlv2
    model, processor = cached(("detector", name, path, str(device), torch_dtype),
                              lambda: loader(path, device, torch_dtype))
    return cls(model, processor, **options)


def load_color_classifier(path: str | None = None, device: str | torch.device = "cpu", dtype: str = "float32",
                          **options: Any) -> ClipColorClassifier:
    """GenEval's colour classifier on a transformers CLIP (default ``openai/clip-vit-large-patch14``),
    sharing the encoder with the CLIP reward when both load the same weights. ``options``:
    ``batch_size``, ``background`` (RGB behind the masked object, default GenEval's #999999)."""
    from genalign.rewards.clip import TransformersCLIP

    unknown = sorted(set(options) - {"batch_size", "background"})
    if unknown:
        raise ValueError(f"color classifier: unknown option(s) {unknown}; known: background, batch_size")
    path = path or "openai/clip-vit-large-patch14"
    device = torch.device(device)
    torch_dtype = _dtype(dtype)
    # the same key as genalign.rewards.clip.load_encoder, so the CLIP reward's encoder is reused
    encoder = cached(("transformers_clip", path, None, str(device), torch_dtype, False),
                     lambda: TransformersCLIP(path, device, torch_dtype))
    return ClipColorClassifier(encoder, **options)
