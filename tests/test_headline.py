"""bench/headline.py at toy scale: the long run stopped by the clock, the probes, the report."""

import json
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import headline  # noqa: E402

EVAL = ["--per-task", "1", "--eval-steps", "2"]


def test_supervised_fine_tuning_moves_the_lora_toward_the_renders(tmp_path, monkeypatch):
    """Two steps of the world's denoising loss on held-out renders through a rank-8 LoRA: the LoRA
    (B initialised to 0 by peft) has moved, and the denoising loss on those renders fell."""
    monkeypatch.chdir(ROOT)
    out = headline.supervised("sd3", "models/shapes/sd3", "heldout", "lora", 2, 1e-3, tmp_path / "lora",
                              dataset_size=64)
    weights = load_file(str(Path(out) / "pytorch_lora_weights.safetensors"))
    ups = [v for k, v in weights.items() if "lora_B" in k or "lora.up" in k]
    assert ups and any(v.abs().max() > 0 for v in ups)
    log = json.loads((Path(out) / "supervised.json").read_text())
    assert log["flow"]["steps"] == 2 and log["flow"]["final_loss"] > 0


def test_text_probe_reads_colours_above_chance_and_shuffled_labels_do_not(monkeypatch):
    monkeypatch.chdir(ROOT)
    probe = headline.text_probe("models/shapes/sd", steps=300)
    assert probe["chance"] == pytest.approx(1 / 7)
    assert probe["train_words"] > probe["heldout_words"] > 0
    # one object: the colour word stands right before the shape word, which reads it
    assert probe["heldout_by_word"]["one_object"] > 0.9


def test_long_run_probes_and_report_at_toy_scale(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    config = yaml.safe_load(open("configs/shapes/flow_grpo_fast.yaml"))
    config["run"]["batch_size"] = 1
    config["method"]["samples_per_prompt"] = 2
    config["method"]["minibatches"] = 1
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    common = ["--records", str(tmp_path / "records"), "--out", str(tmp_path / "out"), *EVAL]
    # a tenth of a second of training: stopped by the clock after the first step or so, exports every step
    assert headline.main(["run", str(path), "--minutes", "0.002", "--export-every", "1", *common]) == 0
    result = json.loads((tmp_path / "records" / "runs" / "toy" / "result.json").read_text())
    steps = [c["step"] for c in result["curve"]]
    assert steps[-1] < 1_000_000 and steps == sorted(steps)
    for point in result["curve"] + [{"gold": result["base"]}]:
        for split in ("heldout", "train"):
            gold = point["gold"][split]
            assert 0 <= gold["overall"] <= 1 and set(gold) >= {"overall", "colors", "color_attr"}
    # the same run at other settings stops before anything starts, its record kept (--redo replaces it)
    kept = sorted((tmp_path / "records").rglob("*.json"))
    with pytest.raises(SystemExit, match="made from other settings"):
        headline.main(["run", str(path), "--minutes", "0.003", "--export-every", "1", *common])
    assert sorted((tmp_path / "records").rglob("*.json")) == kept
    # the probes, with supervised fine-tuning replaced by a 1-step one
    real = headline.supervised
    monkeypatch.setattr(headline, "supervised", lambda *a, **k: real(*a[:4], 1, *a[5:], dataset_size=64))
    assert headline.main(["probes", "--family", "sd3", "--path", "models/shapes/sd3", *common]) == 0
    probes = json.loads((tmp_path / "records" / "probes" / "sd3-sd3" / "result.json").read_text())
    assert set(probes) >= {"text_probe", "base", "sft-heldout-lora", "sft-heldout-full", "sft-train-lora"}
    # the same base scores as the run's (cached once for both)
    assert probes["base"] == result["base"]
    # a second call trains and evaluates nothing
    monkeypatch.setattr(headline, "supervised", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(headline, "evaluate", lambda *a, **k: pytest.fail("evaluated again")
                        if not Path(a[5]).is_file() else json.loads(Path(a[5]).read_text()))
    assert headline.main(["probes", "--family", "sd3", "--path", "models/shapes/sd3", *common]) == 0
    assert json.loads((tmp_path / "records" / "probes" / "sd3-sd3" / "result.json").read_text())["sft-heldout-full"] \
        == probes["sft-heldout-full"]
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\nkept\n")
    assert headline.main(["report", "--docs", str(docs), "--records", str(tmp_path / "records")]) == 0
    text = (docs / "results.md").read_text()
    assert text.startswith("# Results\n\nkept\n") and text.count(headline.MARK_BEGIN) == 1
    assert "| sft-heldout-full |" in text and f"`{path}` on `models/shapes/sd3`" in text
    assert (docs / "img" / "headline_runs.png").read_bytes()[:4] == b"\x89PNG"
