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
