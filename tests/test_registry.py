"""One registry mechanism for methods, backbones and rewards (genalign.core.registry)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from genalign.core.config import ConfigError
from genalign.core.registry import registered_names


def test_registered_names_reads_the_decorator_through_the_modules_imports():
    source = textwrap.dedent('''
        import genalign.rewards as rw
        from genalign.finetuners import register
        from genalign.rewards import register as add_reward
        from elsewhere import register as other

        @register("method_a")
        class A: ...

        @other("not_ours")
        class B: ...

        @add_reward("reward_c")
        class C: ...

        @rw.register("reward_d")
        class D: ...

        register("method_e")(A)
        register(NAME)(A)  # not a literal: cannot be read
    ''')
    assert registered_names(source, {"genalign.finetuners.register"}) == ["method_a", "method_e"]
    assert sorted(registered_names(source, {"genalign.rewards.register"})) == ["reward_c", "reward_d"]
    relative = 'from . import register\n\n@register("method_f")\nclass F: ...\n'
    assert registered_names(relative, {"genalign.finetuners.register"}, module="genalign.finetuners.f") == ["method_f"]
    assert registered_names(relative, {"genalign.finetuners.register"}, module="elsewhere.f") == []


def _package(root, name: str) -> None:
    folder = root / name
    folder.mkdir()
    (folder / "__init__.py").write_text(textwrap.dedent(f'''
        from genalign.core.registry import Registry
        THINGS = Registry("thing.name", decorator="{name}.register", packages=["{name}"])

        def register(name):
            return THINGS.register(name)
    '''))
    (folder / "alpha.py").write_text(f'from {name} import register\n\n@register("alpha")\nclass Alpha: ...\n')
    (folder / "beta.py").write_text(f'from {name} import register\n\n@register("beta")\nclass Beta: ...\n'
                                    f'register("beta2")(Beta)\n')
    (folder / "delta.py").write_text(f'from {name} import register\nfrom {name}.beta import Beta\n\n'
                                     f'register("delta")(Beta)  # a class defined elsewhere\n'
                                     f'if False:\n    register("never")(Beta)\n')


def test_a_registry_finds_its_files_without_importing_them_and_imports_on_first_use(tmp_path, monkeypatch):
    _package(tmp_path, "regpkg")
    monkeypatch.syspath_prepend(str(tmp_path))
    import regpkg

    try:
        assert regpkg.THINGS.names() == ["alpha", "beta", "beta2", "delta", "never"]
        assert "regpkg.alpha" not in sys.modules and "regpkg.beta" not in sys.modules
        assert regpkg.THINGS.get("beta").__name__ == "Beta"
        assert "regpkg.beta" in sys.modules and "regpkg.alpha" not in sys.modules
        assert regpkg.THINGS.get("beta2") is regpkg.THINGS.get("beta")
        assert regpkg.THINGS.get("delta") is regpkg.THINGS.get("beta")
        with pytest.raises(ConfigError, match="'never': regpkg.delta names it but did not register it"):
            regpkg.THINGS.get("never")
        with pytest.raises(ConfigError, match="unknown thing.name 'gamma'; available: alpha, beta, beta2"):
            regpkg.THINGS.get("gamma")

        @regpkg.register("gamma")  # registered at run time, outside the package
        class Gamma: ...

        assert regpkg.THINGS.get("gamma") is Gamma and "gamma" in regpkg.THINGS.names()
        with pytest.raises(ValueError, match="'alpha' is registered twice"):
            regpkg.register("alpha")(Gamma)
        assert [regpkg.THINGS.get(n).__name__ for n in ("alpha", "beta2", "delta", "gamma")] == [
            "Alpha", "Beta", "Beta", "Gamma"]
    finally:
        for name in [m for m in sys.modules if m == "regpkg" or m.startswith("regpkg.")]:
            del sys.modules[name]


def test_the_shipped_names_are_known_before_any_method_backbone_or_reward_module_is_imported():
    code = textwrap.dedent('''
        import sys
        from genalign.finetuners import METHODS
        from genalign.pipelines import BACKBONES
        from genalign.rewards import REWARDS
        print(METHODS.names()); print(BACKBONES.names()); print(REWARDS.names())
        loaded = [m for m in sys.modules if m.startswith(("genalign.finetuners.", "genalign.pipelines.", "genalign.rewards."))]
        print(sorted(loaded))
    ''')
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    methods, backbones, rewards, loaded = (eval(line) for line in out)  # noqa: S307 (our own printed lists)
    assert {"diffusion_dpo", "inversion_dpo", "d3po", "adjoint_matching", "ac_flow", "vard", "ddpo",
            "flow_grpo"} <= set(methods)
    assert {"flux", "sd", "sd-turbo", "sd3", "sdxl", "sdxl-turbo"} <= set(backbones)
    assert {"clip", "pickscore", "hps", "image_reward", "aesthetic", "vlm", "geneval", "shapes_gold", "ensemble",
            "reno"} <= set(rewards)
    # only the packages' shared pieces are loaded, none of the method / family / adapter files
    assert set(loaded) <= {"genalign.pipelines.base", "genalign.rewards.base"}, loaded


def test_a_backbone_family_in_one_file_is_loaded_by_name_and_samples_as_its_base(tiny_models):
    from genalign.core.experiment import BackboneConfig
    from genalign.core.sampler import initial_noise, sample
    from genalign.pipelines import BACKBONES, load_backbone
    from tests.toy_backbone import ToyStableDiffusion

    assert "toy-sd" in BACKBONES.names()
    path = tiny_models("sd")
    toy = load_backbone(BackboneConfig(family="toy-sd", path=path, finetune="none"))
    base = load_backbone(BackboneConfig(family="sd", path=path, finetune="none"))
    assert type(toy) is ToyStableDiffusion
    images = []
    for backbone in (toy, base):
        noise = initial_noise(backbone, 2, torch.Generator().manual_seed(0))
        cond = backbone.encode_prompts(["a red circle", "two squares"], guidance=True)
        images.append(sample(backbone, cond, num_steps=3, guidance_scale=2.0, latents=noise).latents)
    torch.testing.assert_close(images[0], images[1], rtol=0, atol=0)
    with pytest.raises(ConfigError, match="unknown backbone.family 'toy-sdx'.*toy-sd"):
        load_backbone(BackboneConfig(family="toy-sdx", path=path))


def test_a_family_file_declares_its_tiny_layout(tmp_path, capsys):
    """`genalign tiny` knows the toy family from its file alone; an unknown layout lists them all."""
    from genalign.cli import main
    from tests.toy_backbone import ToyStableDiffusion  # noqa: F401 - registers toy-sd

    assert main(["tiny", "toy-sd", str(tmp_path / "toy")]) == 0
    assert main(["tiny", "sd", str(tmp_path / "sd")]) == 0
    toy = (tmp_path / "toy" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert toy != (tmp_path / "sd" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()  # seed + 1
    assert main(["tiny", "sdx", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "no tiny layout 'sdx'" in err and "flux-schnell" in err and "toy-sd" in err


def test_the_demo_detects_a_folders_family_from_what_each_backbone_claims(tmp_path):
    import json

    from genalign.demo.config import detect_family

    expected = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl",
                "StableDiffusion3Pipeline": "sd3", "FluxPipeline": "flux", "KandinskyPipeline": "default"}
    for class_name, family in expected.items():
        folder = tmp_path / class_name
        folder.mkdir()
        (folder / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
        assert detect_family(str(folder), default="default") == family, class_name
    assert detect_family(str(tmp_path / "missing"), default="sd3") == "sd3"
