"""``backbone.compile`` under data parallelism and FSDP: two processes (gloo, torchrun) train the
shapes Diffusion-DPO for two steps (the FSDP tests' config: a moving reference, gradient clipping),
eagerly and with ``backbone.compile=all`` (compiled from the first call), under DDP and under FSDP
FULL_SHARD; prints each compiled run's largest LoRA difference from the eager DDP run and the
logged losses. Equal within float rounding is the pass mark (a few 1e-7 here: compiled kernels
round differently). Minutes of CPU (each process compiles); not in the test suite for that reason.

    .venv/bin/python bench/compile_parallel.py --out runs/compile-parallel
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    from tests.test_fsdp import ACCELERATE, CONFIG, LORA, _launch_env

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compile-parallel")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(CONFIG.format(root=ROOT))
    runs = {"ddp": (None, []), "ddp, compiled": (None, ["backbone.compile=all", "backbone.compile_warmup=0"]),
            "fsdp, compiled": ("fsdp.yaml", ["backbone.compile=all", "backbone.compile_warmup=0"])}
    for name, (fsdp, overrides) in runs.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FSDP_", "ACCELERATE_"))}
        env |= {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
        if fsdp is not None:
            env |= _launch_env(ACCELERATE / fsdp)
        folder = out / name.replace(", ", "-")
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 "-m", "genalign", "train", str(out / "config.yaml"), f"run.output_dir={folder}",
                                 *overrides], env=env, capture_output=True, text=True, cwd=ROOT)
        if result.returncode:
            print(result.stderr[-3000:])
            return 1
        print(f"{name}: trained", flush=True)
    reference = load_file(str(out / "ddp" / LORA))
    summary = {}
    for name in runs:
        folder = out / name.replace(", ", "-")
        lora = load_file(str(folder / LORA))
        difference = max(float((lora[k] - reference[k]).abs().max()) for k in reference)
        losses = [json.loads(line)["loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
        summary[name] = {"max_lora_difference": difference, "losses": losses}
        print(f"| {name} | {difference:.1e} | {', '.join(f'{x:.6f}' for x in losses)} |")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
