"""Batch statistics across processes, with the real methods on tiny models; run under torchrun
(N processes, gloo) or alone.

usage: python tests/distributed_batch_stats.py OUT_DIR TINY_SD TINY_SD3
Each process samples its share of 4 prompts x 2 images; rewards come from fixed tables by the
image's row in the whole batch (what is compared is what the methods make of the rewards, not the
images). Writes OUT_DIR/rank-<rank>.json: DDPO's advantages over two rollouts and its stat
tracker, Flow-GRPO's group advantages, VARD's value targets (running and batch shaping, the
running statistics) and the value head's weights after training on a fixed batch.
"""

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genalign.core.experiment import BackboneConfig, SampleConfig  # noqa: E402
from genalign.finetuners.ddpo import DDPO, DDPOConfig  # noqa: E402
from genalign.finetuners.flow_grpo import FlowGRPO, FlowGRPOConfig  # noqa: E402
from genalign.finetuners.vard import VARD, VARDConfig  # noqa: E402
from genalign.pipelines import load_backbone  # noqa: E402

torch.set_num_threads(1)
out, tiny_sd, tiny_sd3 = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
if world > 1:
    torch.distributed.init_process_group("gloo")
PROMPTS = ["a red circle", "a blue square", "a green triangle", "two yellow circles"]
share = len(PROMPTS) // world
mine = PROMPTS[rank * share : (rank + 1) * share]
TABLES = [torch.tensor([0.1, 0.9, 0.4, 0.4, 0.7, 0.2, 0.3, 0.8]),
          torch.tensor([0.6, 0.5, 0.2, 0.9, 0.1, 0.1, 0.7, 0.3]),
          torch.tensor([0.3, 0.2, 0.8, 0.5, 0.9, 0.6, 0.0, 0.4])]


class TableReward:
    """The k-th call's rewards are TABLES[k] at this process's rows of the whole batch."""

    differentiable = False

    def __init__(self):
        self.calls = 0

    def __call__(self, images, prompts, metadata=None):
        table = TABLES[self.calls % len(TABLES)]
        self.calls += 1
        start = rank * len(prompts)
        scores = table[start : start + len(prompts)].clone()
        return scores, {"table": scores}


def build(cls, config, family, path, eta):
    torch.manual_seed(0)  # LoRA and value-head initialisations: the same on every process
    backbone = load_backbone(BackboneConfig(family=family, path=path, finetune="lora", lora_rank=4), "cpu")
    experiment = SimpleNamespace(method=config, sample=SampleConfig(num_steps=2, guidance_scale=1.0, eta=eta))
    return cls.build(experiment, backbone, TableReward())


result = {}
generator = torch.Generator().manual_seed(100 + rank)
ddpo = build(DDPO, DDPOConfig(samples_per_prompt=2, minibatches=1, buffer_size=4, min_count=3), "sd", tiny_sd, 1.0)
result["ddpo"] = []
for _ in range(2):  # the first rollout falls back to the batch's statistics, the second uses each prompt's
    ddpo.collect(mine, generator)
    result["ddpo"].append(ddpo.rollout["advantages"].tolist())
result["tracker"] = {p: list(b) for p, b in ddpo.tracker.buffers.items()}

grpo = build(FlowGRPO, FlowGRPOConfig(samples_per_prompt=2, minibatches=1, beta=0.0), "sd3", tiny_sd3, 0.7)
grpo.collect(mine, generator)
result["flow_grpo"] = grpo.rollout["advantages"].tolist()

vard = build(VARD, VARDConfig(samples_per_prompt=2, value_inputs="latent", replay_size=0, value_updates=3),
             "sd", tiny_sd, 1.0)
result["vard_running"] = [vard.scored_rollout(mine, 2, "running", generator)[2].tolist() for _ in range(2)]
result["running"] = vard.learner.running.state_dict()
result["vard_batch"] = vard.scored_rollout(mine, 2, "batch", generator)[2].tolist()
# the value head on a fixed batch of 8 states split across the processes: the same weights after training
states = torch.randn(8, *vard.backbone.latent_shape(), generator=torch.Generator().manual_seed(7))
rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
repeated = [p for p in PROMPTS for _ in range(2)][rows]
features = vard.learner.featurize(states[rows], torch.full((8 // world,), 500.0),
                                  vard.backbone.encode_prompts(repeated, guidance=False))
vard.learner.remember({**features, "target": torch.linspace(-1, 1, 8)[rows]})
vard.learner.train(torch.Generator().manual_seed(5))
result["value_weights"] = {name: p.detach().flatten().tolist() for name, p in vard.learner.model.named_parameters()}

out.mkdir(parents=True, exist_ok=True)
(out / f"rank-{rank}.json").write_text(json.dumps(result))
if world > 1:
    torch.distributed.destroy_process_group()
