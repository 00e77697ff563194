"""Experiment configs: YAML + dotted overrides, strict keys and types, errors that name the key."""

from __future__ import annotations

import pytest
import yaml

from genalign.core.config import ConfigError, apply_overrides
from genalign.core.experiment import load_experiment
from genalign.finetuners import config_classes
from tests import toy  # noqa: F401  (registers the toy methods)


def _write(tmp_path, data, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


BASE = {
    "backbone": {"family": "sd", "path": "some/model"},
    "method": {"name": "toy_regression", "dim": 3},
    "run": {"steps": 5, "lr": 0.01, "prompts": ["a", "b"]},
}


def test_loads_sections_with_types_and_defaults(tmp_path):
    config = load_experiment(_write(tmp_path, BASE), config_classes())
    assert config.method_name == "toy_regression" and config.method.dim == 3
    assert config.run.steps == 5 and config.run.lr == 0.01 and config.run.adam_betas == (0.9, 0.999)
    assert config.backbone.lora_rank == 4 and config.sample.num_steps == 20
    assert config.reward == []
    # the resolved config is plain data that loads back to the same thing
    again = load_experiment(_write(tmp_path, config.to_dict(), "resolved.yaml"), config_classes())
    assert again == config


def test_dotted_overrides_change_values_with_yaml_types(tmp_path):
    config = load_experiment(
        _write(tmp_path, BASE), config_classes(),
        ["method.dim=7", "run.lr=1e-3", "run.adam_betas=[0.8, 0.9]", "backbone.resolution=512", "run.ema=true"],
    )
    assert config.method.dim == 7 and config.run.lr == 1e-3 and config.run.adam_betas == (0.8, 0.9)
    assert config.backbone.resolution == 512 and config.run.ema is True


def test_unknown_key_in_file_names_key_file_and_suggestion(tmp_path):
    path = _write(tmp_path, {**BASE, "run": {"stepz": 3}})
    with pytest.raises(ConfigError) as err:
        load_experiment(path, config_classes())
    message = str(err.value)
    assert "run.stepz" in message and str(path) in message and "did you mean 'run.steps'" in message


def test_unknown_key_from_the_command_line_names_the_command_line(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_experiment(_write(tmp_path, BASE), config_classes(), ["method.betta=3"])
    assert "method.betta" in str(err.value) and "command line" in str(err.value)


@pytest.mark.parametrize(
    "override,fragment",
    [
        ("run.steps=abc", "'run.steps' must be an integer"),
        ("run.steps=2.5", "'run.steps' must be an integer"),
        ("run.ema=3", "'run.ema' must be true or false"),
        ("run.mixed_precision=fp8", "'run.mixed_precision' must be one of"),
        ("run.steps=0", "steps must be >= 1"),
        ("method.dim=0", "dim must be >= 1"),
        ("run.prompts=hello", "'run.prompts' must be a list"),
        ("method.name=nope", "unknown method.name 'nope'"),
        ("run", "not of the form key=value"),
    ],
)
def test_wrong_values_are_clear_errors(tmp_path, override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        load_experiment(_write(tmp_path, BASE), config_classes(), [override])


def test_malformed_yaml_and_bad_sections(tmp_path):
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_experiment(_write(tmp_path, "run: [unclosed"), config_classes())
    with pytest.raises(ConfigError, match="unknown section"):
        load_experiment(_write(tmp_path, {**BASE, "optimiser": {}}), config_classes())
    with pytest.raises(ConfigError, match="method.name' is required"):
        load_experiment(_write(tmp_path, {"run": {}}), config_classes())
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "missing.yaml", config_classes())


def test_reward_section_accepts_one_mapping_or_a_list(tmp_path):
    one = load_experiment(_write(tmp_path, {**BASE, "reward": {"name": "clip"}}), config_classes())
    assert [r.name for r in one.reward] == ["clip"] and one.reward[0].weight == 1.0
    many = load_experiment(
        _write(tmp_path, {**BASE, "reward": [{"name": "clip", "weight": 0.5}, {"name": "hps", "weight": 2}]}),
        config_classes(),
    )
    assert [(r.name, r.weight) for r in many.reward] == [("clip", 0.5), ("hps", 2.0)]
    with pytest.raises(ConfigError, match=r"reward\[1\].wieght"):
        load_experiment(_write(tmp_path, {**BASE, "reward": [{"name": "a"}, {"name": "b", "wieght": 1}]}),
                        config_classes())


def test_apply_overrides_does_not_touch_the_input():
    data = {"run": {"steps": 1}, "sample": None}
    out = apply_overrides(data, ["run.steps=2", "sample.eta=1.0"])
    assert data == {"run": {"steps": 1}, "sample": None}
    assert out["run"]["steps"].parsed == 2 and out["sample"]["eta"].parsed == 1.0
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"run": {"steps": 1}}, ["run.steps.x=2"])


def test_string_overrides_stay_verbatim_and_empty_sections_take_overrides(tmp_path):
    config = load_experiment(
        _write(tmp_path, {**BASE, "sample": None}), config_classes(),
        ["sample.negative_prompt=no", "backbone.revision=0123456", "run.output_dir=2024", "sample.num_steps=3",
         "backbone.variant=null", "method.name=toy_regression"],
    )
    assert config.sample.negative_prompt == "no" and config.backbone.revision == "0123456"
    assert config.run.output_dir == "2024" and config.sample.num_steps == 3 and config.backbone.variant is None


def test_method_that_is_not_a_mapping_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="'method' must be a mapping"):
        load_experiment(_write(tmp_path, {"method": "toy_regression"}), config_classes())


def test_shipped_configs_all_load():
    """Every shipped config loads; its method is found by the registry with nothing imported first."""
    classes = config_classes()
    paths = _shipped_configs()
    names = {yaml.safe_load(path.read_text()).get("method", {}).get("name") for path in paths}
    assert len(paths) >= 18 and names <= set(classes), names - set(classes)
    loaded = [load_experiment(path, classes).method_name for path in paths]
    assert len(loaded) == len(paths) and set(loaded) == names


def _shipped_configs():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    return sorted(p for p in root.rglob("*.yaml") if "accelerate" not in p.parts)  # accelerate's own configs


def test_accelerate_configs_load_and_sharded_engines_are_refused():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    from genalign.core.trainer import check_distributed_type

    folder = Path(__file__).resolve().parents[1] / "configs" / "accelerate"
    configs = sorted(folder.glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        cluster = ClusterConfig.from_yaml_file(str(path))
        assert str(cluster.distributed_type).endswith(("MULTI_GPU", "FSDP"))
        check_distributed_type(str(cluster.distributed_type))
    for engine in ("DistributedType.DEEPSPEED", "MEGATRON_LM"):
        with pytest.raises(ConfigError, match="fsdp_shard_grad_op.yaml"):
            check_distributed_type(engine)
    assert "--resume" in (folder / "slurm_multinode.sh").read_text()


@pytest.mark.parametrize("path", _shipped_configs(), ids=lambda p: p.name)
def test_every_shipped_config_is_valid(path):
    """Every config in configs/ names registered methods and rewards and passes the checks."""
    from genalign.core.experiment import load_experiment
    from genalign.finetuners import config_classes
    from genalign.rewards import REWARDS

    experiment = load_experiment(path, config_classes())
    assert all(r.name in REWARDS for r in experiment.reward)
    assert experiment.run.steps >= 1
