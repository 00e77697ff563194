"""One optimizer step of toy_prompt_regression; run under torchrun (N processes) or alone.

usage: python tests/distributed_step.py OUT_DIR BATCH_PER_PROCESS
Writes OUT_DIR/weight.safetensors and OUT_DIR/metrics.json (main process).
"""

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genalign.core.experiment import RunConfig  # noqa: E402
from genalign.core.trainer import Trainer  # noqa: E402
from tests.toy import ToyPromptRegression  # noqa: E402

out, batch = Path(sys.argv[1]), int(sys.argv[2])
toy = ToyPromptRegression(ToyPromptRegression.Config(dim=4))
run = RunConfig(output_dir=str(out / "run"), steps=1, batch_size=batch, lr=0.1, tracker="none",
                prompts=[f"p{i}" for i in range(8)], checkpoint_every=0, max_grad_norm=0.0, weight_decay=0.0)
trainer = Trainer(toy, run)
trainer.write_samples = lambda tag: None  # not what this test is about
own_rewards = []
loss_of = toy.loss


def recording_loss(batch):
    loss, metrics = loss_of(batch)
    own_rewards.append(float(metrics["reward"]))  # this process's value, before the cross-rank mean
    return loss, metrics


toy.loss = recording_loss
result = trainer.train()
if trainer.accelerator.is_main_process:
    save_file({"weight": toy.model.weight.detach().contiguous()}, str(out / "weight.safetensors"))
    (out / "metrics.json").write_text(json.dumps({**result.history[0], "world": trainer.accelerator.num_processes,
                                                  "rank0_reward": own_rewards[0]}))
