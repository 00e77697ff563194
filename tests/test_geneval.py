"""GenEval: its rules on hand-made detections, the official files and layout, the whole path
(generate -> layout -> score -> report) on the shapes world, the GenEval reward, reports and compare."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genalign.cli import main
from genalign.core.detection import Detection, box_iou
from genalign.core.geneval import (
    TASKS,
    GenEvalOptions,
    check_metadata,
    evaluate,
    relative_position,
    select_objects,
    summarise,
)
from genalign.eval import geneval
from genalign.eval.report import compare, load_summary, write_report

ROOT = Path(__file__).resolve().parent.parent
OFFICIAL = ROOT / "genalign" / "data" / "geneval"
SHAPES_SD = ROOT / "models" / "shapes" / "sd"


def det(label: str, score: float = 1.0, box=(0, 0, 10, 10), color: str | None = None) -> Detection:
    return Detection(label, score, tuple(float(v) for v in box), color=color)


# --------------------------------------------------------------------------- rules


def test_select_objects_thresholds_order_and_cap():
    found = [det("dog", 0.3), det("dog", 0.31), det("dog", 0.95), det("cat", 0.2)] + [det("cup", 0.5)] * 20
    objects = select_objects(found, "two_object")
    assert [d.score for d in objects["dog"]] == [0.95, 0.31]  # > 0.3 strictly, most confident first
    assert "cat" not in objects and len(objects["cup"]) == 16  # at most 16 a class
    counting = select_objects(found, "counting")
    assert [d.score for d in counting["dog"]] == [0.95] and "cup" not in counting  # 0.9 for counting
    assert select_objects(found, "counting", GenEvalOptions(counting_threshold=0.4))["cup"][0].score == 0.5


def test_select_objects_overlap_suppression_is_off_by_default():
    a, b, far = det("dog", 0.9, (0, 0, 10, 10)), det("dog", 0.8, (1, 1, 11, 11)), det("dog", 0.7, (50, 50, 60, 60))
    assert len(select_objects([a, b, far], "two_object")["dog"]) == 3
    # inclusive IoU of a and b: 100 / (121 + 121 - 100) = 0.704
    assert box_iou(a.box, b.box, inclusive=True) == pytest.approx(100 / 142)
    kept = select_objects([a, b, far], "two_object", GenEvalOptions(max_overlap=0.7))["dog"]
    assert kept == [a, far]


@pytest.mark.parametrize("box_a,expected", [
    ((-20, 0, -10, 10), {"left of"}),
    ((20, 0, 30, 10), {"right of"}),
    ((0, -20, 10, -10), {"above"}),
    ((0, 20, 10, 30), {"below"}),
    ((20, 20, 30, 30), {"right of", "below"}),  # a diagonal is both
    ((3, 0, 13, 10), set()),  # offset 3 < 0.1 * (10 + 10) * ... -> shrunk to 1, normalised 1/3: nothing
    ((5, 1, 15, 11), {"right of"}),  # offset (5, 1) -> revised (3, 0) / 5.10 = 0.59 > 0.5
])
def test_relative_position_every_relation(box_a, expected):
    assert relative_position(box_a, (0, 0, 10, 10)) == expected


def test_relative_position_threshold_shrinks_the_offset():
    # centres 4 px apart, boxes 10 px wide: shrink 0.1 * 20 = 2 -> 2 / 4 = 0.5, not beyond it
    assert relative_position((4, 0, 14, 10), (0, 0, 10, 10)) == set()
    assert relative_position((4, 0, 14, 10), (0, 0, 10, 10), threshold=0.05) == {"right of"}  # 3 / 4 = 0.75


def test_include_count_and_exclude_clauses():
    meta = {"tag": "counting", "prompt": "a photo of two clocks",
            "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}]}
    assert evaluate({"clock": [det("clock")] * 2}, meta).clauses == (True, True)
    one = evaluate({"clock": [det("clock")]}, meta)
    assert not one.correct and one.reason == "expected clock>=2, found 1"
    three = evaluate({"clock": [det("clock")] * 3}, meta)
    assert three.clauses == (True, False) and three.reason == "expected clock<3, found 3"
    assert three.fraction == 0.5


def test_colour_clause_checks_only_the_first_count_objects():
    meta = {"tag": "color_attr", "prompt": "a photo of a red cup and a blue dog",
            "include": [{"class": "cup", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}]}
    calls = []

    def colors(dets, classname):
        calls.append((classname, len(dets)))
        return [d.color for d in dets]

    objects = {"cup": [det("cup", 0.9, color="red"), det("cup", 0.8, color="green")],
               "dog": [det("dog", 0.9, color="brown"), det("dog", 0.5, color="blue")]}
    verdict = evaluate(objects, meta, colors)
    assert calls == [("cup", 1), ("dog", 1)]  # GenEval classifies only the most confident `count`
    assert verdict.clauses == (True, False)
    assert verdict.reason == "expected blue dog>=1, found 0 blue; and 1 brown"


def test_position_clause_needs_its_target_and_the_relation_to_every_target_object():
    meta = {"tag": "position", "prompt": "a photo of a dog right of a teddy bear",
            "include": [{"class": "teddy bear", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}]}
    bear, dog_right, dog_left = det("teddy bear", box=(0, 0, 10, 10)), det("dog", box=(30, 0, 40, 10)), \
        det("dog", box=(-30, 0, -20, 10))
    assert evaluate({"teddy bear": [bear], "dog": [dog_right]}, meta).correct
    wrong = evaluate({"teddy bear": [bear], "dog": [dog_left]}, meta)
    assert wrong.clauses == (True, False) and wrong.reason == "expected dog right of target, found left of target"
    no_target = evaluate({"dog": [dog_right]}, meta)
    assert no_target.clauses == (False, False)
    assert no_target.reason.splitlines() == ["expected teddy bear>=1, found 0", "no target for dog to be right of"]
    # two target objects: the dog must be right of both
    meta2 = {**meta, "include": [{"class": "teddy bear", "count": 2}, meta["include"][1]]}
    far_bear = det("teddy bear", box=(50, 0, 60, 10))
    assert not evaluate({"teddy bear": [bear, far_bear], "dog": [dog_right]}, meta2).correct


def test_metadata_checks():
    with pytest.raises(ValueError, match="position"):
        check_metadata({"tag": "position", "prompt": "p", "include": [{"class": "a", "count": 1,
                                                                      "position": ["right of", 0]}]})
    with pytest.raises(ValueError, match="tag"):
        check_metadata({"prompt": "p"})


def test_summary_is_the_mean_over_tasks_and_counts_prompts_with_any_correct_image():
    rows = [{"tag": "single_object", "correct": c, "metadata": "A"} for c in (True, True, True, False)]
    rows += [{"tag": "counting", "correct": c, "metadata": m} for c, m in ((False, "B"), (True, "C"), (False, "C"))]
    result = summarise(rows)
    assert result["tasks"] == {"single_object": 0.75, "counting": pytest.approx(1 / 3)}
    assert result["overall"] == pytest.approx((0.75 + 1 / 3) / 2)  # tasks weigh equally, not images
    assert result["correct_images"] == pytest.approx(4 / 7)
    assert result["correct_prompts"] == pytest.approx(2 / 3)  # A and C have a correct image, B none


# --------------------------------------------------------------------------- official files and layout


def test_reads_the_official_metadata():
    rows = geneval.read_metadata(OFFICIAL / "evaluation_metadata.jsonl")
    counts = {task: sum(r["tag"] == task for r in rows) for task in TASKS}
    assert counts == {"single_object": 80, "two_object": 99, "counting": 80, "colors": 94, "position": 100,
                      "color_attr": 100}
    names = set((OFFICIAL / "object_names.txt").read_text().splitlines())
    assert len(names) == 80
    assert {c["class"] for r in rows for c in r.get("include", []) + r.get("exclude", [])} <= names


def test_metadata_errors_name_the_line(tmp_path):
    path = tmp_path / "meta.jsonl"
    path.write_text('{"tag": "single_object", "prompt": "a photo of a cat", "include": [{"class": "cat", "count": 1}]}\n'
                    '{"tag": "single_object", "include": []}\n')
    with pytest.raises(ValueError, match=r"meta.jsonl:2:"):
        geneval.read_metadata(path)


def _write_layout(root: Path, metas, images_per_prompt: int, seed: int = 0) -> None:
    """A GenEval folder as another tool writes it, with the shapes world's ground-truth images."""
    from genalign.shapes.world import sample_example

    for index, meta in enumerate(metas):
        folder = root / f"{index:05d}"
        (folder / "samples").mkdir(parents=True)
        (folder / "metadata.jsonl").write_text(json.dumps(meta))
        for n in range(images_per_prompt):
            image, _ = sample_example(meta, seed * 1000 + index * 10 + n)
            Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / "samples" / f"{n:05d}.png")
        (folder / "grid.png").write_bytes(b"not read")


def test_layout_reader_skips_other_files_and_rejects_broken_ones(tmp_path):
    from genalign.shapes.world import evaluation_set

    metas = evaluation_set("heldout", per_task=1)
    _write_layout(tmp_path / "run", metas, 2)
    (tmp_path / "run" / "notes").mkdir()
    (tmp_path / "run" / "00000" / "samples" / "preview.png").write_bytes(b"x")
    prompts = geneval.read_layout(tmp_path / "run")
    assert [m for m, _ in prompts] == metas
    assert [p.name for p in prompts[0][1]] == ["00000.png", "00001.png"]
    (tmp_path / "run" / "00001" / "samples" / "00001.png").write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"00001/samples/00001.png does not decode"):
        geneval.score_folder(tmp_path / "run", _shapes_detector(), progress=False)
    (tmp_path / "run" / "00002" / "metadata.jsonl").unlink()
    with pytest.raises(ValueError, match="has no metadata.jsonl"):
        geneval.read_layout(tmp_path / "run")


def _shapes_detector():
    from genalign.shapes.evaluator import ShapesDetector

    return ShapesDetector()


def test_ground_truth_scores_one_through_the_whole_scorer(tmp_path):
    from genalign.shapes.world import evaluation_set

    metas = evaluation_set("heldout", per_task=3)
    _write_layout(tmp_path / "gt", metas, 2)
    rows, records = geneval.score_folder(tmp_path / "gt", _shapes_detector(), progress=False)
    assert len(rows) == len(records) == 2 * len(metas)
    assert all(r["correct"] for r in rows), [r["reason"] for r in rows if not r["correct"]]
    result = geneval.summary(rows)
    assert result["overall"] == 1.0 and set(result["tasks"]) == set(TASKS)
    assert json.loads(rows[0]["metadata"]) == metas[0]  # the official results.jsonl fields
    assert set(rows[0]) == {"filename", "tag", "prompt", "correct", "reason", "metadata", "details"}


def _verdict_by_hand(objects, meta) -> bool | None:
    """GenEval's verdict for a flat render with known objects, from its rules as written (include:
    at least `count` objects of the class, the first `count` of them in the colour when one is
    named; exclude: fewer than `count`), independent of genalign.core.geneval. None where the rule
    would depend on which same-class object the detector ranks first (mixed colours)."""
    for clause in meta.get("include", []):
        same = [o for o in objects if o.shape == clause["class"]]
        if len(same) < clause["count"]:
            return False
        if "color" in clause:
            matches = {o.color == clause["color"] for o in same}
            if len(matches) > 1:
                return None
            if not matches.pop():
                return False
    return all(sum(o.shape == c["class"] for o in objects) < c["count"] for c in meta.get("exclude", []))


def test_scores_of_mismatched_scenes_match_verdicts_by_hand(tmp_path):
    """Flat scenes drawn for one prompt, scored against others through GenEval's folder layout:
    every verdict equals the one derived by hand from the drawn objects (position prompts aside),
    with both verdicts well represented."""
    from genalign.shapes.world import evaluation_set, sample_example

    metas = [m for m in evaluation_set("heldout", per_task=3) if m["tag"] != "position"]
    root, expected = tmp_path / "mixed", []
    index = 0
    for scene_meta in metas:
        image, objects = sample_example(scene_meta, 11)
        for prompt_meta in metas:
            verdict = _verdict_by_hand(objects, prompt_meta)
            if verdict is None:
                continue
            folder = root / f"{index:05d}"
            (folder / "samples").mkdir(parents=True)
            (folder / "metadata.jsonl").write_text(json.dumps(prompt_meta))
            Image.fromarray((image * 255).round().astype(np.uint8)).save(folder / "samples" / "00000.png")
            expected.append(verdict)
            index += 1
    rows, _ = geneval.score_folder(root, _shapes_detector(), progress=False)
    assert [r["correct"] for r in rows] == expected
    assert len(expected) >= 150 and 20 <= sum(expected) <= len(expected) - 20


def test_generate_score_report_on_the_shapes_world(tmp_path):
    """The whole GenEval path offline: the shapes SD writes GenEval's layout, the scorer (shapes
    parser as detector) scores it, and the numbers equal the shapes world's own evaluator on the
    same images; generation resumes without redoing or changing images."""
    from genalign.core.experiment import BackboneConfig
    from genalign.eval.generate import backbone_sampler
    from genalign.pipelines import load_backbone
    from genalign.shapes.evaluator import score as shapes_score
    from genalign.shapes.world import evaluation_set

    backbone = load_backbone(BackboneConfig(family="sd", path=str(SHAPES_SD), finetune="none"), "cpu")
    metas = evaluation_set("heldout", per_task=2)
    generator = backbone_sampler(backbone, num_steps=10, guidance_scale=2.0)
    out = geneval.generate(generator, metas, tmp_path / "run", images_per_prompt=2, batch_size=24, progress=False)
    paths = sorted(out.glob("*/samples/*.png"))
    assert len(paths) == 2 * len(metas)
    rows, records = geneval.score_folder(out, _shapes_detector(), progress=False)
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    direct = shapes_score(images, [m for m in metas for _ in range(2)])
    result = geneval.summary(rows)
    assert result["tasks"] == pytest.approx({k: v for k, v in direct.items() if k != "overall"})
    assert result["overall"] == pytest.approx(direct["overall"])
    # resume: nothing is regenerated; a lost image comes back identical
    before = {p: p.stat().st_mtime_ns for p in paths}
    lost = paths[5]
    pixels = np.asarray(Image.open(lost)).copy()
    lost.unlink()
    geneval.generate(generator, metas, out, images_per_prompt=2, batch_size=24, progress=False)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != lost)
    np.testing.assert_array_equal(np.asarray(Image.open(lost)), pixels)
    # the report a person looks at
    report = write_report(tmp_path / "report", result, records)
    page = (report / "report.html").read_text()
    assert page.count("<figure class='pass'") == sum(r["correct"] for r in rows)
    assert page.count("<figure class='fail'") == sum(not r["correct"] for r in rows)
    first = records[0]["image"]
    assert os.path.relpath(first, report) in page  # images linked relative to the report
    assert load_summary(report)["overall"] == pytest.approx(direct["overall"])


def test_geneval_reward_is_the_fraction_of_clauses():
    from genalign.rewards.geneval import GenEvalReward
    from genalign.shapes.reward import ShapesGold
    from genalign.shapes.world import evaluation_set, sample_example

    metas = evaluation_set("heldout", per_task=2)
    images = torch.stack([torch.from_numpy(sample_example(m, i)[0]).permute(2, 0, 1) for i, m in enumerate(metas)])
    # break half of the images: swap prompts so clauses fail in different numbers
    shuffled = metas[1:] + metas[:1]
    reward = GenEvalReward(_shapes_detector())
    scores, subs = reward(images, [m["prompt"] for m in shuffled], shuffled)
    gold, gold_subs = ShapesGold()(images, [m["prompt"] for m in shuffled], shuffled)
    torch.testing.assert_close(scores, gold)
    torch.testing.assert_close(subs["geneval_strict"], gold_subs["shapes_strict"])
    assert 0 < float(scores.mean()) < 1 and set(scores.tolist()) - {0.0, 1.0}  # partial credit exists
    with pytest.raises(ValueError, match="metadata"):
        reward(images, [m["prompt"] for m in metas])


def test_compare_prints_both_runs_and_the_difference(tmp_path, capsys):
    a = {"benchmark": "geneval", "tasks": {"single_object": 0.5, "counting": 0.25}, "overall": 0.375,
         "correct_prompts": 0.5}
    b = {"benchmark": "geneval", "tasks": {"single_object": 0.75, "counting": 0.25}, "overall": 0.5,
         "correct_prompts": 0.5}
    write_report(tmp_path / "a", a, [])
    write_report(tmp_path / "b", b, [])
    table = compare(tmp_path / "a", tmp_path / "b")
    assert "| single_object | 0.5000 | 0.7500 | +0.2500 |" in table
    assert "| **overall** | 0.3750 | 0.5000 | +0.1250 |" in table
    assert "| correct_prompts | 0.5000 | 0.5000 | +0.0000 |" in table
    assert main(["eval", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "+0.2500" in capsys.readouterr().out
    write_report(tmp_path / "c", {**b, "benchmark": "t2i_compbench"}, [])
    with pytest.raises(ValueError, match="different benchmarks"):
        compare(tmp_path / "a", tmp_path / "c")


def test_cli_scores_a_folder_made_by_another_tool(tmp_path, capsys):
    from genalign.shapes.world import evaluation_set

    _write_layout(tmp_path / "gt", evaluation_set("heldout", per_task=1), 1)
    assert main(["eval", "geneval", "--score", str(tmp_path / "gt"), "--detector", "shapes",
                 "--report", str(tmp_path / "out")]) == 0
    assert "| **overall** | **1.0000** |" in capsys.readouterr().out
    lines = (tmp_path / "out" / "results.jsonl").read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line)["correct"] for line in lines)
    assert main(["eval", "geneval"]) == 2  # nothing to do is a config error, not a traceback


def test_cli_generates_with_reno_and_scores(tmp_path, capsys):
    """--generate with ReNO on the shapes SD (proxy CLIP reward), then --score, in one command."""
    assert main(["shapes", "prompts", str(tmp_path / "meta.jsonl"), "--per-task", "1"]) == 0
    args = ["eval", "geneval", "--generate", str(tmp_path / "run"), "--metadata", str(tmp_path / "meta.jsonl"),
            "--limit", "2", "--images-per-prompt", "1", "--backbone", str(SHAPES_SD), "--steps", "2",
            "--guidance-scale", "2", "--reno-reward", "clip", "--reno-reward-path", str(ROOT / "models/shapes/clip"),
            "--reno-iterations", "2", "--detector", "shapes", "--score", str(tmp_path / "run"), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "wrote 2 prompts x 1 images" in out and "| **overall** |" in out
    rows = [json.loads(line) for line in (tmp_path / "run" / "results" / "results.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [json.loads(line)["prompt"]
                                            for line in (tmp_path / "meta.jsonl").read_text().splitlines()[:2]]
