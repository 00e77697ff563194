"""Two real processes (gloo, torchrun) against one: the data-parallel step is the big-batch step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).with_name("distributed_step.py")


def test_two_processes_with_batch_b_equal_one_process_with_batch_2b(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(SCRIPT), str(tmp_path / "two"), "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "one"), "4"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    metrics_two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    metrics_one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert metrics_two["world"] == 2 and metrics_one["world"] == 1
    w_two = load_file(str(tmp_path / "two" / "weight.safetensors"))["weight"]
    w_one = load_file(str(tmp_path / "one" / "weight.safetensors"))["weight"]
    start = ToyStart.weight()
    assert (w_one - start).abs().max() > 1e-3  # the step moved the weights
    torch.testing.assert_close(w_two, w_one, rtol=1e-5, atol=1e-6)
    # the logged loss and reward are means over ranks = the big-batch values (rank 0 alone would differ)
    for key in ("loss", "reward"):
        assert abs(metrics_two[key] - metrics_one[key]) < 1e-5 * max(1.0, abs(metrics_one[key])), key
    assert abs(metrics_two["rank0_reward"] - metrics_one["reward"]) > 1e-4  # ... which it really does


class ToyStart:
    @staticmethod
    def weight() -> torch.Tensor:
        from tests.toy import ToyPromptRegression

        return ToyPromptRegression(ToyPromptRegression.Config(dim=4)).model.weight.detach()


def test_value_statistics_are_averaged_over_processes(tmp_path):
    """mean_over_processes (VARD's adaptive KL weight) and average_gradients (the trainer's and the
    value models' gradients; a gradient one process lacks counts as zeros): every process ends with
    the mean of the processes' values."""
    script = tmp_path / "mean.py"
    script.write_text(
        "import sys, torch, torch.distributed as dist\n"
        "from genalign.core.distributed import average_gradients, mean_over_processes\n"
        "dist.init_process_group('gloo')\n"
        "rank = dist.get_rank()\n"
        "kl = mean_over_processes(torch.tensor([1.0 + 2.0 * rank]))\n"
        "head = torch.nn.Linear(2, 1)\n"
        "head.weight.grad = torch.full((1, 2), float(rank)); head.bias.grad = torch.tensor([4.0 * rank]) if rank else None\n"
        "average_gradients(list(head.parameters()))\n"
        "open(f'{sys.argv[1]}/{rank}.txt', 'w').write(f'{kl.item()} {head.weight.grad.tolist()} {head.bias.grad.item()}')\n"
        "dist.destroy_process_group()\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    # ranks 0 and 1: KL 1 and 3 -> 2; weight gradients 0 and 1 -> 0.5; bias 0 and 4 -> 2
    assert (tmp_path / "0.txt").read_text() == (tmp_path / "1.txt").read_text() == "2.0 [[0.5, 0.5]] 2.0"


def test_batch_statistics_of_two_processes_are_those_of_one_with_the_whole_batch(tiny_models, tmp_path):
    """DDPO's stat tracker (its batch fallback, then per prompt), Flow-GRPO's group advantages over
    the batch std, VARD's (and AC-Flow's: the same scored rollout) value targets under running and
    batch shaping: two gloo processes with half the batch each compute, row for row, what one process
    computes with the whole batch, and hold the same tracker and running statistics; the value head
    trained on a fixed batch split over the two ends with the same weights. Undone (statistics per
    process), the advantages differ by up to 0.16 on these rewards."""
    script = Path(__file__).with_name("distributed_batch_stats.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    models = [tiny_models("sd"), tiny_models("sd3", "flow")]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "two"), *models], env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one"), *models], env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    whole = json.loads((tmp_path / "one" / "rank-0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for key in ("flow_grpo", "vard_batch"):
        assert ranks[0][key] + ranks[1][key] == pytest.approx(whole[key], abs=1e-5), key
    for key in ("ddpo", "vard_running"):
        for k in range(2):
            assert ranks[0][key][k] + ranks[1][key][k] == pytest.approx(whole[key][k], abs=1e-5), (key, k)
    assert ranks[0]["tracker"] == ranks[1]["tracker"] == whole["tracker"]
    assert ranks[0]["running"] == ranks[1]["running"] == pytest.approx(whole["running"])
    for name, values in whole["value_weights"].items():
        assert ranks[0]["value_weights"][name] == ranks[1]["value_weights"][name], name
        assert ranks[0]["value_weights"][name] == pytest.approx(values, abs=1e-5), name


def test_each_process_resumes_its_own_fine_tuner_state(tmp_path):
    """A method's per-process state (its rollout, its replay buffer: ``process_state_dict``) goes into
    the checkpoint once per process and each process resumes its own: two processes trained 2 steps
    and resumed for a third hold, each, exactly its own prompts, as one uninterrupted 3-step run
    does; the shared state is the main process's as before."""
    script = Path(__file__).with_name("distributed_resume.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    for args in ([str(tmp_path / "cut"), "2"], [str(tmp_path / "cut"), "3", "--resume"], [str(tmp_path / "whole"), "3"]):
        run = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stderr[-3000:]
    checkpoint = tmp_path / "cut" / "run" / "checkpoints" / "step-000002"
    assert {p.name for p in checkpoint.glob("finetuner-rank-*.pt")} == {"finetuner-rank-0.pt", "finetuner-rank-1.pt"}
    held = {r: json.loads((tmp_path / "cut" / f"held-{r}.json").read_text()) for r in (0, 1)}
    whole = {r: json.loads((tmp_path / "whole" / f"held-{r}.json").read_text()) for r in (0, 1)}
    assert held == whole and held[0] != held[1] and len(held[0]) == 6  # 3 steps x 2 prompts, its own
