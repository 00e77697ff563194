"""The shapes leaderboard (genalign.leaderboard, bench/leaderboard.py): its pooling and
budgets by hand, and a toy run end to end: gains paired against the cached base equal the
evaluator's own paired comparison, a second run trains nothing, the docs block is replaced."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from genalign import leaderboard
from genalign.leaderboard import budget_steps, export_interval, pooled, queries_per_step, scored_points, within_minutes


def test_budgets_and_pooling_by_hand():
    grpo = {"method": {"name": "flow_grpo", "samples_per_prompt": 4, "minibatches": 2}, "run": {"batch_size": 4}}
    assert queries_per_step(grpo) == 8  # 4 prompts x 4 images, one rollout for 2 optimizer steps
    nft = {"method": {"name": "diffusion_nft", "samples_per_prompt": 4}, "run": {"batch_size": 4}}
    assert queries_per_step(nft) == 16
    assert budget_steps(8, [800, 3200]) == {800: 100, 3200: 400}
    assert budget_steps(16, [800, 3200, 100]) == {800: 50, 3200: 200, 100: 7}  # rounded up
    assert export_interval([100, 400]) == 100 and export_interval([50, 200, 7]) == 1
    mean, error = pooled([0.1, 0.2, 0.3])  # SE = sqrt(((0.1)^2 + 0 + (0.1)^2) / 2 / 3)
    assert mean == pytest.approx(0.2) and error == pytest.approx(math.sqrt(0.01 / 3))
    assert pooled([0.25]) == (0.25, 0.0)
    points = [{"step": 1, "minutes": 0.5}, {"step": 2, "minutes": 1.1}, {"step": 3, "minutes": 1.6}]
    assert within_minutes(points, 1.5)["step"] == 2 and within_minutes(points, 0.4) is None
    points.append({"step": 4, "minutes": 2.2})
    assert [p["step"] for p in scored_points(points, [4], [])] == [4]
    assert [p["step"] for p in scored_points(points, [2, 4], [1.7, 0.2])] == [2, 3, 4]  # 1.7 min: step 3; 0.2: none


def test_pooled_paired_gain_by_hand():
    """Two seeds, two tasks of two images: g_s = the task-balanced mean of seed s's differences;
    SE^2 = (std of g_s / sqrt 2)^2 + the paired SE^2 of the per-image mean over seeds - the
    seed-by-image residual counted twice (sum_t MS_e,t / (S n_t) / T^2)."""
    from genalign.shapes.scoring import pooled_paired_gain

    tags = ["a", "a", "b", "b"]
    out = pooled_paired_gain([[1, 0, 1, -1], [1, 1, 0, 0]], tags)
    assert out["per_seed"] == pytest.approx([0.25, 0.5]) and out["gain"] == pytest.approx(0.375)
    assert out["seeds_error"] == pytest.approx(0.125)  # |0.25 - 0.5| / sqrt(2) / sqrt(2)
    # per-image means [1, 0.5 | 0.5, -0.5]: var a 0.125 / 2, var b 0.5 / 2; sqrt(0.3125) / 2 tasks
    assert out["images_error"] == pytest.approx(math.sqrt(0.3125) / 2)
    # residuals d - row mean - column mean + mean: task a +-0.25 (MS 0.25 / 1 df), task b +-0.5 (MS 1.0)
    correction = (0.25 / (2 * 2) + 1.0 / (2 * 2)) / 2**2
    assert out["standard_error"] == pytest.approx(math.sqrt(0.125**2 + 0.3125 / 4 - correction))  # 0.125
    one = pooled_paired_gain([[1, 0, 1, -1]], tags)  # one seed: the evaluation's error alone
    assert one["seeds_error"] == 0.0 and one["standard_error"] == pytest.approx(math.sqrt(0.5 / 2 + 2 / 2) / 2)
    with pytest.raises(ValueError, match="one difference per tag"):
        pooled_paired_gain([[1, 0, 1]], tags)


def test_pooled_difference_by_hand():
    """Method A's gain minus B's on the same images: the base cancels image by image. Additive seed
    and image effects (no residual): A = [0, 0.2] + [1, 0, 0.5], B = [0, 0.4] + [0, 0, 1], one task."""
    from genalign.shapes.scoring import pooled_difference

    tags = ["a"] * 3
    out = pooled_difference([[1, 0, 0.5], [1.2, 0.2, 0.7]], [[0, 0, 1], [0.4, 0.4, 1.4]], tags)
    assert out["per_seed_a"] == pytest.approx([0.5, 0.7]) and out["per_seed_b"] == pytest.approx([1 / 3, 1 / 3 + 0.4])
    assert out["difference"] == pytest.approx(0.6 - (1 / 3 + 0.2))
    assert out["seeds_error"] == pytest.approx(math.hypot(0.1, 0.2))  # each: |g_1 - g_2| / 2
    # per-image seed means A [1.1, 0.1, 0.6], B [0.2, 0.2, 1.2]: differences 0.9, -0.1, -0.6, var 7/12
    assert out["images_error"] == pytest.approx(math.sqrt(7 / 12 / 3))
    assert out["standard_error"] == pytest.approx(math.sqrt(0.01 + 0.04 + 7 / 36))
    # residuals of +-0.25 in each (MS 0.25, R = 0.25 / (2 x 2)) take out what the seeds' spread and the
    # images' both count: seeds 0.25^2 + 0.25^2, images 0 (per-image differences 0.5, 0.5), less 2 x 0.0625
    both = pooled_difference([[1, 0], [1, 1]], [[0, 0], [1, 0]], ["a", "a"])
    assert both["difference"] == pytest.approx(0.5) and both["seeds_error"] == pytest.approx(math.sqrt(0.125))
    assert both["images_error"] == pytest.approx(0.0) and both["standard_error"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="one difference per tag"):
        pooled_difference([[1, 0]], [[1, 0, 0]], ["a", "a"])


def test_a_runs_fingerprint_follows_its_settings_not_its_comments(tmp_path):
    """A comment, the layout, or a setting the leaderboard overrides (run.steps, run.seed) leaves a
    record valid; a setting it trains with (the learning rate), the seed, the steps or the export
    interval does not."""
    path = tmp_path / "m.yaml"

    def made_from(text, seed=0, steps=8, every=4):
        path.write_text(text)
        return leaderboard.run_fingerprint(str(path), seed, steps, every)

    plain = made_from("method:\n  name: flow_grpo\nrun:\n  lr: 0.001\n  steps: 100\n")
    assert made_from("# measured: +0.05\nmethod: {name: flow_grpo}\nrun:\n  steps: 250  # longer\n  lr: 1.0e-3\n"
                     "  seed: 7\n") == plain
    assert made_from("method:\n  name: flow_grpo\nrun:\n  lr: 0.002\n  steps: 100\n") != plain
    text = "method:\n  name: flow_grpo\nrun:\n  lr: 0.001\n"
    assert len({made_from(text), made_from(text, seed=1), made_from(text, steps=16), made_from(text, every=8)}) == 4


def test_each_method_is_compared_with_its_backbones_reference_paired_by_seed_where_it_can():
    """comparisons(): a method on the reference's model against it, image by image; the same seeds:
    paired seed by seed too (per-seed differences [1, 0, 0] and [1, 0, 0]: +1/3, SE = the paired SE
    of the per-image means [1, 0, 0], 1/3); other seeds: independent; other models: not compared."""
    tags = ["t"] * 3

    def method(model, budgets, tags=tags):
        return {"model": model, "tags": tags, "budgets": budgets, "minutes": {}}

    methods = {"ref": method("sd3", {"800": {0: [0, 0, 1], 1: [0, 1, 0]}}),
               "same_seeds": method("sd3", {"800": {0: [1, 0, 1], 1: [1, 1, 0]}}),
               "other_seeds": method("sd3", {"800": {2: [1, 0, 1], 3: [1, 1, 0]}}),
               "elsewhere": method("sd", {"800": {0: [1, 1, 1]}})}
    rows = {r["method"]: r for r in leaderboard.comparisons(methods, ["ref"])}
    assert sorted(rows) == ["other_seeds", "same_seeds"] and rows["same_seeds"]["reference"] == "ref"
    paired = rows["same_seeds"]["budgets"]["800"]
    assert paired["paired_seeds"] and paired["difference"] == pytest.approx(1 / 3)
    assert paired["standard_error"] == pytest.approx(1 / 3) and paired["seeds"] == [2, 2]
    independent = rows["other_seeds"]["budgets"]["800"]
    assert not independent["paired_seeds"] and independent["difference"] == pytest.approx(1 / 3)
    lines = leaderboard.comparison_table({"settings": {"budgets": [800], "minutes": []}, "comparisons": list(rows.values())})
    assert "| `same_seeds` | `ref` | +0.333 (0.333, 1.0 SE; 2 seeds, paired) |" in lines
    # the same seed numbers drawn by another code (TRL's) share nothing: independent, as other seeds
    methods["other_code"] = {**method("sd3", {"800": {0: [1, 0, 1], 1: [1, 1, 0]}}), "draws": "trl"}
    other_code = {r["method"]: r for r in leaderboard.comparisons(methods, ["ref"])}["other_code"]["budgets"]["800"]
    assert not other_code["paired_seeds"] and other_code == {**independent, "seeds": [2, 2]}
    methods["same_seeds"]["tags"] = ["u"] * 3
    with pytest.raises(ValueError, match="other images"):
        leaderboard.comparisons(methods, ["ref"])


def test_a_toy_leaderboard_end_to_end(tmp_path, monkeypatch):
    """Flow-GRPO with an SDE window at a learning rate that moves the model in 2 steps, 2 seeds, budgets
    of 8 and 16 reward queries (1 and 2 steps), 2 held-out prompts a task at 2 sampling steps."""
    monkeypatch.chdir(leaderboard.Path(__file__).resolve().parents[1])
    config = yaml.safe_load(open("configs/shapes/flow_grpo_fast.yaml"))
    config["run"]["lr"] = 0.05
    config["method"]["clip_range"] = 0.5
    path = tmp_path / "toy_grpo.yaml"
    path.write_text(yaml.safe_dump(config))
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "results.md").write_text("# Results\n\nkept above\n")
    args = ["--configs", str(path), "--seeds", "0", "1", "--budgets", "8", "16", "--per-task", "2",
            "--eval-seeds", "1", "--eval-steps", "2", "--out", str(tmp_path / "out"), "--records", str(tmp_path / "records"),
            "--docs", str(docs), "--readme", str(docs / "README.md")]
    (docs / "README.md").write_text(f"# Tool\n\n{leaderboard.README_BEGIN}\nold table\n{leaderboard.README_END}\nkept below\n")
    assert leaderboard.main(args) == 0
    results = json.loads((tmp_path / "records" / "leaderboard.json").read_text())
    m = results["methods"]["toy_grpo"]
    assert m["queries_per_step"] == 8 and set(m["budgets"]) == {"8", "16"}
    for budget, step in (("8", 1), ("16", 2)):
        b = m["budgets"][budget]
        assert b["step"] == step and len(b["per_seed"]) == 2
        # the seeds' spread and the evaluation's, from the records' verdicts, by hand
        base = json.loads(next((tmp_path / "records" / "base").glob("*/eval-seed1-*.json")).read_text())
        tuned = [json.loads(next((tmp_path / "records" / "runs" / "toy_grpo" / f"seed{seed}" / "evals").glob(
            f"step-{step:06d}-eval-seed1-*.json")).read_text()) for seed in (0, 1)]
        d = np.array([t["verdicts"] for t in tuned], dtype=float) - np.array(base["verdicts"], dtype=float)
        tags = np.array(base["tags"])
        per_seed = [np.mean([row[tags == t].mean() for t in dict.fromkeys(base["tags"])]) for row in d]
        mean_d = d.mean(0)
        images = np.sqrt(sum(mean_d[tags == t].var(ddof=1) / 2 for t in dict.fromkeys(base["tags"]))) / 6
        seeds = abs(per_seed[0] - per_seed[1]) / 2  # std (ddof 1) of two values / sqrt(2)
        residual = 0.0  # the seed-by-image residual, counted in both: (S - 1)(n - 1) = 1 degree of freedom a task
        for t in dict.fromkeys(base["tags"]):
            x = d[:, tags == t]
            residual += ((x - x.mean(1, keepdims=True) - x.mean(0, keepdims=True) + x.mean()) ** 2).sum() / (2 * 2)
        assert b["per_seed"] == pytest.approx(per_seed) and b["gain"] == pytest.approx(np.mean(per_seed))
        assert (b["seeds_error"], b["images_error"]) == pytest.approx((seeds, images))
        assert b["standard_error"] == pytest.approx(math.sqrt(max(seeds**2 + images**2 - residual / 36, 0.0)))
    # seed 0's export at step 1, paired with the cached base, against the evaluator comparing both itself
    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone
    from genalign.shapes.report import evaluate_models

    # (the last one scored, after three other LoRAs were loaded into and unloaded from the same base)
    lora = tmp_path / "out" / "runs" / "toy_grpo" / "seed1" / "final" / "pytorch_lora_weights.safetensors"
    backbone = load_backbone(BackboneConfig(family="sd3", path="models/shapes/sd3", finetune="none"), "cpu")
    both, images = evaluate_models(backbone, str(lora), True, 2, 2, 2.0, 1)
    last = m["runs"]["1"][-1]
    assert last["step"] == 2 and last["gains"]["1"] == pytest.approx(both["gain"]["gain"])
    backbone.unload_lora()  # the base again, bit for bit
    assert torch.equal(evaluate_models(backbone, None, False, 2, 2, 2.0, 1)[1][0][1], images[0][1])
    assert any(p["gains"]["1"] != 0 for p in m["runs"]["0"] + m["runs"]["1"])  # the toy model moved
    # a second run trains and evaluates nothing, and gives the same numbers, from the records alone
    import shutil

    shutil.rmtree(tmp_path / "out")
    monkeypatch.setattr("genalign.launch.run_experiment", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr("genalign.shapes.report.evaluate_models", lambda *a, **k: pytest.fail("evaluated again"))
    assert leaderboard.main(args) == 0
    again = json.loads((tmp_path / "records" / "leaderboard.json").read_text())["methods"]["toy_grpo"]
    assert again["budgets"] == m["budgets"] and again["curve"] == m["curve"]
    # --recorded reports what is on record and leaves out the rest (a seed without its record, a
    # config never run), training, evaluating and deleting nothing
    seed1 = tmp_path / "records" / "runs" / "toy_grpo" / "seed1"
    (seed1 / "points.json").rename(seed1 / "points.json.aside")
    other = tmp_path / "toy_other.yaml"
    other.write_text(path.read_text())
    kept = sorted((tmp_path / "records").rglob("*.json"))
    recorded = [*args[:1], str(path), str(other), *args[2:3], "0", "1", "2", *args[5:], "--recorded"]
    assert leaderboard.main(recorded) == 0
    part = json.loads((tmp_path / "records" / "leaderboard.json").read_text())["methods"]
    assert list(part) == ["toy_grpo"] and list(part["toy_grpo"]["runs"]) == ["0"]
    for budget in ("8", "16"):
        assert part["toy_grpo"]["budgets"][budget]["per_seed"] == [m["budgets"][budget]["per_seed"][0]]
    assert sorted((tmp_path / "records").rglob("*.json")) == kept
    # without --docs (an interim table, a shard) its numbers and plots stay with the runs: the
    # report's leaderboard.json beside the records is the full run's
    report = (tmp_path / "records" / "leaderboard.json").read_text()
    interim = [a for a in [*args[:1], str(path), *args[2:3], "0", *args[5:], "--recorded"]  # seed 0: other numbers
               if a not in ("--docs", str(docs))]
    assert leaderboard.main(interim) == 0
    assert (tmp_path / "records" / "leaderboard.json").read_text() == report
    assert json.loads((tmp_path / "out" / "leaderboard.json").read_text())["settings"]["seeds"] == [0]
    assert (tmp_path / "out" / "leaderboard_queries.png").is_file()
    (seed1 / "points.json.aside").rename(seed1 / "points.json")
    # a run on record whose weights are gone and one of whose evaluations is missing is trained again
    evals = tmp_path / "records" / "runs" / "toy_grpo" / "seed1" / "evals"
    sorted(evals.glob("step-000002-*.json"))[0].unlink()
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        leaderboard.main(args)
    assert not (evals.parent / "points.json").exists() and (tmp_path / "records" / "runs" / "toy_grpo" / "seed0" / "points.json").exists()
    # an edited config stops the run before anything starts, its records named and kept; with --redo
    # it is trained again (and its old evaluations are not reused)
    config["run"]["lr"] = 0.04
    path.write_text(yaml.safe_dump(config))
    kept = sorted((tmp_path / "records").rglob("*.json"))
    with pytest.raises(SystemExit, match=r"made from other settings.*toy_grpo/seed0.*--redo"):
        leaderboard.main(args)
    assert sorted((tmp_path / "records").rglob("*.json")) == kept
    with pytest.raises(pytest.fail.Exception, match="trained again"):
        leaderboard.main([*args, "--redo"])
    assert not (tmp_path / "records" / "runs" / "toy_grpo" / "seed0" / "evals").exists()
    text = (docs / "results.md").read_text()
    assert text.startswith("# Results\n\nkept above\n") and text.count(leaderboard.MARK_BEGIN) == 1
    assert "| `toy_grpo` | sd3 | shapes_gold |" in text
    readme = (docs / "README.md").read_text()
    assert "old table" not in readme and readme.endswith(f"{leaderboard.README_END}\nkept below\n")
    row = next(line for line in readme.splitlines() if line.startswith("| `toy_grpo`"))
    assert row.endswith("| no | - |")  # fewer than three seeds: the bar needs three; trained on the gold: no proxy column
    for name in ("leaderboard_queries.png", "leaderboard_minutes.png", "leaderboard_tasks.png"):
        assert (docs / "img" / name).read_bytes()[:4] == b"\x89PNG"


def test_trl_runs_join_the_table_through_their_driver(tmp_path, monkeypatch):
    """--trl: one TRL run a seed through bench/trl_ddpo.py to the largest budget's epoch, its LoRA
    saved at the smaller budgets' (here a stand-in that writes what the driver writes: epochs.json
    and LoRAs in epoch-E/ and final/, fresh ones, i.e. the base); its points carry the epochs, the
    driver's query count and CPU minutes at each, and pair with the SD base like any run."""
    import subprocess

    from genalign.core.experiment import BackboneConfig
    from genalign.pipelines import load_backbone

    monkeypatch.chdir(leaderboard.Path(__file__).resolve().parents[1])
    calls = []

    def driver(command, check):
        out = leaderboard.Path(command[command.index("--train-out") + 1])
        epochs = int(command[command.index("--epochs") + 1])
        save_at = [int(e) for e in command[command.index("--save-at") + 1:]]
        calls.append((epochs, int(command[command.index("--seed") + 1]), save_at))
        lora = load_backbone(BackboneConfig(family="sd", path="models/shapes/sd", finetune="lora", lora_rank=4), "cpu")
        for where in [f"epoch-{e:06d}" for e in save_at] + ["final"]:
            lora.save_lora(out / where)
        (out / "epochs.json").write_text(json.dumps([{"epoch": e, "queries": 16 * e, "seconds": 9.0 * e,
                                                      "cpu_seconds": 6.0 * e} for e in range(1, epochs + 1)]))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", driver)
    s = leaderboard.Settings(configs=[], seeds=[3], budgets=[16, 48], per_task=1, eval_seeds=[1], eval_steps=2,
                             trl=True, out=str(tmp_path / "out"), records=str(tmp_path / "records"))
    results = leaderboard.measure(s, log=lambda *a: None)
    assert calls == [(3, 3, [1, 2])]  # saved at every export interval, as genalign's runs export
    trl = results["methods"]["trl_ddpo"]  # scored at the budgets' epochs (and the minutes', here the last)
    assert [(p["step"], p["queries"], p["minutes"]) for p in trl["runs"]["3"]] == [(1, 16, 0.1), (3, 48, 0.3)]
    assert trl["budgets"]["48"]["gain"] == 0.0 and trl["family"] == "sd"  # a fresh LoRA is the base
    assert leaderboard.measure(s, log=lambda *a: None)["methods"]["trl_ddpo"]["runs"] == trl["runs"]
    assert len(calls) == 1  # on record: not run again


def test_the_table_says_which_methods_clear_three_standard_errors():
    def method(per_seed):
        gain, error = pooled(per_seed)
        return {"family": "sd", "reward": "shapes_gold", "minutes": {},
                "budgets": {"800": {"gain": gain, "standard_error": error, "per_seed": per_seed, "minutes": 2.0}}}

    results = {"settings": {"budgets": [800], "minutes": []},
               "methods": {"clear": method([0.05, 0.06, 0.07]),      # 0.06 / 0.0058: 10.4 SE
                           "noisy": method([0.0, 0.06, 0.12]),       # 0.06 / 0.0346: 1.7 SE
                           "two_seeds": method([0.05, 0.06]), "one_seed": method([0.05])}}
    rows = {line.split(" | ")[0][3:-1]: line for line in leaderboard.table(results)[2:]}
    assert rows["clear"].endswith("| yes | - |") and "10.4 SE; 3 seeds" in rows["clear"]
    assert rows["noisy"].endswith("| no | - |") and "1.7 SE" in rows["noisy"]
    assert rows["two_seeds"].endswith("| no | - |") and "; 2 seeds)" in rows["two_seeds"]
    assert "; 1 seed)" in rows["one_seed"] and rows["one_seed"].endswith("| no | - |")


def test_the_table_shows_how_far_a_proxy_trained_method_moved_its_proxy():
    """The proxy's gain at the largest budget's step (not at another export), and none for a gold-trained method."""
    def method(reward, curve):
        return {"family": "sd3", "reward": reward, "minutes": {}, "curve": curve,
                "budgets": {"1600": {"step": 20, "gain": 0.05, "standard_error": 0.01, "per_seed": [0.05] * 3,
                                     "minutes": 2.0}}}

    curve = [{"step": 10, "proxy_gain": 0.30, "proxy_standard_error": 0.05, "seeds": 3},
             {"step": 20, "proxy_gain": 0.62, "proxy_standard_error": 0.04, "seeds": 3}]
    one = [{"step": 20, "proxy_gain": 0.04, "proxy_standard_error": 0.0, "seeds": 1}]  # one seed: no spread to show
    results = {"settings": {"budgets": [1600], "minutes": []},
               "methods": {"proxy": method("clip", curve), "one_seed": method("clip", one),
                           "gold": method("shapes_gold", [{"step": 20, "seeds": 3}])}}
    rows = {line.split(" | ")[0][3:-1]: line for line in leaderboard.table(results)[2:]}
    assert rows["proxy"].endswith("| yes | +0.62 (0.04) |")
    assert rows["one_seed"].endswith("| +0.04 (1 seed) |")
    assert rows["gold"].endswith("| yes | - |")


def test_a_minute_budget_before_any_export_is_left_blank():
    """No run exported within 4 minutes: no cell (it read +0.000 (0.000) before 2026-12-07); within 8
    minutes one of two runs did: its gain pooled with the other's base (gain 0)."""
    tags = ["single_object", "single_object", "counting", "counting"]
    base = {1: {"tags": tags, "gold": {"overall": 0.5}}}
    runs = {seed: [{"step": 1, "queries": 8.0, "minutes": minutes, "proxy_gain": {}, "per_task": {1: {}},
                    "differences": [1.0, 0.0, 0.0, 0.0]}] for seed, minutes in ((0, 5.0), (1, 9.0))}
    s = leaderboard.Settings(configs=[], seeds=[0, 1], budgets=[8], minutes=[4.0, 8.0], eval_seeds=[1])
    m, _ = leaderboard.summarise("m", "m.yaml", "sd", "shapes_gold", 8.0, {8: 1}, runs, base, s)
    assert set(m["minutes"]) == {"8"} and m["minutes"]["8"]["per_seed"] == pytest.approx([0.25, 0.0])
    results = {"settings": {"budgets": [8], "minutes": [4.0, 8.0]}, "methods": {"m": m}}
    assert leaderboard.table(results)[2].split(" | ")[4] == "-"  # the 4-minute cell


def test_the_overoptimisation_panels_share_one_scale(tmp_path, monkeypatch):
    """Proxy and gold of every proxy-trained method on the same two scales (a method that moves the
    proxy three times as far looks it), and every plot written."""
    import matplotlib.figure

    from genalign.shapes.world import TASKS

    scales, together, rights = {}, {}, {}
    real = matplotlib.figure.Figure.savefig

    def keep(fig, path, *args, **kwargs):
        scales[leaderboard.Path(path).name] = [((ax.get_ylabel().split() or [""])[0], ax.get_ylim()) for ax in fig.axes
                                               if ax.get_visible() and not ax.get_title().startswith("gold against")]
        rights[leaderboard.Path(path).name] = [(ax.get_ylim(), [(c.get_ylabel(), c.get_ylim()) for c in ax.child_axes])
                                               for ax in fig.axes if ax.get_visible()]
        together[leaderboard.Path(path).name] = [[list(line.get_data()[0]) for line in ax.get_lines() if line.get_label()[0] != "_"]
                                                 for ax in fig.axes if ax.get_title().startswith("gold against")]
        return real(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", keep)

    def method(scale):
        curve = [{"queries": q, "minutes": q / 100, "gain": 0.01 * scale * q / 800, "standard_error": 0.005,
                  "proxy_gain": 0.1 * scale * q / 800, "proxy_standard_error": 0.02} for q in (800, 1600)]
        return {"family": "sd3", "reward": "clip", "curve": curve,
                "budgets": {"1600": {"per_task": dict.fromkeys(TASKS, 0.0)}}}

    results = {"settings": {"budgets": [1600], "clip": "models/shapes/clip"},
               "methods": {"small": method(1), "large": method(3)}}
    results["methods"]["small"]["budgets"]["1600"]["base_gold"] = 0.3
    written = leaderboard.plot(results, tmp_path)
    # the gain panels carry the held-out gold on their right axis (gain + base) where the base is known
    (small_lim, small_right), (_, large_right) = rights["leaderboard_queries.png"]
    (label, lim), = small_right
    assert label == "held-out gold (base 0.300)" and lim == pytest.approx((small_lim[0] + 0.3, small_lim[1] + 0.3))
    assert large_right == []
    assert [p.name for p in written] == ["leaderboard_queries.png", "leaderboard_minutes.png", "leaderboard_tasks.png",
                                         "leaderboard_overoptimisation.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in written)
    panels = scales["leaderboard_overoptimisation.png"]
    gold = {lim for label, lim in panels if label == "gold"}
    proxy = {lim for label, lim in panels if label == "proxy"}
    assert len(gold) == 1 and len(proxy) == 1 and len(panels) == 4
    (low, high), = gold
    assert low <= 0.0 and high >= 0.06 + 0.005  # the base and the large method's last point with its band
    (low, high), = proxy
    assert high >= 0.6 + 0.02
    # and one panel of gold against proxy with every method: x runs through each one's proxy gains
    assert len(together["leaderboard_overoptimisation.png"]) == 1
    assert together["leaderboard_overoptimisation.png"][0] == [pytest.approx([0.0, 0.1, 0.2]), pytest.approx([0.0, 0.3, 0.6])]


def test_shards_split_the_configs_and_leave_the_report_to_a_whole_run(tmp_path, monkeypatch):
    seen = []

    def fake_measure(s, log=print):
        seen.append(list(s.configs))
        return {"settings": asdict(s), "date": "d", "machine": "m", "methods": {}}

    from dataclasses import asdict

    monkeypatch.setattr(leaderboard, "measure", fake_measure)
    monkeypatch.setattr(leaderboard, "plot", lambda results, folder: [])
    configs = ["a.yaml", "b.yaml", "c.yaml"]
    common = ["--configs", *configs, "--records", str(tmp_path), "--out", str(tmp_path / "out")]
    assert leaderboard.main([*common, "--shard", "0/2"]) == 0
    threads = torch.get_num_threads()
    try:
        assert leaderboard.main([*common, "--shard", "1/2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    assert seen == [["a.yaml", "c.yaml"], ["b.yaml"]]
    # each shard's numbers in a file of its own beside the runs, none beside the records
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["leaderboard-shard0of2.json", "leaderboard-shard1of2.json"]
    assert not (tmp_path / "leaderboard.json").exists()
    for bad in (["--shard", "2/2"], ["--shard", "x"], ["--shard", "0/2", "--docs", str(tmp_path)]):
        with pytest.raises(SystemExit):
            leaderboard.main([*common, *bad])


def test_an_unfinished_run_resumes_from_its_last_checkpoint_exactly(tmp_path, monkeypatch):
    """A run killed in step 4 of 4 (checkpoint and export at 2) is resumed by the next leaderboard
    launch from step 2 and ends bit-identical to a run never stopped; a folder made from another
    config (its stamp) starts again."""
    from safetensors.torch import load_file

    import genalign.launch
    from genalign.core.trainer import Trainer

    monkeypatch.chdir(leaderboard.Path(__file__).resolve().parents[1])
    config = yaml.safe_load(open("configs/shapes/flow_grpo_fast.yaml"))
    config["run"].update(lr=0.05, batch_size=2)
    config["method"].update(clip_range=0.5, samples_per_prompt=2, minibatches=1)
    config["sample"]["num_steps"] = 6
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    launches = []
    real = genalign.launch.run_experiment
    monkeypatch.setattr(genalign.launch, "run_experiment", lambda c, resume=None: launches.append(resume) or real(c, resume))

    def train(name):
        return leaderboard.train_run(str(path), 0, 4, 2, tmp_path / name, tmp_path / "records" / name / "points.json", 4.0)

    assert train("whole") and launches == [None]
    step = Trainer.train_step

    def killed(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(Trainer, "train_step", killed)
    with pytest.raises(KeyboardInterrupt):
        train("cut")
    monkeypatch.setattr(Trainer, "train_step", step)
    assert [p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()] == ["step-000002"]
    assert train("cut") and launches[-1] == "latest"
    weights = [load_file(str(tmp_path / name / "final" / "pytorch_lora_weights.safetensors")) for name in ("whole", "cut")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    points = json.loads((tmp_path / "records" / "cut" / "points.json").read_text())["points"]
    assert [p["step"] for p in points] == [2, 4] and points[1]["minutes"] > points[0]["minutes"] > 0
    # a folder whose checkpoints were made from something else is not resumed
    (tmp_path / "records" / "cut" / "points.json").unlink()
    (tmp_path / "cut" / "leaderboard-run.json").write_text('{"fingerprint": "another"}\n')
    assert train("cut") and launches[-1] is None
