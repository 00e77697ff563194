"""The shared trainer loop: learning, exact resume, NaN guard, checkpoints, logging, precision."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from safetensors.torch import load_file

from genalign.core.config import ConfigError
from genalign.core.experiment import BackboneConfig, RunConfig, SampleConfig
from genalign.core.trainer import NonFiniteError, PromptSource, Trainer, make_accelerator
from tests.toy import ToyDenoising, ToyRegression

PROMPTS = [f"prompt {i}" for i in range(5)]


def _run(tmp_path, **kwargs):
    defaults = dict(output_dir=str(tmp_path), steps=8, batch_size=4, lr=0.05, tracker="none", prompts=PROMPTS,
                    checkpoint_every=3)
    return RunConfig(**{**defaults, **kwargs})


def _toy(**kwargs):
    return ToyRegression(ToyRegression.Config(**kwargs))


def test_trainer_learns_and_writes_its_outputs(tmp_path):
    toy = _toy()
    run = _run(tmp_path, steps=40, tracker="tensorboard", sample_every=20)
    start = ((toy.model.weight - toy.target.T) ** 2).mean().item()
    result = Trainer(toy, run, SampleConfig(prompts=["x", "y"])).train()
    end = ((toy.model.weight - toy.target.T) ** 2).mean().item()
    assert result.steps_done == 40 and result.skipped_steps == 0
    assert end < 0.2 * start
    assert result.history[-1]["loss"] < 0.2 * result.history[0]["loss"]
    assert (tmp_path / "config.yaml").is_file()
    assert (tmp_path / "samples" / "step-000020.png").is_file() and (tmp_path / "samples" / "final.png").is_file()
    assert list((tmp_path / "genalign").glob("events.out.tfevents.*")), "tensorboard wrote no events"
    exported = load_file(str(tmp_path / "final" / "model.safetensors"))["weight"]
    torch.testing.assert_close(exported, toy.model.weight.detach())


def test_a_killed_run_resumes_exactly(tmp_path):
    """Interrupted at step 6 of 8 (last checkpoint at 3) and resumed: bit-identical weights."""
    common = dict(steps=8, lr_scheduler="cosine", warmup_steps=2, grad_accum=2, ema=True, ema_decay=0.9)
    straight = _toy()
    Trainer(straight, _run(tmp_path / "a", **common)).train()

    crashed = _toy(crash_at_call=11)  # loss() call 11 = step 6, micro-step 1
    with pytest.raises(KeyboardInterrupt):
        Trainer(crashed, _run(tmp_path / "b", **common)).train()
    resumed = _toy()
    trainer = Trainer(resumed, _run(tmp_path / "b", **common))
    result = trainer.train(resume="latest")
    assert result.steps_done == 8
    assert torch.equal(resumed.model.weight, straight.model.weight)
    final_a = load_file(str(tmp_path / "a" / "final" / "model.safetensors"))["weight"]
    final_b = load_file(str(tmp_path / "b" / "final" / "model.safetensors"))["weight"]
    assert torch.equal(final_a, final_b)  # the EMA export too
    assert not torch.equal(final_a, straight.model.weight)  # ... which is really the EMA
    # metrics.jsonl: each step once, the redone steps' lines replaced, equal to the straight run's
    logs = [[json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()] for d in "ab"]
    assert [row["step"] for row in logs[1]] == list(range(1, 9))
    assert [row["loss"] for row in logs[1]] == [row["loss"] for row in logs[0]]
    Trainer(_toy(), _run(tmp_path / "a", **common)).train()  # a fresh run in a used folder
    assert len((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()) == 8


def test_nan_loss_stops_the_run_naming_the_step_and_saves_nothing_corrupt(tmp_path):
    toy = _toy(nan_at_call=5)
    with pytest.raises(NonFiniteError, match=r"step 5: loss.*not finite"):
        Trainer(toy, _run(tmp_path)).train()
    assert torch.isfinite(toy.model.weight).all()
    checkpoints = sorted((tmp_path / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-000003"]
    assert torch.isfinite(load_file(str(checkpoints[0] / "trainable.safetensors"))["weight"]).all()


def test_nan_tolerance_skips_the_step_and_counts_it(tmp_path):
    toy = _toy(nan_at_call=5)
    result = Trainer(toy, _run(tmp_path, nan_tolerance=1)).train()
    assert result.steps_done == 8 and result.skipped_steps == 1 and len(result.history) == 7
    assert torch.isfinite(toy.model.weight).all()


def test_only_the_last_checkpoints_are_kept_and_half_written_ones_ignored(tmp_path):
    trainer = Trainer(_toy(), _run(tmp_path, steps=10, checkpoint_every=2, keep_checkpoints=2))
    trainer.train()
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step-000008", "step-000010"]
    # a crash during a save leaves a temp folder or a folder without the marker: never resumed from
    (tmp_path / "checkpoints" / ".tmp-step-000012").mkdir()
    (tmp_path / "checkpoints" / "step-000014").mkdir()
    assert trainer.checkpoints()[-1].name == "step-000010"


def test_prompt_source_cycles_epochs_and_shards_ranks():
    source = PromptSource(PROMPTS, seed=1)
    first_epoch = source.next(5)
    assert sorted(first_epoch) == sorted(PROMPTS)
    state = source.state_dict()
    ahead = source.next(3)
    source.load_state_dict(state)
    assert source.next(3) == ahead
    ranks = [PromptSource(PROMPTS, seed=1, rank=r, world_size=2) for r in range(2)]
    pairs = [r.next(2) for r in ranks]
    assert pairs[0] + pairs[1] != [] and sorted(pairs[0][:1] + pairs[1][:1] + pairs[0][1:] + pairs[1][1:]) == sorted(
        PromptSource(PROMPTS, seed=1).next(4)
    )


@pytest.fixture
def tiny_lora(tiny_models):
    from genalign.pipelines import load_backbone

    path = tiny_models("sd")

    def make(device="cpu"):
        torch.manual_seed(0)  # the LoRA init draws from the global RNG (the CLI seeds it from run.seed)
        return load_backbone(BackboneConfig(family="sd", path=path, finetune="lora", lora_rank=2), device)

    return make


def test_lora_training_on_a_real_backbone_resumes_exactly_and_exports_diffusers_lora(tmp_path, tiny_lora):
    run = dict(steps=4, batch_size=2, lr=1e-2, checkpoint_every=2, sample_every=0)
    straight = ToyDenoising(ToyDenoising.Config(), tiny_lora())
    result = Trainer(straight, _run(tmp_path / "a", **run)).train()
    assert result.history[0]["mse"] > 0
    half = ToyDenoising(ToyDenoising.Config(), tiny_lora())
    Trainer(half, _run(tmp_path / "b", **{**run, "steps": 2})).train()
    resumed = ToyDenoising(ToyDenoising.Config(), tiny_lora())
    Trainer(resumed, _run(tmp_path / "b", **run)).train(resume=str(tmp_path / "b" / "checkpoints" / "step-000002"))
    for (name, a), b in zip(straight.named_trainable_parameters().items(), resumed.named_trainable_parameters().values()):
        assert torch.equal(a, b), name
    assert (tmp_path / "a" / "final" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "a" / "samples" / "final.png").is_file()


def test_bf16_autocast_gives_the_fp32_loss_within_tolerance(tmp_path, tiny_lora):
    losses = {}
    for precision in ("no", "bf16"):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        run = _run(tmp_path / precision, steps=1, batch_size=4, mixed_precision=precision)
        accelerator = make_accelerator(run)
        finetuner = ToyDenoising(ToyDenoising.Config(), tiny_lora(accelerator.device))
        trainer = Trainer(finetuner, run, accelerator=accelerator)
        with torch.no_grad(), trainer.accelerator.autocast():
            losses[precision] = finetuner.loss(finetuner.collect(PROMPTS[:4], torch.Generator().manual_seed(0)))[0]
        trainer.train()
        assert all(p.dtype == torch.float32 for p in finetuner.named_trainable_parameters().values())
    assert losses["bf16"].item() == pytest.approx(losses["no"].item(), rel=0.05)
    assert losses["bf16"].item() != losses["no"].item()  # autocast really ran in bf16


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_checkpoint_after_the_step_and_the_run_resumes_exactly(tmp_path, signal_name):
    """SIGTERM (a scheduler's pre-emption) or SIGINT (Ctrl-C) in the middle of step 5: the step is
    finished, checkpointed, the run stops; resumed, it ends bit-identical to an uninterrupted run."""
    import os
    import signal

    from genalign.core.trainer import TrainingInterrupted

    number = getattr(signal, signal_name)

    class Signalled(ToyRegression):
        def loss(self, batch):
            if self.calls == 8:  # during step 5 (micro-step 1 of 2)
                os.kill(os.getpid(), number)
            return super().loss(batch)

    common = dict(steps=8, checkpoint_every=0, grad_accum=2)
    straight = _toy()
    Trainer(straight, _run(tmp_path / "a", **common)).train()
    stopped = Signalled(ToyRegression.Config())
    outer = signal.getsignal(number)  # SIGINT is ignored when the suite runs as a shell's background job
    before = signal.default_int_handler if number == signal.SIGINT else signal.SIG_DFL
    signal.signal(number, before)
    try:
        with pytest.raises(TrainingInterrupted, match=f"stopped by {signal_name} at step 5") as info:
            Trainer(stopped, _run(tmp_path / "b", **common)).train()
        assert signal.getsignal(number) == before  # the handler in place before the run is restored
    finally:
        signal.signal(number, outer)
    assert info.value.signal_number == number
    assert (tmp_path / "b" / "checkpoints" / "step-000005" / "COMPLETE").is_file()
    resumed = _toy()
    assert Trainer(resumed, _run(tmp_path / "b", **common)).train(resume="latest").steps_done == 8
    assert torch.equal(resumed.model.weight, straight.model.weight)


def test_an_ignored_sigint_stays_ignored(tmp_path):
    """A shell script's background job inherits SIGINT ignored (Ctrl-C is not meant for it): the trainer
    leaves it so, and the run goes to its end."""
    import os
    import signal

    class Signalled(ToyRegression):
        def loss(self, batch):
            if self.calls == 3:
                os.kill(os.getpid(), signal.SIGINT)
            return super().loss(batch)

    outer = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        trainer = Trainer(Signalled(ToyRegression.Config()), _run(tmp_path, steps=4, checkpoint_every=0))
        assert trainer.train().steps_done == 4
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, outer)


def test_a_full_disk_while_saving_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path, monkeypatch):
    import errno

    import genalign.core.checkpoint as checkpoint_module
    from genalign.core.trainer import CheckpointWriteError

    real_save = checkpoint_module.save_file
    calls = {"n": 0}

    def save_file(tensors, path, *args, **kwargs):
        if "step-000006" in str(path):
            calls["n"] += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module, "save_file", save_file)
    with pytest.raises(CheckpointWriteError, match=r"step-000006 .*No space left.*step-000003 is intact"):
        Trainer(_toy(), _run(tmp_path, steps=8, checkpoint_every=3)).train()
    assert calls["n"] == 1
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000003"]  # no half-written folder left
    monkeypatch.setattr(checkpoint_module, "save_file", real_save)
    resumed = Trainer(_toy(), _run(tmp_path, steps=8, checkpoint_every=3))
    assert resumed.train(resume="latest").steps_done == 8


def _toy_whose_step_first(spend, monkeypatch):
    """A toy regression whose loss first calls ``spend()`` (sleeps or computes)."""
    toy = _toy()
    loss_of = toy.loss

    def loss(batch):
        spend()
        return loss_of(batch)

    monkeypatch.setattr(toy, "loss", loss)
    return toy


def _compute(seconds):
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def test_max_minutes_stops_the_run_early_with_its_final_checkpoint(tmp_path, monkeypatch):
    toy = _toy_whose_step_first(lambda: time.sleep(0.05), monkeypatch)
    result = Trainer(toy, _run(tmp_path, steps=1000, checkpoint_every=0, max_minutes=0.01)).train()  # 0.6 s
    assert 1 <= result.steps_done < 100
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [f"step-{result.steps_done:06d}"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == result.steps_done
    with pytest.raises(ConfigError, match="max_minutes must be >= 0"):
        _run(tmp_path, max_minutes=-1.0)


def test_max_cpu_minutes_counts_this_processs_cpu_time_not_the_wall_clock(tmp_path, monkeypatch, capsys):
    """run.max_cpu_minutes: a step that waits (sleeps, as on a machine busy with other work) does not
    use up the budget; one that computes does; the progress bar shows the clock against the limit."""
    toy = _toy_whose_step_first(lambda: time.sleep(0.05), monkeypatch)
    # 30 steps of 0.05 s: 1.5 s of wall clock, past 0.6 s, and a few ms of CPU time a step
    assert Trainer(toy, _run(tmp_path / "waits", steps=30, checkpoint_every=0, max_cpu_minutes=0.01)).train().steps_done == 30
    toy = _toy_whose_step_first(lambda: _compute(0.1), monkeypatch)
    result = Trainer(toy, _run(tmp_path / "computes", steps=1000, checkpoint_every=0, max_cpu_minutes=0.01)).train()
    assert 1 <= result.steps_done <= 7  # 0.6 s of CPU time at 0.1 s a step
    shown = re.findall(r"cpu_min=(\d+\.\d)/0\.01", capsys.readouterr().err)
    assert shown and float(shown[-1]) == pytest.approx(0.01, abs=0.05)
    assert [p.name for p in (tmp_path / "computes" / "checkpoints").iterdir()] == [f"step-{result.steps_done:06d}"]
    with pytest.raises(ConfigError, match="max_cpu_minutes must be >= 0"):
        _run(tmp_path, max_cpu_minutes=-1.0)


def test_export_every_writes_the_run_stopped_there(tmp_path):
    """run.export_every: exports/step-N/ holds the weights after N steps with export.json; with a
    constant learning rate they are a run of N steps' final weights exactly (a learning curve from
    one run); the last step's export is final/ only."""
    from safetensors.torch import load_file

    Trainer(_toy(), _run(tmp_path / "long", steps=6, export_every=2, checkpoint_every=0)).train()
    Trainer(_toy(), _run(tmp_path / "short", steps=4, checkpoint_every=0)).train()
    exports = sorted(p.name for p in (tmp_path / "long" / "exports").iterdir())
    assert exports == ["step-000002", "step-000004"]
    at_4 = load_file(str(tmp_path / "long" / "exports" / "step-000004" / "model.safetensors"))["weight"]
    assert torch.equal(at_4, load_file(str(tmp_path / "short" / "final" / "model.safetensors"))["weight"])
    final = load_file(str(tmp_path / "long" / "final" / "model.safetensors"))["weight"]
    assert not torch.equal(at_4, final)
    meta = json.loads((tmp_path / "long" / "exports" / "step-000002" / "export.json").read_text())
    assert meta["step"] == 2 and meta["train_seconds"] >= 0 and meta["train_cpu_seconds"] >= 0
    assert json.loads((tmp_path / "long" / "final" / "export.json").read_text())["step"] == 6
    with pytest.raises(ConfigError, match="export_every must be >= 0"):
        _run(tmp_path, export_every=-1)


def test_the_training_clock_leaves_out_paused_work_and_counts_cpu_apart_from_waiting():
    """Wall and CPU seconds by hand: 0.2 s of this process's CPU counted, 0.2 s more inside paused()
    left out of both clocks, and 0.2 s asleep counted by the wall clock only."""
    import time

    from genalign.core.trainer import TrainingClock

    def spin(cpu_seconds):
        until = time.process_time() + cpu_seconds
        while time.process_time() < until:
            pass

    clock = TrainingClock()
    spin(0.2)
    with clock.paused():
        spin(0.2)
    time.sleep(0.2)
    wall, cpu = clock.seconds()
    assert cpu == pytest.approx(0.2, abs=0.05)
    assert wall >= 0.4 - 0.01 and wall - cpu >= 0.19  # the sleep, on the wall clock only


def test_a_resumed_runs_clock_adds_up_its_launches_and_leaves_checkpoints_out(tmp_path, monkeypatch):
    """export.json's seconds (and run.max_cpu_minutes) count a resumed run's earlier launches: a fake
    clock that moves one second per loss() and ten per checkpoint written gives an uninterrupted
    8-step run 8 s, and the same run killed in step 6 (checkpoint at 4) and resumed 4 + 4 s."""
    import types

    import genalign.core.checkpoint as checkpoint_module
    import genalign.core.trainer as trainer_module

    now = [0.0]
    fake = types.SimpleNamespace(monotonic=lambda: now[0], process_time=lambda: now[0])
    monkeypatch.setattr(trainer_module, "time", fake)
    save = checkpoint_module.Checkpoints.save

    def slow_save(self, *args, **kwargs):
        now[0] += 10.0
        return save(self, *args, **kwargs)

    monkeypatch.setattr(checkpoint_module.Checkpoints, "save", slow_save)

    class Ticking(ToyRegression):
        def loss(self, batch):
            now[0] += 1.0
            return super().loss(batch)

    def seconds(folder):
        meta = json.loads((folder / "final" / "export.json").read_text())
        return meta["train_seconds"], meta["train_cpu_seconds"]

    common = dict(steps=8, checkpoint_every=4)
    Trainer(Ticking(ToyRegression.Config()), _run(tmp_path / "a", **common)).train()
    assert seconds(tmp_path / "a") == (8.0, 8.0)
    with pytest.raises(KeyboardInterrupt):
        Trainer(Ticking(ToyRegression.Config(crash_at_call=6)), _run(tmp_path / "b", **common)).train()
    assert json.loads((tmp_path / "b" / "checkpoints" / "step-000004" / "state.json").read_text())["train_seconds"] == [4.0, 4.0]
    Trainer(Ticking(ToyRegression.Config()), _run(tmp_path / "b", **common)).train(resume="latest")
    assert seconds(tmp_path / "b") == (8.0, 8.0)
