"""bench/training_signals.py: a run's logged metrics by quarter, per seed and pooled, by hand."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import training_signals  # noqa: E402


def test_quarters_by_hand():
    # 9 values in 4 parts: 3, 2, 2, 2 long
    q = training_signals.quarters([1, 2, 3, 4, 6, 5, 5, 7, 9])
    assert [n for _, _, n in q] == [3, 2, 2, 2]
    assert [m for m, _, _ in q] == pytest.approx([2.0, 5.0, 5.0, 8.0])
    assert q[0][1] == pytest.approx(1 / math.sqrt(3))  # std of 1, 2, 3 is 1
    assert q[1][1] == pytest.approx(math.sqrt(2) / math.sqrt(2))  # std of 4, 6 is sqrt 2
    assert q[2][1] == 0.0
    with pytest.raises(ValueError, match="cannot make 4 parts"):
        training_signals.quarters([1, 2, 3])


def test_the_table_pools_the_seeds_quarter_means(tmp_path):
    for seed, values in ((0, [0.4, 0.6, 0.5, 0.5]), (1, [0.6, 0.6, 0.7, 0.5])):
        folder = tmp_path / "dpo" / f"seed{seed}"
        folder.mkdir(parents=True)
        rows = [{"step": i + 1, "acc": v, "loss": 0.69} for i, v in enumerate(values)]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = training_signals.table("dpo", ["acc", "missing"], tmp_path)
    assert "| acc | seed0 | 0.4 (nan) | 0.6 (nan) | 0.5 (nan) | 0.5 (nan) |" in lines
    # the seeds' quarter means (0.4, 0.6), (0.6, 0.6), (0.5, 0.7), (0.5, 0.5); SE = |a - b| / 2
    assert "| acc | 2 seeds | 0.5 (0.1) | 0.6 (0) | 0.6 (0.1) | 0.5 (0) |" in lines
    assert "| missing | seed1 | - | - | - | - |" in lines
