"""T2I-CompBench scoring: the official rules on hand-made boxes, counts and depth maps (expected
values worked out in each test's docstring), the rule-based noun-phrase parser on real val
prompts, the file layout, and the plumbing through tiny random BLIP / CLIP / DPT models."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.core.detection import Detection
from genalign.eval.noun_phrases import RuleParser, SpacyParser, Token, load_parser, nouns, without_adjectives
from genalign.eval.report import write_report
from genalign.eval.t2i_compbench import (
    CATEGORIES,
    BlipVqa,
    ClipSimilarity,
    CompBenchModels,
    CompBenchOptions,
    DptDepth,
    ImageEntry,
    blip_questions,
    box_depth,
    complex_kind,
    complex_spatial_objects,
    dedupe_detections,
    detector_frame,
    find_relation,
    generate,
    image_name,
    numeracy_score,
    numeracy_targets,
    object_weighted_score,
    parse_image_name,
    position_score_2d,
    position_score_3d,
    prompt_file,
    read_complex_split,
    read_image_folder,
    read_prompts,
    same_object,
    score_attributes,
    score_folder,
    score_images,
    select_3d_objects,
    spatial_objects,
    three_in_one,
    vocabulary_coverage,
    vqa_question,
)

DATA = Path(__file__).resolve().parents[1] / "genalign" / "data" / "t2i_compbench"
PARSER = RuleParser()


def val_prompts(category: str) -> list[str]:
    return read_prompts(prompt_file(DATA, category))


def save_images(folder: Path, prompts: list[str], per_prompt: int = 10, size: tuple[int, int] = (64, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, prompt in enumerate(prompts):
        for n in range(per_prompt):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / image_name(prompt, i * per_prompt + n))
    return folder


class FakeDetector:
    """Returns fixed detections per label, in pixels of an image of ``size``; records its calls."""

    classes = None

    def __init__(self, by_label: dict[str, list[tuple[float, tuple[float, float, float, float]]]]):
        self.by_label = by_label
        self.calls: list[list[str]] = []

    def detect(self, images, labels=None):
        self.calls.append(list(labels or []))
        return [[Detection(label, score, box) for label in (labels or []) for score, box in self.by_label.get(label, [])]
                for _ in images]


# --- prompts and layout ------------------------------------------------------------------------------


def test_reads_official_prompt_files():
    prompts = val_prompts("color")
    assert len(prompts) == 300 and prompts[0] == "a green bench and a blue bowl"
    assert all(len(val_prompts(c)) >= 299 for c in CATEGORIES)


def test_prompt_file_takes_the_first_tab_field_and_rejects_unknown_categories(tmp_path):
    (tmp_path / "color_val.txt").write_text("a red cup\textra\n\n a blue bowl \n")
    assert read_prompts(prompt_file(tmp_path, "color")) == ["a red cup", "a blue bowl"]
    with pytest.raises(ValueError, match="unknown T2I-CompBench category 'colour'"):
        prompt_file(tmp_path, "colour")
    with pytest.raises(FileNotFoundError, match="shape_val.txt"):
        read_prompts(prompt_file(tmp_path, "shape"))


def test_image_names_give_prompt_and_index():
    assert parse_image_name("a green bench and a blue bowl_000012.png") == ("a green bench and a blue bowl", 12)
    assert parse_image_name("A person is looking at a rainbow._000003.png") == ("A person is looking at a rainbow.", 3)
    assert parse_image_name("snake_case prompt_000007.png") == ("snake_case prompt", 7)  # cut at the last "_"
    assert parse_image_name(image_name("two cats", 41)) == ("two cats", 41)
    for bad in ("a cat.png", "a cat_12a.png", "a cat_000001.txt"):
        with pytest.raises(ValueError, match="not named like"):
            parse_image_name(bad)


def test_folder_layout_ten_images_a_prompt(tmp_path):
    folder = save_images(tmp_path / "spatial" / "samples", ["a dog next to a cat", "a cup on the left of a key"],
                         size=(8, 8))
    (folder / ".DS_Store").write_text("")
    (folder / "a dog next to a cat_000099.partial.png").write_text("")
    entries = read_image_folder(tmp_path / "spatial")
    assert [e.index for e in entries] == list(range(20))
    assert {e.prompt for e in entries[:10]} == {"a dog next to a cat"}
    assert entries[10] == ImageEntry(folder / "a cup on the left of a key_000010.png", "a cup on the left of a key", 10)

    (folder / "a dog next to a cat_000003.png").unlink()
    with pytest.raises(ValueError, match=r"do not have 10 images \('a dog next to a cat': 9\)"):
        read_image_folder(folder)
    assert len(read_image_folder(folder, images_per_prompt=None)) == 19
    (folder / "notes.txt").write_text("")
    with pytest.raises(ValueError, match="'notes.txt' is not named like"):
        read_image_folder(folder, images_per_prompt=None)


def test_generate_writes_the_layout_it_reads(tmp_path):
    """Prompt i's images are numbered i * 10 + n; a second run keeps what is on disk."""
    calls = []

    def generator(prompts, seeds):
        calls.append(len(prompts))
        return torch.rand(len(prompts), 3, 8, 8)

    folder = generate(generator, ["two cats", "a dog next to a cat"], tmp_path / "out", batch_size=4, progress=False)
    entries = read_image_folder(folder)
    assert [(e.prompt, e.index) for e in entries[9:11]] == [("two cats", 9), ("a dog next to a cat", 10)]
    assert sum(calls) == 20
    generate(generator, ["two cats", "a dog next to a cat"], folder, batch_size=4, progress=False)
    assert sum(calls) == 20


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        read_image_folder(tmp_path / "empty")
    folder = save_images(tmp_path / "dup", ["a cat"], per_prompt=1, size=(4, 4))
    Image.new("RGB", (4, 4)).save(folder / "a dog_000000.png")
    with pytest.raises(ValueError, match="index 0 appears twice"):
        read_image_folder(folder, images_per_prompt=None)


# --- 2D position rule --------------------------------------------------------------------------------


def test_position_rule_every_relation():
    """Object 1 at (0, 0, 100, 100), centre (50, 50). Object 2 300 px right (dx = 300, dy = 0):
    object 1 is on its left (1), not right / top / bottom (0). 300 px below (dy = 300): object 1
    is on its top. Next to: |dy| = 0 < 150 -> 1; at dx = dy = 400 -> 150 / 400 = 0.375."""
    one = (0, 0, 100, 100)
    right = (300, 0, 400, 100)
    below = (0, 300, 100, 400)
    far = (400, 400, 500, 500)
    assert position_score_2d("on the left of", one, right) == 1.0
    assert position_score_2d("on the right of", one, right) == 0.0
    assert position_score_2d("on the right of", right, one) == 1.0
    assert position_score_2d("on the top of", one, right) == 0.0
    assert position_score_2d("on the top of", one, below) == 1.0
    assert position_score_2d("on the bottom of", one, below) == 0.0
    assert position_score_2d("on the bottom of", below, one) == 1.0
    for relation in ("next to", "near", "on side of"):
        assert position_score_2d(relation, one, right) == 1.0
        assert position_score_2d(relation, one, far) == pytest.approx(0.375)
    # the official vocabulary has "on top of" but no rule for it; no relation scores 0
    assert position_score_2d("on top of", one, below) == 0.0
    assert position_score_2d(None, one, right) == 0.0


def test_position_rule_iou_penalty_and_dominant_axis():
    """Object 2 at (50, 0, 150, 100): dx = 50 > |dy| = 0, IoU = 5000 / 15000 = 1/3 >= 0.1, so the
    left score is 0.1 / (1/3) = 0.3. Object 2 at (100, 200, 200, 300): dx = 100 < dy = 200, so
    "left of" fails however clear the x order. Just under the IoU threshold the score is 1."""
    one = (0, 0, 100, 100)
    assert position_score_2d("on the left of", one, (50, 0, 150, 100)) == pytest.approx(0.3)
    assert position_score_2d("on the left of", one, (50, 0, 150, 100), iou_threshold=0.5) == 1.0
    assert position_score_2d("on the left of", one, (100, 200, 200, 300)) == 0.0
    assert position_score_2d("on the top of", one, (100, 200, 200, 300)) == 1.0
    # touching boxes: IoU 0 -> 1
    assert position_score_2d("on the left of", one, (100, 0, 200, 100)) == 1.0


def test_confidence_weighting_and_the_2d_floor():
    """Both found: 0.25 * 0.8 + 0.25 * 0.6 + 1 / 2 = 0.85; a wrong position gives 0.35, under the
    2D floor 0.5 -> 0 (3D keeps 0.35); one found: 0.25 * 0.8 = 0.2 (0 in 2D); none: 0."""
    assert object_weighted_score(0.8, 0.6, 1.0, floor=0.5) == pytest.approx(0.85)
    assert object_weighted_score(0.8, 0.6, 0.0, floor=0.5) == 0.0
    assert object_weighted_score(0.8, 0.6, 0.0) == pytest.approx(0.35)
    assert object_weighted_score(0.8, None, 1.0) == pytest.approx(0.2)
    assert object_weighted_score(None, 0.8, 1.0) == pytest.approx(0.2)
    assert object_weighted_score(0.8, None, 1.0, floor=0.5) == 0.0
    assert object_weighted_score(None, None, 1.0) == 0.0
    assert object_weighted_score(1.0, 1.0, 0.0, floor=0.5) == 0.5  # exactly the floor stays


def test_relations_found_in_prompts():
    assert find_relation("a mouse on side of a key", ("on side of", "next to")) == "on side of"
    from genalign.eval.t2i_compbench import SPATIAL_3D_RELATIONS, SPATIAL_RELATIONS

    assert find_relation("a girl on the top of a frog", SPATIAL_RELATIONS) == "on the top of"
    assert find_relation("The red hat was on top of the brown coat rack.", SPATIAL_RELATIONS) == "on top of"
    assert find_relation("a chair hidden by a mouse", SPATIAL_3D_RELATIONS) == "hidden"
    assert find_relation("a dog in front of a desk", SPATIAL_3D_RELATIONS) == "in front of"
    assert find_relation("two boys", SPATIAL_RELATIONS) is None


def test_detector_frame_is_unidets_resize():
    """Resize(size=479, max_size=480): a square goes to 479; 1024 x 512 would be 958 x 479, over
    480, so 480 x int(480 * 479 / 958) = 480 x 240."""
    assert detector_frame(512, 512) == (479, 479)
    assert detector_frame(1024, 1024) == (479, 479)
    assert detector_frame(1024, 512) == (480, 240)
    assert detector_frame(512, 1024) == (240, 480)


# --- 3D rule -----------------------------------------------------------------------------------------


def test_3d_rule_on_a_hand_made_depth_map():
    """Depth (8 x 8): rows 0-3 near (1), rows 4-7 far (0). Box A (0, 0, 4, 4) and B (0, 0, 4, 5):
    IoU = 16 / 20 = 0.8 > 0.5; depth[y, x] means A 1.0, B 16 / 20 = 0.8, so A is in front (1) and
    not behind (0). B (2, 2, 6, 6): IoU = 4 / 28, A in front -> (4 / 28) / 0.5 = 2 / 7. No overlap -> 0."""
    depth = np.zeros((8, 8))
    depth[:4] = 1.0
    a = (0, 0, 4, 4)
    assert position_score_3d("in front of", a, (0, 0, 4, 5), depth, official_lookup=False) == 1.0
    assert position_score_3d("behind", a, (0, 0, 4, 5), depth, official_lookup=False) == 0.0
    assert position_score_3d("hidden", (0, 0, 4, 5), a, depth, official_lookup=False) == 1.0
    assert position_score_3d("in front of", a, (2, 2, 6, 6), depth, official_lookup=False) == pytest.approx(2 / 7)
    assert position_score_3d("in front of", a, (5, 5, 8, 8), depth, official_lookup=False) == 0.0
    assert position_score_3d("on the left of", a, (0, 0, 4, 5), depth) == 0.0
    assert position_score_3d("in front of", a, a, depth) == 0.0  # equal depth: neither order holds


def test_3d_official_lookup_reads_x_as_rows():
    """Rows 0-3 near. Box A (0, 3, 4, 8) (left, lower) and B (3, 0, 8, 4) (right, upper) overlap in one
    pixel (IoU 1 / 39). Read as depth[y, x], A's mean is 4 / 20 (one near row of five) and B's 1, so
    A is behind; the official depth[x, y] reads A as depth[0:4, 3:8] = 1 and B as depth[3:8, 0:4] =
    0.2, so A is in front. Score (1 / 39) / 0.5 = 2 / 39 for the order each lookup sees."""
    depth = np.zeros((8, 8))
    depth[:4] = 1.0
    a, b = (0, 3, 4, 8), (3, 0, 8, 4)
    assert box_depth(depth, a, official_lookup=False) == pytest.approx(0.2)
    assert box_depth(depth, a, official_lookup=True) == pytest.approx(1.0)
    assert position_score_3d("behind", a, b, depth, official_lookup=False) == pytest.approx(2 / 39)
    assert position_score_3d("in front of", a, b, depth, official_lookup=False) == 0.0
    assert position_score_3d("in front of", a, b, depth, official_lookup=True) == pytest.approx(2 / 39)
    assert math.isnan(box_depth(depth, (9, 9, 12, 12)))
    assert position_score_3d("in front of", (9, 9, 12, 12), b, depth) == 0.0


def test_3d_objects_are_picked_as_the_official_loop_does():
    """Labels match by substring ("hot dog" holds "dog"); scanning by confidence until both names
    are seen, the dog keeps its last match before the cat appears: the 0.8 box, not the 0.9 one."""
    dog_a, dog_b = Detection("dog", 0.9, (0, 0, 1, 1)), Detection("hot dog", 0.8, (2, 2, 3, 3))
    cat, late_dog = Detection("cat", 0.7, (4, 4, 5, 5)), Detection("dog", 0.6, (6, 6, 7, 7))
    assert select_3d_objects([late_dog, cat, dog_b, dog_a], "dog", "cat") == (dog_b, cat)
    assert select_3d_objects([late_dog, dog_a], "dog", "cat") == (dog_a, None)
    assert select_3d_objects([cat], "dog", "cat") == (None, cat)
    assert select_3d_objects([], "dog", "cat") == (None, None)


# --- numeracy ----------------------------------------------------------------------------------------


def test_numeracy_targets_on_real_prompts():
    prompts = set(val_prompts("numeracy"))
    expected = {
        "two cups, three paintings, four lamps, and four bananas decorated the art studio":
            [("cup", 2), ("painting", 3), ("lamp", 4), ("banana", 4)],
        "one paddle and three goldfish": [("paddle", 1), ("goldfish", 3)],
        "six people gathered for a picnic": [("person", 6)],  # "a picnic" is not a counted object
        "three mice, three women, four boats, a bird, and four bottles cluttered the shelf":
            [("mouse", 3), ("woman", 3), ("boat", 4), ("bird", 1), ("bottle", 4)],
        "one airplane, two fish and two breads": [("airplane", 1), ("fish", 2), ("bread", 2)],
        "five drums": [("drum", 5)],
    }
    for prompt, targets in expected.items():
        assert prompt in prompts
        assert numeracy_targets(prompt, PARSER) == targets, prompt


def test_numeracy_score_by_hand():
    """Two targets weigh 1/2 each. cup x2 with two cups: 0.25 + 0.25; painting x3 (renamed
    "picture") with two pictures: 0.25 found, wrong count -> total 0.75."""
    assert numeracy_score([("cup", 2), ("painting", 3)], ["cup", "cup", "picture", "picture"]) == pytest.approx(0.75)
    assert numeracy_score([("cup", 2), ("painting", 3)], ["dog"]) == 0.0
    assert numeracy_score([("woman", 2)], ["person", "person", "dog"]) == 1.0
    # a label containing the target name is renamed to it: goldfish -> fish
    assert numeracy_score([("goldfish", 3)], ["goldfish", "goldfish", "goldfish"]) == 1.0
    assert numeracy_score([("bird", 1)], ["bird", "bird"]) == pytest.approx(0.5)
    assert numeracy_score([], ["cup"]) == 0.0


def test_numeracy_duplicates():
    """Inclusive areas: (0, 0, 9, 9) is 100 px, (0, 0, 9, 8) 90 px, overlap 90: IoU 0.9 is not
    > 0.9 but the overlap covers all of the smaller box -> same object. (5, 0, 14, 9) overlaps 50
    of 150 -> another object."""
    assert same_object((0, 0, 9, 9), (0, 0, 9, 8))
    assert not same_object((0, 0, 9, 9), (5, 0, 14, 9))
    kept = dedupe_detections([Detection("cup", 0.7, (0, 0, 9, 8)), Detection("cup", 0.9, (0, 0, 9, 9)),
                              Detection("bowl", 0.8, (0, 0, 9, 9)), Detection("cup", 0.6, (5, 0, 14, 9))])
    assert [(d.label, d.score) for d in kept] == [("cup", 0.9), ("bowl", 0.8), ("cup", 0.6)]


# --- 3-in-1 ------------------------------------------------------------------------------------------


def test_three_in_one_by_hand():
    """attribute 0.6, spatial 0.4, action 0.9: spatial -> 0.5, action -> 0.75, both -> 1.9 / 3."""
    assert three_in_one("spatial", 0.6, 0.4, 0.9) == pytest.approx(0.5)
    assert three_in_one("action", 0.6, 0.4, 0.9) == pytest.approx(0.75)
    assert three_in_one("spatial_action", 0.6, 0.4, 0.9) == pytest.approx(1.9 / 3)
    with pytest.raises(ValueError, match="unknown complex kind"):
        three_in_one("other", 0.6, 0.4, 0.9)


def test_complex_kinds_by_rule_and_by_official_lists(tmp_path):
    prompts = set(val_prompts("complex"))
    rule = {"The red hat was on top of the brown coat rack.": "spatial",
            "The fluffy cat is on the left of the soft pillow.": "spatial",
            "The black phone was resting on the brown charger.": "action",
            "The bright orange pumpkin sat next to the crisp green apples.": "spatial_action",
            "The colorful balloons floated near the shiny silver airplane.": "spatial_action"}
    for prompt, kind in rule.items():
        assert prompt in prompts and complex_kind(prompt) == kind
    (tmp_path / "complex_val_spatial.txt").write_text("The red hat was on top of the brown coat rack.\n")
    (tmp_path / "complex_val_action.txt").write_text("The Black phone was resting on the brown charger\n")
    split = read_complex_split(tmp_path)
    assert complex_kind("The black phone was resting on the brown charger.", split) == "action"  # case, '.' ignored
    assert complex_kind("The red hat was on top of the brown coat rack.", split) == "spatial"
    assert complex_kind("The fluffy cat is on the left of the soft pillow.", split) == "spatial_action"
    assert read_complex_split(tmp_path / "nowhere") is None


# --- noun phrases ------------------------------------------------------------------------------------

# hand-checked chunks of real val prompts (what spaCy's noun_chunks gives on these, pronouns aside)
CHUNKS = {
    "color": {
        "a green bench and a blue bowl": ["a green bench", "a blue bowl"],
        "a red orange and a brown sheep": ["a red orange", "a brown sheep"],
        "A black and white cat sits in a white sink.": ["A black and white cat", "a white sink"],
        "A long, narrow yellow kitchen with black and white floor tiles.":
            ["A long, narrow yellow kitchen", "black and white floor tiles"],
        "two white sheep, a black goat and a white goat in a field":
            ["two white sheep", "a black goat", "a white goat", "a field"],
        "A woman in a white shirt and jeans holds a pink umbrella in the rain.":
            ["A woman", "a white shirt", "jeans", "a pink umbrella", "the rain"],
    },
    "shape": {
        "a pentagonal stop sign and a spherical traffic light": ["a pentagonal stop sign", "a spherical traffic light"],
        "a triangular slice of cheese and a rectangular cheese board":
            ["a triangular slice", "cheese", "a rectangular cheese board"],
        "a cubic book and a cylindrical can of soup": ["a cubic book", "a cylindrical can", "soup"],
    },
    "texture": {
        "rubber sole shoes and fluffy clouds": ["rubber sole shoes", "fluffy clouds"],
        "a metallic desk lamp and a fluffy sweater": ["a metallic desk lamp", "a fluffy sweater"],
        "The wooden spoon and metallic ladle serve the fluffy soup in the plastic bowl.":
            ["The wooden spoon", "metallic ladle", "the fluffy soup", "the plastic bowl"],
        "The leather wallet and fluffy keychain hang on the metallic hook by the wooden door.":
            ["The leather wallet", "fluffy keychain", "the metallic hook", "the wooden door"],
    },
    "complex": {
        "The red hat was on top of the brown coat rack.": ["The red hat", "top", "the brown coat rack"],
        "The fluffy cat is on the left of the soft pillow.": ["The fluffy cat", "the left", "the soft pillow"],
        "The striped black and white cat lay next to the soft grey blanket.":
            ["The striped black and white cat", "the soft grey blanket"],
        "The crisp white sheet covered the lumpy blue mattress.": ["The crisp white sheet", "the lumpy blue mattress"],
        "The rough square was nestled between the smooth rectangle and the bumpy sphere.":
            ["The rough square", "the smooth rectangle", "the bumpy sphere"],
    },
}


@pytest.mark.parametrize("category", sorted(CHUNKS))
def test_rule_chunker_on_real_prompts(category):
    prompts = set(val_prompts(category))
    for prompt, chunks in CHUNKS[category].items():
        assert prompt in prompts
        assert PARSER.noun_chunks(prompt) == chunks, prompt


def test_blip_questions_drop_the_official_exclusions():
    assert blip_questions("The red hat was on top of the brown coat rack.", PARSER) == \
        ["the red hat?", "the brown coat rack?"]
    assert blip_questions("The fluffy cat is on the left of the soft pillow.", PARSER) == \
        ["the fluffy cat?", "the soft pillow?"]
    assert blip_questions("two white sheep, a black goat and a white goat in a field", PARSER, max_phrases=2) == \
        ["two white sheep?", "a black goat?"]
    assert vqa_question('A "tan", clean (bathroom).') == "a tan, clean bathroom?"


def test_objects_of_spatial_and_complex_prompts():
    for category in ("spatial", "3d_spatial"):
        for prompt in val_prompts(category):
            words = prompt.split()
            assert nouns(PARSER, prompt)[0] == words[1] and nouns(PARSER, prompt)[-1] == words[-1], prompt
    assert spatial_objects("a girl on the top of a frog", PARSER) == ("person", "frog")
    assert spatial_objects("a chair hidden by a mouse", PARSER) == ("chair", "mouse")
    # complex: the nearest noun before the phrase, the first noun after it (official)
    assert complex_spatial_objects("The red hat was on top of the brown coat rack.", PARSER) == ("hat", "coat")
    assert complex_spatial_objects("The fluffy cat is on the left of the soft pillow.", PARSER) == ("cat", "pillow")
    assert complex_spatial_objects("The black phone was resting on the brown charger.", PARSER) is None
    assert without_adjectives(PARSER, "The striped rug was on top of the tiled floor.") == \
        "The rug was on top of the floor ."


def test_spacy_parser_adapter_and_fallback(monkeypatch):
    class FakeToken:
        def __init__(self, text, pos, idx):
            self.text, self.pos_, self.idx = text, pos, idx

    class FakeSpan:
        def __init__(self, text):
            self.text = text

    class FakeDoc(list):
        noun_chunks = [FakeSpan("a red Vespa")]

    def nlp(text):
        return FakeDoc([FakeToken("a", "DET", 0), FakeToken("red", "ADJ", 2), FakeToken("Vespa", "PROPN", 6)])

    parser = SpacyParser(nlp)
    assert [(t.text, t.pos, t.start, t.end) for t in parser.tokens("a red Vespa")] == \
        [("a", "DET", 0, 1), ("red", "ADJ", 2, 5), ("Vespa", "PROPN", 6, 11)]
    assert parser.noun_chunks("a red Vespa") == ["a red Vespa"]
    monkeypatch.setitem(sys.modules, "spacy", None)  # spaCy not importable -> the rule parser
    assert isinstance(load_parser(), RuleParser)
    assert isinstance(load_parser(prefer_spacy=False), RuleParser)


class _Tagged:
    """A parser whose tags are given word by word (what spaCy would say), for the official rules."""

    name = "tagged"

    def __init__(self, tags: dict[str, str]):
        self.tags = tags

    def tokens(self, text):
        out, start = [], 0
        for word in text.split():
            start = text.index(word, start)
            out.append(Token(word, self.tags.get(word, "NOUN" if word.islower() and len(word) > 3 else "DET"),
                             start, start + len(word)))
            start += len(word)
        return out

    def noun_chunks(self, text):
        return []


def test_proper_nouns_follow_the_official_rules():
    """2D / 3D objects are NOUNs only (2D_spatial_eval.py: token.pos_ == 'NOUN'); in complex prompts
    the object before the phrase may be a PROPN, and after it a PROPN followed by a non-PROPN
    token stands in when no NOUN follows."""
    tags = {"Vespa": "PROPN", "Rome": "PROPN", "dog": "NOUN", "car": "NOUN", "on": "ADP", "the": "DET", "left": "NOUN",
            "of": "ADP", "a": "DET", "in": "ADP", "parked": "VERB", "today": "NOUN", "sits": "VERB", "near": "ADP",
            "Tower": "PROPN", "Eiffel": "PROPN", ".": "PUNCT"}
    parser = _Tagged(tags)
    assert spatial_objects("a Vespa on the left of a dog", parser) == ("left", "dog")
    assert complex_spatial_objects("a Vespa parked near a car", parser) == ("Vespa", "car")
    assert complex_spatial_objects("a dog sits near Rome .", parser) == ("dog", "Rome")
    assert complex_spatial_objects("a dog sits near Eiffel Tower .", parser) == ("dog", "Tower")
    assert complex_spatial_objects("a dog sits near Rome", parser) is None  # a final PROPN is not taken


def test_vocabulary_coverage_and_closed_vocabularies_searched_whole(tmp_path, tiny_dpt):
    """COCO's 80 classes (Mask2Former's, under GenEval's names) name both objects of 80 of the 300
    official spatial validation prompts; an open vocabulary all of them. The matching is the
    category's: "table" is no COCO class for 2D but lies inside "dining table" for 3D. A
    closed-vocabulary detector is called without labels, so the 3D "table" finds its "dining table";
    the summary states the coverage per category."""
    from genalign.rewards.detection import GENEVAL_CLASSES

    coco = SimpleNamespace(classes=list(GENEVAL_CLASSES))
    spatial = val_prompts("spatial")
    assert vocabulary_coverage("spatial", spatial, coco, PARSER) == (80, 300)
    assert vocabulary_coverage("spatial", spatial, SimpleNamespace(classes=None), PARSER) == (300, 300)
    prompt = ["a dog on the left of a table"]
    assert vocabulary_coverage("spatial", prompt, coco, PARSER) == (0, 1)
    assert vocabulary_coverage("3d_spatial", prompt, coco, PARSER) == (1, 1)

    class Closed(FakeDetector):
        classes = ["dog", "dining table"]

        def detect(self, images, labels=None):
            self.calls.append(labels)
            return [[Detection("dog", 0.9, (0, 0, 10, 10)), Detection("dining table", 0.9, (20, 0, 30, 10))]
                    for _ in images]

    closed = Closed({})
    folder = save_images(tmp_path / "3d_spatial", ["a dog in front of a table"], per_prompt=1, size=(40, 40))
    models = CompBenchModels(detector=closed, depth=tiny_dpt, device="cpu")
    records, summary = score_folder(folder.parent, ["3d_spatial"], models,
                                    CompBenchOptions(images_per_prompt=1), parser=PARSER, progress=False)
    assert closed.calls == [None]
    assert records[0]["details"]["detections"][1] is not None  # "table" found as "dining table"
    assert summary["vocabulary_3d_spatial"] == "1 of 1 prompts' objects the detector can name"


# --- tiny models -------------------------------------------------------------------------------------

BLIP_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "yes", "no", "?", "a", "the", "green", "bench", "blue",
              "bowl", "dog", "cat", "red", "hat", "[DEC]", "[ENC]"]


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> str:
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    config = BlipConfig(
        text_config={"vocab_size": len(BLIP_WORDS), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 2, "max_position_embeddings": 64,
                     "encoder_hidden_size": 32, "bos_token_id": BLIP_WORDS.index("[DEC]"), "pad_token_id": 0,
                     "sep_token_id": 3, "initializer_range": 0.1},  # wide enough that P(yes) moves with the question
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8, "initializer_range": 0.1},
    )
    torch.manual_seed(0)
    BlipForQuestionAnswering(config).save_pretrained(folder)
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(BLIP_WORDS)})
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer
                  ).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    from tests.reward_models import save_tiny_transformers_clip

    return str(save_tiny_transformers_clip(tmp_path_factory.mktemp("clip")))


@pytest.fixture(scope="module")
def tiny_dpt(tmp_path_factory) -> str:
    from transformers import DPTConfig, DPTForDepthEstimation, DPTImageProcessor

    folder = tmp_path_factory.mktemp("dpt")
    config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
                       patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
                       reassemble_factors=[4, 2, 1, 0.5], backbone_out_indices=[0, 1, 2, 3])
    torch.manual_seed(0)
    DPTForDepthEstimation(config).save_pretrained(folder)
    DPTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return str(folder)


def random_image(seed: int, size: tuple[int, int] = (40, 40)) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_blip_p_yes_and_the_product_over_questions(tiny_blip, tmp_path):
    """P(yes) lies in (0, 1) and depends on the question; an image's attribute score is the product
    of the single-question P(yes) (batched with padding or not); the [ENC] token replaces [CLS]."""
    blip = BlipVqa.from_pretrained(tiny_blip, device="cpu", image_size=48)  # 48 != 32: interpolated positions
    assert blip.enc_id == BLIP_WORDS.index("[ENC]")
    image = random_image(0)
    (p_bench, p_bowl), = blip.p_yes([image], [["a green bench?", "the blue bowl?"]])
    assert 0 < p_bench < 1 and 0 < p_bowl < 1 and p_bench != pytest.approx(p_bowl, abs=1e-3)
    assert blip.p_yes([image], [["a green bench?"]])[0][0] == pytest.approx(p_bench, rel=1e-5)
    assert blip.p_yes([image], [["the blue bowl?"]])[0][0] == pytest.approx(p_bowl, rel=1e-5)
    assert blip.p_yes([image, image], [[], ["a green bench?"]]) == [[], [pytest.approx(p_bench, rel=1e-5)]]

    folder = save_images(tmp_path, ["a green bench and the blue bowl"], per_prompt=1, size=(40, 40))
    image.save(next(folder.iterdir()))
    entries = read_image_folder(folder, images_per_prompt=1)
    score, = score_attributes(entries, blip, PARSER, CompBenchOptions())
    assert score.details["questions"] == ["a green bench?", "the blue bowl?"]
    assert score.value == pytest.approx(p_bench * p_bowl, rel=1e-5)


def test_blip_p_yes_is_the_official_vqa_prob(tiny_blip):
    """T2I-CompBench's BLIPvqa_eval/models/blip_vqa.py ``vqa_prob``, written out here on the model's
    own modules: the question's first token replaced by [ENC], the decoder started with [DEC] (30522
    in BLIP's vocabulary), softmax over the vocabulary of the first decoded token, P = p(yes) /
    (p(yes) + p(no)) with the tokenizer's ids of "yes" and "no". Without the [ENC] swap the
    probability differs (so the swap is what the comparison checks). On BLIP's own config the
    decoder start is 30522 and [ENC], which its tokenizer files do not name, is 30523."""
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip import BlipForQuestionAnswering

    blip = BlipVqa.from_pretrained(tiny_blip, device="cpu", image_size=32)  # the tiny model's own size
    model, tokenizer = blip.model, blip.processor.tokenizer
    image, questions = random_image(3), ["a green bench?", "the red hat?", "a dog?"]

    def official(swap: bool) -> list[float]:
        with torch.no_grad():
            pixels = blip.processor.image_processor([image], return_tensors="pt")["pixel_values"]
            embeds = model.vision_model(pixel_values=pixels).last_hidden_state.repeat(len(questions), 1, 1)
            q = tokenizer(questions, padding="longest", truncation=True, max_length=35, return_tensors="pt")
            ids = q.input_ids.clone()
            if swap:
                ids[:, 0] = tokenizer.convert_tokens_to_ids("[ENC]")
            states = model.text_encoder(input_ids=ids, attention_mask=q.attention_mask, encoder_hidden_states=embeds,
                                        encoder_attention_mask=torch.ones(embeds.shape[:-1], dtype=torch.long)
                                        ).last_hidden_state
            start = torch.full((len(questions), 1), tokenizer.convert_tokens_to_ids("[DEC]"))
            logits = model.text_decoder(input_ids=start, encoder_hidden_states=states,
                                        encoder_attention_mask=q.attention_mask).logits[:, 0, :]
            prob = torch.softmax(logits.double(), dim=1)
            yes, no = prob[:, tokenizer.vocab["yes"]], prob[:, tokenizer.vocab["no"]]
            return (yes / (yes + no)).tolist()

    ours = blip.p_yes([image], [questions])[0]
    assert ours == pytest.approx(official(swap=True), abs=1e-6)
    assert max(abs(a - b) for a, b in zip(ours, official(swap=False))) > 1e-4
    assert isinstance(model, BlipForQuestionAnswering)
    real = BlipTextConfig()
    assert real.bos_token_id == 30522 and BlipVqa._enc_token_id(tokenizer.__class__(vocab={"[PAD]": 0, "yes": 1}),
                                                                 real) == 30523


def test_clip_similarity_is_the_models_cosine(tiny_clip):
    """CLIPModel's logits_per_image are logit_scale * cosine: dividing out the scale gives the same
    cosines the scorer computes from the projected features."""
    clip = ClipSimilarity.from_pretrained(tiny_clip, device="cpu")
    images, texts = [random_image(1), random_image(2)], ["a red photo", "a blue square"]
    scores = clip.similarity(images, texts)
    inputs = clip.processor(text=texts, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = clip.model(**inputs).logits_per_image / clip.model.logit_scale.exp()
    assert scores == pytest.approx(torch.diagonal(logits).tolist(), abs=1e-5)
    assert all(-1 <= s <= 1 for s in scores)


def test_dpt_depth_maps(tiny_dpt):
    depth = DptDepth.from_pretrained(tiny_dpt, device="cpu", input_size=48)
    maps = depth.depth_maps([random_image(3, (60, 40)), random_image(4)], [(20, 30), (7, 9)])
    assert [m.shape for m in maps] == [(20, 30), (7, 9)]
    assert all(m.min() >= 0 and m.max() <= 1 for m in maps) and maps[0].min() == 0.0


# --- scoring a folder --------------------------------------------------------------------------------


def test_spatial_folder_with_a_fake_detector(tmp_path):
    """1024 px images go to the 479 px detector frame (scale 479 / 1024). "a dog next to a cat":
    centres 400 px apart in x and y -> 187.1 px in the frame, over 150, so the position is
    150 / 187.109375; the score 0.25 * 0.9 + 0.25 * 0.8 + position / 2. "a cup on the left of a
    key": cup left of key, 0.25 * (0.9 + 0.7) + 0.5 = 0.9; a 0.5 detection is dropped (not > 0.5)."""
    save_images(tmp_path / "spatial" / "samples", ["a dog next to a cat", "a cup on the left of a key"],
                size=(1024, 1024))
    detector = FakeDetector({"dog": [(0.9, (0, 0, 200, 200))], "cat": [(0.8, (400, 400, 600, 600)), (0.5, (0, 0, 9, 9))],
                             "cup": [(0.9, (0, 0, 100, 100)), (0.3, (900, 0, 1000, 100))], "key": [(0.7, (500, 0, 600, 100))]})
    records, summary = score_folder(tmp_path, "spatial", CompBenchModels(detector=detector), progress=False)
    assert detector.calls[0] == ["dog", "cat"] and detector.calls[-1] == ["cup", "key"]
    position = 150 / (400 * 479 / 1024)
    assert [r["score"] for r in records[:10]] == pytest.approx([0.225 + 0.2 + position / 2] * 10)
    assert [r["score"] for r in records[10:]] == pytest.approx([0.9] * 10)
    assert records[0]["details"]["objects"] == ["dog", "cat"] and records[0]["details"]["relation"] == "next to"
    assert summary["tasks"] == {"spatial": pytest.approx((0.425 + position / 2 + 0.9) / 2)}
    assert summary["benchmark"] == "t2i_compbench" and summary["images"] == 20
    assert summary["detector"] == "FakeDetector" and summary["noun_phrases"].startswith("rule-based")
    out = write_report(tmp_path / "report", summary, records)
    assert (out / "report.md").read_text().count("spatial") >= 1


def test_numeracy_and_3d_folders(tmp_path):
    """Numeracy "two cups": three cup boxes above the 0.5 threshold, two on one object -> two cups -> 1.
    3D "a dog in front of a cat", depth near in rows 0-149 (the top): dog (0, 200, 200, 400) lower
    left, cat (150, 0, 350, 250) upper right, overlap 50 x 50, IoU = 2500 / 87500 = 1 / 35. Read as
    depth[y, x] the cat is nearer (position 0); the official depth[x, y] reads the dog as
    depth[0:200, 200:400] = 0.75 and the cat as depth[150:350, 0:250] = 0, so the dog is in front:
    (1 / 35) / 0.5 = 2 / 35. Score 0.25 * 0.8 * 2 + position / 2."""
    save_images(tmp_path / "numeracy", ["two cups"], size=(479, 479))
    save_images(tmp_path / "3d_spatial", ["a dog in front of a cat"], size=(479, 479))
    detector = FakeDetector({"cup": [(0.9, (0, 0, 100, 100)), (0.8, (1, 1, 100, 100)), (0.7, (200, 200, 300, 300)),
                                     (0.5, (400, 400, 450, 450))],  # at the threshold: dropped
                             "dog": [(0.8, (0, 200, 200, 400))], "cat": [(0.8, (150, 0, 350, 250))]})

    class TopNearDepth:
        def depth_maps(self, images, sizes):
            maps = []
            for height, width in sizes:
                depth = np.zeros((height, width))
                depth[:150] = 1.0
                maps.append(depth)
            return maps

    models = CompBenchModels(detector=detector, depth=TopNearDepth())
    records, summary = score_folder(tmp_path, ["numeracy", "3d_spatial"], models, progress=False)
    assert summary["tasks"]["numeracy"] == 1.0
    assert records[0]["details"]["targets"] == [["cup", 2]]
    assert summary["tasks"]["3d_spatial"] == pytest.approx(0.4 + 1 / 35)
    assert list(summary["tasks"]) == ["numeracy", "3d_spatial"]
    assert summary["overall"] == pytest.approx((1.0 + 0.4 + 1 / 35) / 2)
    entries = read_image_folder(tmp_path / "3d_spatial")
    records = score_images("3d_spatial", entries, models, CompBenchOptions(official_depth_lookup=False), progress=False)
    assert [r["score"] for r in records] == pytest.approx([0.4] * 10)


def test_complex_combines_blip_detection_and_clip(tmp_path, tiny_blip, tiny_clip):
    prompts = ["The fluffy cat is on the left of the soft pillow.", "The black phone was resting on the brown charger."]
    save_images(tmp_path / "complex", prompts, per_prompt=2, size=(40, 40))
    detector = FakeDetector({"cat": [(0.9, (0, 0, 10, 10))], "pillow": [(0.9, (20, 0, 30, 10))]})
    models = CompBenchModels(detector=detector, blip=tiny_blip, clip=tiny_clip, device="cpu", blip_image_size=32)
    options = CompBenchOptions(images_per_prompt=2, batch_size=3)
    records, summary = score_folder(tmp_path, ["complex"], models, options, progress=False)
    assert isinstance(models.blip, BlipVqa) and isinstance(models.clip, ClipSimilarity)  # loaded on first use
    assert isinstance(models.depth, str)  # not needed, not loaded
    kinds = [r["details"]["kind"] for r in records]
    assert kinds == ["spatial", "spatial", "action", "action"]
    for record in records:
        d = record["details"]
        assert record["score"] == pytest.approx(three_in_one(d["kind"], d["attribute"], d["spatial"], d["action"]))
    # cat left of pillow in the detector frame: 0.25 * 0.9 * 2 + 1 / 2
    assert records[0]["details"]["spatial"] == pytest.approx(0.95)
    assert records[0]["details"]["clip_text"] == "The cat is on the left of the pillow ."
    assert records[2]["details"]["spatial"] == 0.0  # no spatial phrase: no objects
    assert summary["complex_kinds"].startswith("rule") and summary["blip_model"] == tiny_blip


def test_scoring_errors(tmp_path):
    save_images(tmp_path / "spatial", ["a dog next to a cat"], size=(8, 8))
    with pytest.raises(ValueError, match="unknown T2I-CompBench category 'colour'"):
        score_folder(tmp_path, ["colour"], CompBenchModels(), progress=False)
    with pytest.raises(ValueError, match="needs a detector"):
        score_folder(tmp_path, "spatial", CompBenchModels(), progress=False)
    with pytest.raises(FileNotFoundError, match="color"):
        score_folder(tmp_path, "color", CompBenchModels(), progress=False)
    broken = next((tmp_path / "spatial").iterdir())
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=re.escape(f"image {broken} does not decode")):
        score_images("spatial", read_image_folder(tmp_path / "spatial"),
                     CompBenchModels(detector=FakeDetector({})), progress=False)


SHAPES_SD = Path(__file__).resolve().parent.parent / "models" / "shapes" / "sd"


def test_cli_generates_the_layout_and_scores_it(tmp_path, tiny_clip, capsys):
    """`genalign eval t2i-compbench --generate --score` end to end: the shapes SD writes the official
    layout from a prompt file, the CLIP scorer scores it, the report equals the model's cosine."""
    from genalign.cli import main
    from genalign.eval.report import load_summary

    data = tmp_path / "dataset"
    data.mkdir()
    (data / "non_spatial_val.txt").write_text("a photo of a red circle\na photo of two squares\n")
    args = ["eval", "t2i-compbench", "--generate", str(tmp_path / "run"), "--data-dir", str(data),
            "--category", "non_spatial", "--images-per-prompt", "2", "--backbone", str(SHAPES_SD), "--steps", "2",
            "--guidance-scale", "2", "--score", str(tmp_path / "run"), "--clip", tiny_clip, "--device", "cpu"]
    assert main(args) == 0
    names = sorted(p.name for p in (tmp_path / "run" / "non_spatial").iterdir())
    assert names == ["a photo of a red circle_000000.png", "a photo of a red circle_000001.png",
                     "a photo of two squares_000002.png", "a photo of two squares_000003.png"]
    summary = load_summary(tmp_path / "run" / "results")
    clip = ClipSimilarity.from_pretrained(tiny_clip, "cpu")
    images = [Image.open(tmp_path / "run" / "non_spatial" / n).convert("RGB") for n in names]
    expected = np.mean(clip.similarity(images, [n.rsplit("_", 1)[0] for n in names]))
    assert summary["tasks"]["non_spatial"] == pytest.approx(expected, abs=1e-5)
    assert "| non_spatial |" in capsys.readouterr().out
    assert main(["eval", "t2i-compbench", "--score", str(tmp_path / "run"), "--category", "colour"]) == 2
