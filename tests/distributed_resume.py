"""Per-process fine-tuner state through a checkpoint; run under torchrun (N processes) or alone.

usage: python tests/distributed_resume.py OUT_DIR STEPS [--resume]
A toy fine-tuner keeps, per process, the prompts it has seen (like a rollout or a replay buffer
holds this process's samples); after training (or resuming) each process writes what it holds to
OUT_DIR/held-<rank>.json.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genalign.core.experiment import RunConfig  # noqa: E402
from genalign.core.trainer import Trainer  # noqa: E402
from tests.toy import ToyPromptRegression  # noqa: E402


class Holding(ToyPromptRegression):
    def __init__(self, config):
        super().__init__(config)
        self.held: list[str] = []

    def collect(self, prompts, generator):
        self.held.extend(prompts)
        return super().collect(prompts, generator)

    def process_state_dict(self):
        return {"held": list(self.held)}

    def load_process_state_dict(self, state):
        self.held = list(state["held"])


out, steps, resume = Path(sys.argv[1]), int(sys.argv[2]), "--resume" in sys.argv
toy = Holding(ToyPromptRegression.Config(dim=4))
run = RunConfig(output_dir=str(out / "run"), steps=steps, batch_size=2, lr=0.1, tracker="none",
                prompts=[f"p{i}" for i in range(8)], checkpoint_every=1, max_grad_norm=0.0, weight_decay=0.0)
trainer = Trainer(toy, run)
trainer.write_samples = lambda tag: None
trainer.train(resume="latest" if resume else None)
(out / f"held-{trainer.accelerator.process_index}.json").write_text(json.dumps(toy.held))
