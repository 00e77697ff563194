"""bench/overoptimisation.py: the stronger tilt's config is the shipped one with one number changed."""

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import overoptimisation  # noqa: E402


def test_the_stronger_config_changes_the_reward_multiplier_alone():
    for shipped in overoptimisation.SHIPPED:
        text = (ROOT / shipped).read_text()
        strong = overoptimisation.stronger(text, 10.0)
        before, after = yaml.safe_load(text), yaml.safe_load(strong)
        assert after["method"]["reward_multiplier"] == pytest.approx(10 * before["method"]["reward_multiplier"])
        after["method"]["reward_multiplier"] = before["method"]["reward_multiplier"]
        assert after == before
        changed = [(a, b) for a, b in zip(text.splitlines(), strong.splitlines()) if a != b]
        assert len(changed) == 1 and len(text.splitlines()) == len(strong.splitlines())
    with pytest.raises(ValueError, match="one reward_multiplier line, found 0"):
        overoptimisation.stronger("method:\n  name: ddpo\n", 10.0)


def test_the_uncertainty_weighted_config_changes_the_aggregate_alone():
    worst = (ROOT / "configs/shapes/adjoint_matching_ensemble.yaml").read_text()
    uwo = overoptimisation.uncertainty_weighted(worst, 0.25)
    before, after = yaml.safe_load(worst), yaml.safe_load(uwo)
    assert after["reward"]["options"]["aggregate"] == "uncertainty"
    assert after["reward"]["options"].pop("uncertainty_weight") == 0.25
    after["reward"]["options"]["aggregate"] = "worst"
    assert after == before
    with pytest.raises(ValueError, match="one 'aggregate: worst' line, found 0"):
        overoptimisation.uncertainty_weighted(uwo, 0.5)
    with pytest.raises(ValueError, match="found 0"):  # a line's end is not crossed
        overoptimisation.uncertainty_weighted("options:\n  aggregate:\n\n  worst\n", 0.5)


def test_the_stronger_configs_are_written_once_and_named(tmp_path):
    paths = overoptimisation.write_configs(tmp_path, 10.0, 0.5)
    assert [Path(p).name for p in paths] == ["am_x10.yaml", "am_ensemble_x10.yaml", "am_uwo_x10.yaml"]
    uwo = yaml.safe_load(Path(paths[2]).read_text())
    worst = yaml.safe_load(Path(paths[1]).read_text())
    assert uwo["method"] == worst["method"] and uwo["reward"]["options"]["members"] == worst["reward"]["options"]["members"]
    assert uwo["reward"]["options"]["uncertainty_weight"] == 0.5
    assert Path(paths[2]).read_text().startswith("# bench/overoptimisation.py: the config below with aggregate: "
                                                 "uncertainty (UWO, lambda 0.5)")
    assert Path(overoptimisation.write_configs(tmp_path, 10.0, 2.0)[2]).name == "am_uwo_l2_x10.yaml"
    stamp = Path(paths[0]).stat().st_mtime_ns
    assert overoptimisation.write_configs(tmp_path, 10.0, None) == paths[:2]
    assert Path(paths[0]).stat().st_mtime_ns == stamp  # unchanged text: the file is left alone
