"""A clone of genalign needs nothing beside it: the reference data ships inside the package (and in
its wheel), the commands default to it, and no file of the project points outside the repository."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genalign.core import reference_data

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "genalign" / "data"
SHAPES_SD = ROOT / "models" / "shapes" / "sd"
# Spelled in pieces so that this file does not itself hold what it looks for.
OUTSIDE_REFERENCES = ("../" + "shared", '"shared"' + " / ", "DESIGN" + ".md", "ENVIRONMENT" + ".md", "STYLE" + ".md")


def _tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    return [ROOT / name for name in listed.decode().split("\0") if name]


def test_no_tracked_file_refers_to_a_path_outside_the_repository():
    offenders = []
    for path in _tracked_files():
        if path.is_symlink() or not path.is_file():
            continue
        text = path.read_bytes()
        offenders += [f"{path.relative_to(ROOT)}: {ref}" for ref in OUTSIDE_REFERENCES if ref.encode() in text]
    assert not offenders, offenders


def test_the_packaged_reference_data_is_where_the_defaults_point():
    assert reference_data.geneval_metadata() == DATA / "geneval" / "evaluation_metadata.jsonl"
    assert reference_data.geneval_object_names() == DATA / "geneval" / "object_names.txt"
    assert reference_data.t2i_compbench_dir() == DATA / "t2i_compbench"
    assert reference_data.aesthetic_head() == DATA / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors"
    # every folder carries its source's licence, and the README names each folder
    readme = (DATA / "README.md").read_text()
    for folder in ("geneval", "t2i_compbench", "aesthetic"):
        assert any(p.name.startswith("LICENSE") for p in (DATA / folder).iterdir()), folder
        assert f"`{folder}/`" in readme
    rows = [json.loads(line) for line in reference_data.geneval_metadata().read_text().splitlines()]
    assert len(rows) == 553
    assert len(list(reference_data.t2i_compbench_dir().glob("*_val.txt"))) == 8


def test_the_aesthetic_head_has_the_published_shapes():
    """768 -> 1024 -> 128 -> 64 -> 16 -> 1 under the published keys layers.{0,2,4,6,7}, float32, finite."""
    state = load_file(str(reference_data.aesthetic_head()))
    widths = [(768, 1024), (1024, 128), (128, 64), (64, 16), (16, 1)]
    assert set(state) == {f"layers.{i}.{kind}" for i in (0, 2, 4, 6, 7) for kind in ("weight", "bias")}
    for i, (fan_in, fan_out) in zip((0, 2, 4, 6, 7), widths):
        assert state[f"layers.{i}.weight"].shape == (fan_out, fan_in)
        assert state[f"layers.{i}.bias"].shape == (fan_out,)
        assert state[f"layers.{i}.weight"].dtype == torch.float32 and torch.isfinite(state[f"layers.{i}.weight"]).all()


def test_the_wheel_carries_the_reference_data(tmp_path):
    """What pip installs from the project (not the editable checkout) holds every data file."""
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    (wheel,) = tmp_path.glob("genalign-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"genalign/data/{p.relative_to(DATA).as_posix()}" for p in DATA.rglob("*") if p.is_file()}
    assert expected and expected <= names, sorted(expected - names)


def test_geneval_generate_defaults_to_the_official_prompts(tmp_path):
    from genalign.cli import main

    args = ["eval", "geneval", "--generate", str(tmp_path / "run"), "--limit", "2", "--images-per-prompt", "1",
            "--backbone", str(SHAPES_SD), "--steps", "1", "--guidance-scale", "2", "--device", "cpu"]
    assert main(args) == 0
    official = (DATA / "geneval" / "evaluation_metadata.jsonl").read_text().splitlines()[:2]
    written = [(tmp_path / "run" / f"{i:05d}" / "metadata.jsonl").read_text() for i in range(2)]
    assert [json.loads(w) for w in written] == [json.loads(o) for o in official]
    assert not (tmp_path / "run" / "00002").exists()


def test_t2i_compbench_generate_defaults_to_the_official_prompt_lists(tmp_path):
    from genalign.cli import main

    args = ["eval", "t2i-compbench", "--generate", str(tmp_path / "run"), "--category", "color", "--limit", "2",
            "--images-per-prompt", "1", "--backbone", str(SHAPES_SD), "--steps", "1", "--guidance-scale", "2",
            "--device", "cpu"]
    assert main(args) == 0
    first_two = (DATA / "t2i_compbench" / "color_val.txt").read_text().splitlines()[:2]
    names = sorted(p.name for p in (tmp_path / "run" / "color").iterdir())
    assert names == sorted(f"{prompt.strip()}_{i:06d}.png" for i, prompt in enumerate(first_two))


@pytest.mark.parametrize("options", [{}, {"mlp": None}])
def test_the_aesthetic_reward_uses_the_packaged_head_by_default(tmp_path, options):
    from genalign.core.experiment import RewardConfig
    from genalign.rewards import load_reward
    from tests.reward_models import save_tiny_transformers_clip

    folder = save_tiny_transformers_clip(tmp_path / "clip-l", projection_dim=768)
    default = load_reward(RewardConfig(name="aesthetic", path=str(folder), options=options))
    explicit = load_reward(RewardConfig(name="aesthetic", path=str(folder),
                                        options={"mlp": str(DATA / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors")}))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(default(images, ["a", "b"])[0], explicit(images, ["a", "b"])[0])
    published = load_file(str(DATA / "aesthetic" / "sac+logos+ava1-l14-linearMSE.safetensors"))
    for name, tensor in default.mlp.state_dict().items():
        assert torch.equal(tensor, published[name]), name


def test_a_skip_for_anything_but_an_optional_device_or_tool_fails(tmp_path):
    """tests/conftest.py: a skip naming CUDA passes as a skip; one for a missing file is a failure."""
    (tmp_path / "test_probe.py").write_text(
        "import pytest\n"
        "def test_needs_cuda():\n    pytest.skip('needs a CUDA device')\n"
        "def test_needs_a_file():\n    pytest.skip('reference file not present')\n"
        "@pytest.mark.skipif(True, reason='needs Chromium')\ndef test_needs_chromium():\n    pass\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider",
                             "--rootdir", str(tmp_path), str(tmp_path / "test_probe.py")],
                            cwd=ROOT, capture_output=True, text=True)
    assert "1 failed, 2 skipped" in result.stdout, result.stdout[-2000:]
    assert "test_needs_a_file" in result.stdout and "reference file not present" in result.stdout
