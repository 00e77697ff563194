"""Safe loading (a pickle payload never runs) and property-based tests of the two parsers users feed
by hand: experiment configs and GenEval metadata. Any input gives a result or one clear error
(ConfigError / ValueError), never another exception."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genalign.core.config import ConfigError
from genalign.core.experiment import load_experiment
from genalign.core.loading import UnsafeFileError, load_torch_file
from genalign.finetuners import config_classes
from tests import toy  # noqa: F401  (registers the toy methods)


class Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def _malicious(tmp_path: Path, name: str) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    torch.save({"layers.0.weight": torch.zeros(2, 2), "payload": Payload(marker)}, path)
    return path, marker


def test_a_pickle_payload_is_refused_and_never_runs(tmp_path):
    path, marker = _malicious(tmp_path, "model.pth")
    with pytest.raises(UnsafeFileError, match="refused to load .*model.pth"):
        load_torch_file(path)
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert torch.equal(load_torch_file(tmp_path / "plain.pt")["w"], torch.ones(2))  # plain tensors load


def test_reward_and_checkpoint_loaders_refuse_payloads(tmp_path):
    from genalign.core.experiment import RunConfig
    from genalign.core.trainer import Trainer
    from genalign.rewards.aesthetic import load_mlp
    from genalign.rewards.base import load_checkpoint

    path, marker = _malicious(tmp_path, "aesthetic.pth")
    with pytest.raises(UnsafeFileError):
        load_mlp(str(path))
    with pytest.raises(UnsafeFileError):
        load_checkpoint(path)
    # a checkpoint folder whose optimizer state was replaced by a payload
    run = RunConfig(output_dir=str(tmp_path / "run"), steps=2, batch_size=2, prompts=["a"], tracker="none",
                    checkpoint_every=1)
    Trainer(toy.ToyRegression(toy.ToyRegression.Config()), run).train()
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000002"
    torch.save({"state": Payload(marker)}, checkpoint / "optimizer.pt")
    with pytest.raises(UnsafeFileError):
        Trainer(toy.ToyRegression(toy.ToyRegression.Config()), run).resume(checkpoint)
    assert not marker.exists()


def test_truncated_safetensors_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from genalign.rewards.base import load_checkpoint

    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.ones(64, 64)}, str(path))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(Exception, match=r"(?i)(incomplete|truncat|invalid|error)") as info:
        load_checkpoint(path)
    assert not isinstance(info.value, (KeyError, AttributeError))


BASE = {"method": {"name": "toy_regression"}, "run": {"steps": 2, "prompts": ["a"]}}
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12), st.lists(st.integers(-3, 3), max_size=3))
keys = st.sampled_from(["run.steps", "run.lr", "run.batch_size", "run.ema", "run.prompts", "run.mixed_precision",
                        "method.dim", "method.name", "backbone.family", "backbone.lora_rank", "sample.num_steps",
                        "reward.name", "run.nonsense", "nonsense.key", "run", "method"])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.tuples(keys, scalars), max_size=4))
def test_config_loader_gives_a_config_or_one_clear_error(tmp_path, overrides):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(BASE))
    texts = [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}"
             for key, value in overrides]
    try:
        config = load_experiment(path, config_classes(), texts)
    except ConfigError as err:
        assert str(err)  # a message that says what is wrong, not an empty error
        return
    assert config.run.steps >= 1 and config.run.lr > 0 and config.run.batch_size >= 1


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.one_of(
    st.fixed_dictionaries({"tag": st.sampled_from(["single_object", "counting", "position"]),
                           "prompt": st.text(max_size=20),
                           "include": st.lists(st.fixed_dictionaries(
                               {"class": st.sampled_from(["dog", "cat"]), "count": st.integers(0, 5)},
                               optional={"color": st.sampled_from(["red", "blue"]),
                                         "position": st.tuples(st.sampled_from(["left of", "above", "near"]),
                                                               st.integers(-1, 3))}), max_size=3)},
                          optional={"exclude": st.lists(st.fixed_dictionaries(
                              {"class": st.text(max_size=5), "count": st.integers(0, 3)}), max_size=2)}),
    st.dictionaries(st.text(max_size=6), scalars, max_size=3),
    st.text(max_size=30),
), max_size=5))
def test_geneval_metadata_reader_gives_rows_or_an_error_naming_the_line(tmp_path, rows):
    from genalign.core.geneval import evaluate
    from genalign.eval.geneval import read_metadata

    path = tmp_path / "meta.jsonl"
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r.replace("\n", " ")) + "\n" for r in rows))
    try:
        metas = read_metadata(path)
    except ValueError as err:
        assert "meta.jsonl" in str(err)
        return
    for meta in metas:  # every accepted row can be evaluated
        verdict = evaluate({}, meta)
        assert len(verdict.clauses) == len(meta.get("include", [])) + len(meta.get("exclude", []))


def test_a_truncated_backbone_file_is_one_clear_error(tmp_path, tiny_models, capsys):
    import shutil

    from genalign.cli import main

    model = tmp_path / "sd"
    shutil.copytree(tiny_models("sd"), model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:3000])
    assert main(["sample", "--backbone", str(model), "--prompt", "a circle", "--out", str(tmp_path / "out"),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot load weights from the local folder" in err and "diffusion_pytorch_model.safetensors" in err
    assert "Traceback" not in err
