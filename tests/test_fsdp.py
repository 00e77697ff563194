"""FSDP (torch's fully_shard) of the denoiser: the shipped accelerate configs, and real two-process
runs of the CLI (gloo) whose results equal plain data parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from genalign.core.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = ROOT / "configs" / "accelerate"
LORA = "final/pytorch_lora_weights.safetensors"


def _launch_env(config: Path) -> dict[str, str]:
    """The FSDP variables `accelerate launch --config_file config` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))
    return {k: v for k, v in prepare_multi_gpu_env(args).items() if "FSDP" in k}


@pytest.mark.parametrize(("name", "reshard"), [("fsdp.yaml", True), ("fsdp_shard_grad_op.yaml", False)])
def test_shipped_fsdp_configs_give_their_sharding_plan(monkeypatch, name, reshard):
    from genalign.core.sharding import plan_from_environment

    assert plan_from_environment() is None  # no FSDP launch, no sharding
    for key, value in _launch_env(ACCELERATE / name).items():
        monkeypatch.setenv(key, value)
    plan = plan_from_environment()
    assert plan is not None
    assert plan.reshard_after_forward is reshard and not plan.cpu_offload and plan.unit_classes == ()


def test_fsdp_version_1_strategies_map_onto_fully_shard(monkeypatch):
    from genalign.core.sharding import plan_from_environment

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    for strategy, reshard in (("FULL_SHARD", True), ("SHARD_GRAD_OP", False)):
        monkeypatch.setenv("FSDP_SHARDING_STRATEGY", strategy)
        assert plan_from_environment().reshard_after_forward is reshard
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "NO_SHARD")
    assert plan_from_environment() is None
    monkeypatch.setenv("FSDP_SHARDING_STRATEGY", "HYBRID_SHARD")
    with pytest.raises(ConfigError, match="HYBRID_SHARD"):
        plan_from_environment()


CONFIG = """\
backbone: {{family: sd, path: {root}/models/shapes/sd, finetune: lora, lora_rank: 4, lora_alpha: 4}}
reward: {{name: clip, path: {root}/models/shapes/clip}}
method: {{name: diffusion_dpo, beta: 2500, pairs: online, pairs_from: policy, samples_per_prompt: 2,
         reference_update_rate: 0.5}}
sample: {{num_steps: 3, guidance_scale: 2.0}}
run: {{steps: 2, batch_size: 2, lr: 0.1, adam_eps: 1.0, checkpoint_every: 1, tracker: none,
      prompts: ["a red circle", "two blue squares", "a green triangle", "a yellow star"]}}
"""


# adam_eps 1: updates proportional to the gradients. Adam's first steps are otherwise sign-like,
# and a gradient entry within float noise of 0 (the LoRA's A at step 2) flips a whole lr step.


def _train(tmp_path: Path, out: str, fsdp: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    env = {k: v for k, v in env.items() if not k.startswith(("FSDP_", "ACCELERATE_"))}
    if fsdp is not None:
        env.update(_launch_env(ACCELERATE / fsdp))
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "genalign",
         "train", str(tmp_path / "config.yaml"), f"run.output_dir={tmp_path / out}", *extra],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_fsdp_training_equals_data_parallel_and_checkpoints_move_between_them(tmp_path):
    """Two processes, Diffusion-DPO with a moving (swapped-in) reference on the shapes model:
    FULL_SHARD gives the weights of plain data parallelism; a data-parallel checkpoint resumes
    under SHARD_GRAD_OP (full tensors into shards) and ends where the others did."""
    (tmp_path / "config.yaml").write_text(CONFIG.format(root=ROOT))
    _train(tmp_path, "ddp", None)
    sharded = _train(tmp_path, "full_shard", "fsdp.yaml")
    assert "FSDP (FULL_SHARD): denoiser sharded over 2 processes" in sharded.stdout
    held, total = map(int, sharded.stdout.split("this process holds ")[1].split(" parameters")[0].split(" of its "))
    assert abs(held - total / 2) < 0.01 * total  # each process holds half the denoiser

    resumed = tmp_path / "grad_op"
    (resumed / "checkpoints").mkdir(parents=True)
    subprocess.run(["cp", "-r", str(tmp_path / "ddp" / "checkpoints" / "step-000001"), str(resumed / "checkpoints")],
                   check=True)
    grad_op = _train(tmp_path, "grad_op", "fsdp_shard_grad_op.yaml", "--resume")
    assert "FSDP (SHARD_GRAD_OP)" in grad_op.stdout and "resumed from" in grad_op.stdout

    ddp = load_file(str(tmp_path / "ddp" / LORA))
    steps = [load_file(str(tmp_path / "ddp" / "checkpoints" / s / "trainable.safetensors"))
             for s in ("step-000001", "step-000002")]
    assert _max_difference(*steps) > 2e-3  # the second step, the resumed one, moved the LoRA
    first = json.loads((tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["grad_norm"] > 2.0  # above run.max_grad_norm = 1: the sharded clipping is compared too
    for run in ("full_shard", "grad_op"):
        assert _max_difference(load_file(str(tmp_path / run / LORA)), ddp) < 2e-5, run
    # the FSDP-written checkpoint holds full tensors equal to the data-parallel one's
    for step in ("step-000001", "step-000002"):
        name = f"checkpoints/{step}/trainable.safetensors"
        assert _max_difference(load_file(str(tmp_path / "full_shard" / name)), load_file(str(tmp_path / "ddp" / name))) < 2e-5


FULL_CONFIG = """\
backbone: {{family: sd, path: {root}/models/shapes/sd, finetune: full}}
reward: {{name: clip, path: {root}/models/shapes/clip}}
method: {{name: d3po, beta: 0.1, clip_range: 0.1, samples_per_prompt: 2, timestep_fraction: 0.5}}
sample: {{num_steps: 3, guidance_scale: 2.0, eta: 1.0}}
run: {{steps: 1, batch_size: 2, lr: 0.1, adam_eps: 1.0, checkpoint_every: 0, tracker: none,
      prompts: ["a red circle", "two blue squares", "a green triangle", "a yellow star"]}}
"""


def test_fsdp_full_fine_tuning_shards_the_reference_and_exports_a_loadable_denoiser(tmp_path):
    """Full fine-tuning: the frozen reference copy is sharded as well, and the export is gathered
    into a plain diffusers UNet folder equal to data parallelism's."""
    from diffusers import UNet2DConditionModel

    (tmp_path / "config.yaml").write_text(FULL_CONFIG.format(root=ROOT))
    _train(tmp_path, "ddp", None)
    sharded = _train(tmp_path, "full_shard", "fsdp.yaml")
    units = int(sharded.stdout.split("processes in ")[1].split(" units")[0])
    model = UNet2DConditionModel.from_pretrained(str(tmp_path / "full_shard" / "final" / "denoiser"))
    assert type(model) is UNet2DConditionModel  # the folder names the plain class, not FSDPUNet2DConditionModel
    blocks = sum(type(m).__name__ in model._no_split_modules for m in model.modules())
    assert units == 2 * (blocks + 1)  # denoiser and reference copy: every block and the root each
    trained = model.state_dict()
    ddp = UNet2DConditionModel.from_pretrained(str(tmp_path / "ddp" / "final" / "denoiser")).state_dict()
    start = UNet2DConditionModel.from_pretrained(str(ROOT / "models" / "shapes" / "sd"), subfolder="unet").state_dict()
    assert _max_difference({k: v.float() for k, v in ddp.items()}, {k: v.float() for k, v in start.items()}) > 1e-3
    assert _max_difference(trained, ddp) < 2e-5


def test_a_batch_with_nothing_to_train_fails_clearly_under_fsdp_instead_of_skipping_passes():
    from types import SimpleNamespace

    from genalign.finetuners.common import BackboneMethod

    class Method(BackboneMethod):  # the base class leaves collect and loss to each method
        def collect(self, prompts, generator):
            return None

        def loss(self, batch):
            return self.zero_loss(), {}

    method = Method()
    method.params = {"w": torch.nn.Parameter(torch.ones(3))}
    method.backbone = SimpleNamespace(sharded=False)
    loss = method.zero_loss()
    loss.backward()
    assert loss.detach().item() == 0.0 and torch.equal(method.params["w"].grad, torch.zeros(3))
    method.backbone = SimpleNamespace(sharded=True)
    with pytest.raises(RuntimeError, match="cannot skip its denoiser passes"):
        method.zero_loss()


ROUTING_SCRIPT = """\
import sys

import torch
import torch.distributed as dist

from genalign.core.experiment import BackboneConfig
from genalign.core.sharding import ShardingPlan
from genalign.pipelines import load_backbone

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
backbone = load_backbone(BackboneConfig(family="wan", path=sys.argv[1], finetune="lora", lora_rank=4, lora_alpha=4,
                                        expert="low", frames=5, resolution=16))
x = torch.randn(4, *backbone.latent_shape())
embeds = torch.randn(4, 8, backbone.pipe.transformer.config.text_dim)
t = torch.tensor([950.0, 950.0, 500.0, 300.0])  # high, high (the frozen expert), low, low (the trained one)
if sys.argv[3] == "one":  # the reference: one process, the whole batch
    out = backbone._denoise(x, t, {"prompt_embeds": embeds})
    (out.pow(2).sum() / 4).backward()
    grads = {n: p.grad for n, p in backbone.unwrapped_denoiser.named_parameters() if p.requires_grad}
else:  # rank 0 holds only high-noise samples: it runs the trained expert for nothing, with rank 1
    backbone.shard(ShardingPlan())
    rows = slice(0, 2) if rank == 0 else slice(2, 4)
    part = backbone._denoise(x[rows], t[rows], {"prompt_embeds": embeds[rows]})
    (part.pow(2).sum() / 4 * 2).backward()  # FSDP averages gradients over the 2 processes
    parts = [torch.empty_like(part) for _ in range(2)]
    dist.all_gather(parts, part.detach())
    out = torch.cat(parts)
    grads = {n: p.grad.full_tensor() for n, p in backbone.unwrapped_denoiser.named_parameters() if p.requires_grad}
if rank == 0:
    torch.save({"out": out.detach(), "grads": grads}, sys.argv[2])
dist.destroy_process_group()
"""


def _torchrun(tmp_path: Path, processes: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    script = tmp_path / "routing.py"
    script.write_text(ROUTING_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                             str(processes), str(script), *args], env=env, capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]


def test_wan22_expert_routing_under_fsdp_equals_one_process_when_a_process_has_no_sample_for_an_expert(
        tiny_models, tmp_path):
    """Wan 2.2 A14B under FSDP: both experts sharded; rank 0's samples are all high-noise (the
    frozen expert) and rank 1's all low-noise (the trained one). Without a matching forward on rank
    0 the trained expert's all-gather would wait for ever; with it, outputs and LoRA gradients
    equal one process running the whole batch."""
    path = tiny_models("wan22", "flow")
    _torchrun(tmp_path, 1, path, str(tmp_path / "one.pt"), "one")
    _torchrun(tmp_path, 2, path, str(tmp_path / "two.pt"), "two")
    one, two = torch.load(tmp_path / "one.pt", weights_only=True), torch.load(tmp_path / "two.pt", weights_only=True)
    assert torch.allclose(one["out"], two["out"], atol=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 0
    assert max(float(g.abs().max()) for g in one["grads"].values()) > 1e-4  # the trained expert has a gradient
    assert _max_difference(one["grads"], two["grads"]) < 1e-5
