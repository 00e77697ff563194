"""The command line as a user runs it: sample, train, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

from genalign.cli import main
from tests import toy  # noqa: F401  (registers the toy methods for `genalign train`)


def test_help_lists_the_commands():
    out = subprocess.run([sys.executable, "-m", "genalign", "--help"], capture_output=True, text=True, check=True)
    for command in ("sample", "train", "tiny"):
        assert command in out.stdout


def test_tiny_then_sample_writes_images_grid_and_prompts(tmp_path, capsys):
    model = tmp_path / "tiny-sd"
    assert main(["tiny", "sd", str(model)]) == 0
    assert (model / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    out = tmp_path / "samples"
    args = ["sample", "--backbone", str(model), "--prompt", "a red circle", "--prompt", "a blue square",
            "--steps", "4", "--out", str(out), "--device", "cpu", "--images-per-prompt", "2"]
    assert main(args) == 0
    files = sorted(p.name for p in out.glob("0*.png"))
    assert files == ["0000.png", "0001.png", "0002.png", "0003.png"]
    first = np.asarray(Image.open(out / "0000.png"))
    assert first.shape == (16, 16, 3) and first.std() > 0
    assert Image.open(out / "grid.png").size[0] > 16
    lines = (out / "prompts.tsv").read_text().splitlines()
    assert lines[0] == "0000\ta red circle".replace("0000", "0000.png") and len(lines) == 4
    # the same seed gives the same images
    assert main(args[:-4] + ["--out", str(tmp_path / "again"), "--device", "cpu", "--images-per-prompt", "2"]) == 0
    assert np.array_equal(first, np.asarray(Image.open(tmp_path / "again" / "0000.png")))


def _config(tmp_path, **run):
    data = {
        "method": {"name": "toy_regression"},
        "run": {"output_dir": str(tmp_path / "run"), "steps": 4, "prompts": ["a", "b"], "tracker": "none", **run},
    }
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_train_runs_a_registered_method_with_overrides_and_resumes(tmp_path):
    path = _config(tmp_path)
    assert main(["train", str(path), "run.steps=3", "run.lr=1e-2"]) == 0
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["run"]["steps"] == 3 and resolved["run"]["lr"] == 0.01
    assert resolved["method"]["name"] == "toy_regression"
    assert main(["train", str(path), "run.steps=5", "--resume"]) == 0  # the latest checkpoint
    assert (tmp_path / "run" / "checkpoints" / "step-000005").is_dir()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5]  # continued, not restarted
    assert main(["train", str(path), "run.steps=6", "--resume", str(tmp_path / "run" / "checkpoints" / "step-000005")]) == 0
    assert (tmp_path / "run" / "checkpoints" / "step-000006").is_dir()
    assert main(["train", "--resume", str(path), "run.steps=7"]) == 0  # `--resume exp.yaml` reads as the config
    assert (tmp_path / "run" / "checkpoints" / "step-000007").is_dir()


def test_list_names_every_method_backbone_and_reward(capsys):
    from genalign.finetuners import METHODS
    from genalign.pipelines import BACKBONES
    from genalign.rewards import REWARDS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    shipped = {"diffusion_dpo", "inversion_dpo", "d3po", "adjoint_matching", "ac_flow", "vard", "ddpo", "flow_grpo",
               "sd", "sd-turbo", "sdxl", "sdxl-turbo", "sd3", "flux", "shapes_gold", "clip", "pickscore", "hps",
               "image_reward", "aesthetic", "vlm", "geneval", "ensemble", "reno", "jpeg_compressibility"}
    assert shipped <= {*METHODS.names(), *BACKBONES.names(), *REWARDS.names()}
    for name in (*METHODS.names(), *BACKBONES.names(), *REWARDS.names()):
        assert name in lines, name
        assert len(lines[name].split(None, 1)) == 2, f"{name} has no one-line summary"
    assert "Diffusion-DPO" in lines["diffusion_dpo"] and "PickScore" in lines["pickscore"]
    assert main(["list", "rewards"]) == 0
    assert "methods" not in capsys.readouterr().out


def test_unexpected_errors_are_one_line_unless_debug(monkeypatch, capsys):
    import genalign.cli.models as cli

    def boom(args):
        raise RuntimeError("something broke deep inside")

    monkeypatch.setattr(cli, "cmd_list", boom)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("genalign: RuntimeError: something broke deep inside") and "Traceback" not in err
    assert "--debug" in err
    with pytest.raises(RuntimeError, match="deep inside"):
        main(["--debug", "list"])


def test_out_of_memory_gives_the_hints_that_fix_it(monkeypatch, capsys):
    import torch

    import genalign.cli.models as cli

    def oom(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(cli, "cmd_list", oom)
    assert main(["list"]) == 1
    err = capsys.readouterr().err
    assert "out of memory: CUDA out of memory. Tried to allocate 2.00 GiB" in err
    assert "run.batch_size" in err and "gradient_checkpointing" in err and "Traceback" not in err


def test_unknown_method_is_one_line(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["train", str(path), "method.name=ppo_magic"]) == 2
    err = capsys.readouterr().err
    assert "ppo_magic" in err and "diffusion_dpo" in err and len(err.strip().splitlines()) == 1


def test_a_dataset_image_that_does_not_decode_names_its_row():
    from genalign.finetuners.preference_data import decode_image

    with pytest.raises(ValueError, match=r"row 7 column 'jpg_1' of the preference dataset does not decode"):
        decode_image(b"not a jpeg", "row 7 column 'jpg_1' of the preference dataset")


def test_train_config_errors_exit_2_and_name_the_key(tmp_path, capsys):
    path = _config(tmp_path, stepss=3)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "run.stepss" in err and str(path) in err
    assert main(["train", str(_config(tmp_path)), "run.lr=fast"]) == 2
    assert "'run.lr' must be a number" in capsys.readouterr().err


def test_train_with_missing_weights_exits_2_naming_the_path(tmp_path, capsys):
    path = _config(tmp_path)
    assert main(["train", str(path), "backbone.path=/nowhere/sd15"]) == 2
    assert "/nowhere/sd15" in capsys.readouterr().err


def test_help_config_lists_keys_with_help(capsys):
    assert main(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "run.steps" not in out  # keys are listed per section
    assert "steps = 100: optimizer steps" in out and "[method: toy_regression]" in out


def test_sample_bad_arguments_are_one_line_errors(tmp_path, capsys):
    model = tmp_path / "tiny"
    assert main(["tiny", "sd", str(model)]) == 0
    assert main(["sample", "--backbone", str(model), "--prompt", "x", "--resolution", "15", "--device", "cpu",
                 "--out", str(tmp_path / "o")]) == 2
    assert "not a multiple" in capsys.readouterr().err
    for bad in (["--steps", "0"], ["--family", "sd9"], ["--batch-size", "-1"]):
        with pytest.raises(SystemExit):
            main(["sample", "--backbone", str(model), "--prompt", "x", *bad])


def test_sample_without_prompts_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["sample"])
    assert main(["sample", "--backbone", str(tmp_path)]) == 2
    assert "no prompts" in capsys.readouterr().err


@pytest.mark.parametrize("tiny,family", [("sd3", "sd3"), ("flux-schnell", "flux")])
def test_sample_works_with_flow_backbones(tmp_path, tiny, family):
    model = tmp_path / tiny
    assert main(["tiny", tiny, str(model)]) == 0
    out = tmp_path / "out"
    assert main(["sample", "--backbone", str(model), "--family", family, "--prompt", "a red circle",
                 "--steps", "2", "--guidance-scale", "1", "--out", str(out), "--device", "cpu"]) == 0
    image = np.asarray(Image.open(out / "0000.png"))
    assert image.shape == (16, 16, 3) and image.std() > 0


def test_the_printed_load_line_loads_the_exported_lora(tmp_path, tiny_models):
    """The one line `genalign train` prints after exporting runs as printed and puts the LoRA in the pipeline."""
    import torch

    from genalign.core.experiment import BackboneConfig
    from genalign.launch import load_instructions
    from genalign.pipelines import load_backbone

    base = tiny_models("sd")
    backbone = load_backbone(BackboneConfig(family="sd", path=base, finetune="lora"))
    with torch.no_grad():
        for param in backbone.named_trainable_parameters().values():
            param.fill_(0.01)  # a non-zero LoRA, so loading it changes the UNet
    final = tmp_path / "run" / "final"
    backbone.save_lora(final)
    line = load_instructions(base, final)
    assert line.startswith("from diffusers import DiffusionPipeline;") and str(final) in line
    scope: dict = {}
    exec(line, scope)  # noqa: S102 - the line a user copies
    adapters = scope["pipe"].get_list_adapters()
    assert adapters and any(adapters.values())
    assert load_instructions(base, tmp_path / "nothing") is None
