"""Shared fixtures: tiny models of every family, saved once per session as diffusers folders."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Lazily built tiny checkpoints: tiny_models("sd", "v_prediction") -> folder path."""
    from genalign.pipelines.tiny import save_tiny

    cache: dict[tuple[str, str], str] = {}

    def get(family: str, prediction_type: str = "epsilon") -> str:
        key = (family, prediction_type)
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{family}-{prediction_type}")
            cache[key] = str(save_tiny(family, folder, prediction_type, seed=0))
        return cache[key]

    return get


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps process-wide singletons; each test starts from a clean one."""
    yield
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


# What a test may skip for: optional hardware or optional tools, never a file beside the checkout.
OPTIONAL_NEEDS = ("cuda", "chromium", "playwright", "gradio", "browser")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A skip whose reason names none of OPTIONAL_NEEDS fails instead: the suite needs nothing but the
    checkout and the README's install, so any other skip hides a test that silently stopped running."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = str(report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr)
        if not any(need in reason.lower() for need in OPTIONAL_NEEDS):
            report.outcome = "failed"
            report.longrepr = f"skipped for a reason that is not an optional device or tool: {reason}"


ROOT = Path(__file__).resolve().parent.parent
# caches and environments a test run may touch; everything else under the checkout is source
NOT_SOURCE = {".git", ".venv", ".venv-trl", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".hypothesis",
              "build"}


def _source_tree_state() -> dict[str, int]:
    """Every file under the checkout (git-ignored ones too, caches and environments aside) with its
    modification time."""
    state = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in NOT_SOURCE and not d.endswith(".egg-info")]
        for name in files:
            path = os.path.join(folder, name)
            try:
                state[os.path.relpath(path, ROOT)] = os.stat(path).st_mtime_ns
            except OSError:
                pass
    return state


def pytest_sessionstart(session):
    # GENALIGN_WATCH_SOURCE=0 switches the check off (e.g. while a training run writes into ./runs)
    if os.environ.get("GENALIGN_WATCH_SOURCE", "1") != "0":
        session.config._source_tree_before = _source_tree_state()


def pytest_sessionfinish(session, exitstatus):
    """No test writes into the source tree: a file the session added or changed under the checkout
    (ignored or not) fails the run, named."""
    before = getattr(session.config, "_source_tree_before", None)
    if before is None:
        return
    after = _source_tree_state()
    written = sorted(path for path, mtime in after.items() if before.get(path) != mtime)
    if written:
        print("\nthe tests wrote into the source tree (write under tmp_path instead):\n  " + "\n  ".join(written[:20]))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """VLM family (qwen2_vl, qwen2_5_vl, llava) -> folder of a tiny random checkpoint with its
    processor (tests/test_reward_vlm.py builds them), built on first use."""
    from tests.test_reward_vlm import save_tiny_llava, save_tiny_qwen

    folders: dict[str, str] = {}

    def get(family: str) -> str:
        if family not in folders:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            folders[family] = save_tiny_llava(folder) if family == "llava" else save_tiny_qwen(folder, family)
        return folders[family]

    return get

