"""Preemption and resume (rlvr_vocab/resume.py) on real HF Trainer runs of a tiny random Qwen3 on CPU.

Two processes under ``accelerate launch`` (slurm/accelerate/*.yaml) check that a signal on one rank stops
every rank at the same step; run as a script, this file is that training child. The last test kills a real
``grpo_train.py experiment=debug`` run with SIGTERM and resumes it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import logged_steps

from rlvr_vocab import checkpoints, resume

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------
# A tiny HF Trainer run: random Qwen3 with a 32-token vocabulary, language modelling on random ids
# ------------------------------------------------------------------------------------------------


def _tiny_trainer(output_dir: Path, max_steps: int, save_steps: int, callbacks=(), use_cpu: bool = True):
    import torch as th
    from transformers import Qwen3Config, Qwen3ForCausalLM, Trainer, TrainerCallback, TrainingArguments

    class _Rows(th.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = th.randint(0, 32, (64, 8), generator=th.Generator().manual_seed(0))

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    th.manual_seed(0)
    config = Qwen3Config(
        vocab_size=32,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=64,
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=save_steps,
        logging_steps=1,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=use_cpu,
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    assert all(isinstance(cb, TrainerCallback) for cb in callbacks)
    return Trainer(
        model=Qwen3ForCausalLM(config),
        args=args,
        train_dataset=_Rows(),
        callbacks=[*callbacks, resume.PreemptionCallback()],
    )


def _signal_at_step(step: int, signum: int, rank: int | None = None):
    """A callback that sends ``signum`` to this process at the end of ``step`` (before PreemptionCallback runs),
    on every rank or only on ``rank``."""
    from transformers import TrainerCallback

    class _Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step and rank in (None, args.process_index):
                os.kill(os.getpid(), signum)

    return _Kill()


def _files(directory: Path) -> set[str]:
    return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------------
# Stop on a signal, save, exit with EXIT_PREEMPTED; resume to the end
# ------------------------------------------------------------------------------------------------


def test_signal_saves_then_resume_finishes_with_each_step_logged_once(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)
    trainer = _tiny_trainer(tmp_path, max_steps=6, save_steps=100, callbacks=[_signal_at_step(2, signal.SIGUSR1)])
    with pytest.raises(resume.Preempted) as stopped:
        with resume.signal_handlers():
            trainer.train()
    assert stopped.value.code == resume.EXIT_PREEMPTED
    assert stopped.value.global_step == 2
    assert signal.getsignal(signal.SIGUSR1) is before  # handlers restored
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (tmp_path / "checkpoint-2" / checkpoints.COMPLETE_MARKER).is_file()
    checkpoint = checkpoints.latest_complete_checkpoint(tmp_path)
    assert checkpoint == str(tmp_path / "checkpoint-2")

    trainer = _tiny_trainer(tmp_path, max_steps=6, save_steps=100)
    with resume.signal_handlers():  # no signal: returns normally
        trainer.train(resume_from_checkpoint=checkpoint)
    assert trainer.state.global_step == 6
    assert logged_steps({"log_history": trainer.state.log_history}) == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_saves_at_the_step_boundary_and_a_second_quits_at_once(tmp_path):
    """SIGINT is a stop request like SIGTERM (checkpoint, EXIT_PREEMPTED); a second SIGINT raises KeyboardInterrupt."""
    from transformers import TrainerCallback

    before = signal.getsignal(signal.SIGINT)
    trainer = _tiny_trainer(tmp_path, max_steps=6, save_steps=100, callbacks=[_signal_at_step(2, signal.SIGINT)])
    with pytest.raises(resume.Preempted) as stopped:
        with resume.signal_handlers():
            trainer.train()
    assert stopped.value.code == resume.EXIT_PREEMPTED and stopped.value.signum == signal.SIGINT
    assert checkpoints.latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert signal.getsignal(signal.SIGINT) is before

    class _TwiceAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    again = tmp_path / "again"
    trainer = _tiny_trainer(again, max_steps=6, save_steps=100, callbacks=[_TwiceAt()])
    with pytest.raises(KeyboardInterrupt):
        with resume.signal_handlers():
            trainer.train()
    assert trainer.state.global_step == 1 and not list(again.glob("checkpoint-*"))  # quit at once: no save
    assert signal.getsignal(signal.SIGINT) is before


def test_previous_handler_runs_after_the_checkpoint_is_complete(tmp_path):
    """Under submitit its requeue handler owns SIGUSR2: it must run only once the model is on disk."""
    seen = []

    def submitit_like(signum, frame):
        seen.append((signum, checkpoints.is_complete_checkpoint(tmp_path / "checkpoint-1", require_marker=True)))

    before = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        trainer = _tiny_trainer(tmp_path, max_steps=4, save_steps=100, callbacks=[_signal_at_step(1, signal.SIGUSR2)])
        with pytest.raises(resume.Preempted):
            with resume.signal_handlers():
                trainer.train()
        assert seen == [(signal.SIGUSR2, True)]
        assert signal.getsignal(signal.SIGUSR2) is submitit_like
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_stop_signal_still_stops_after_a_library_took_it_over(tmp_path):
    """A library that ignores and blocks the signal mid-training (on the GPU, after torch.compile, SIGUSR1 stopped
    reaching the handler) does not keep the run from stopping: each step starts by re-arming the handlers."""
    from transformers import TrainerCallback

    class _Clobber(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                signal.signal(signal.SIGUSR1, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})

    trainer = _tiny_trainer(
        tmp_path, max_steps=6, save_steps=100, callbacks=[_Clobber(), _signal_at_step(3, signal.SIGUSR1)]
    )
    try:
        with pytest.raises(resume.Preempted):
            with resume.signal_handlers():
                trainer.train()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
    assert trainer.state.global_step == 3
    assert checkpoints.latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")


def test_signal_in_the_last_step_finishes_normally(tmp_path):
    trainer = _tiny_trainer(tmp_path, max_steps=2, save_steps=100, callbacks=[_signal_at_step(2, signal.SIGTERM)])
    with resume.signal_handlers():
        trainer.train()
    assert trainer.state.global_step == 2
    assert checkpoints.latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")


# ------------------------------------------------------------------------------------------------
# Which checkpoint is complete
# ------------------------------------------------------------------------------------------------


def test_incomplete_newest_checkpoints_are_skipped_and_nothing_is_deleted(tmp_path):
    trainer = _tiny_trainer(tmp_path, max_steps=3, save_steps=1)
    trainer.train()
    for step in (1, 2, 3):
        assert checkpoints.is_complete_checkpoint(tmp_path / f"checkpoint-{step}", require_marker=True)
    assert checkpoints.latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-3")

    # checkpoint-3: weights truncated after the marker was written
    weights = tmp_path / "checkpoint-3" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    # checkpoint-4: killed mid-save (HF writes into the final dir): weights only
    (tmp_path / "checkpoint-4").mkdir()
    shutil.copy(tmp_path / "checkpoint-2" / "model.safetensors", tmp_path / "checkpoint-4")
    # checkpoint-5: every HF file written, killed before on_save wrote the marker
    shutil.copytree(tmp_path / "checkpoint-2", tmp_path / "checkpoint-5")
    (tmp_path / "checkpoint-5" / checkpoints.COMPLETE_MARKER).unlink()
    state = json.loads((tmp_path / "checkpoint-5" / "trainer_state.json").read_text())
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text(json.dumps({**state, "global_step": 5}))
    # not checkpoints at all, or nothing to resume (the untrained model, weights only)
    (tmp_path / "checkpoint-final").mkdir()
    (tmp_path / "checkpoint-0").mkdir()
    shutil.copy(tmp_path / "checkpoint-2" / "model.safetensors", tmp_path / "checkpoint-0")
    (tmp_path / "checkpoint-9").write_text("a file, not a directory")

    before = _files(tmp_path)
    assert checkpoints.latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")
    assert "model.safetensors has 100 bytes" in checkpoints.checkpoint_problem(tmp_path / "checkpoint-3")
    assert checkpoints.checkpoint_problem(tmp_path / "checkpoint-4", require_marker=True).startswith(
        checkpoints.COMPLETE_MARKER
    )
    assert checkpoints.checkpoint_problem(tmp_path / "checkpoint-5") is None  # complete by its files alone...
    assert not checkpoints.is_complete_checkpoint(tmp_path / "checkpoint-5", require_marker=True)  # ...but unmarked
    assert _files(tmp_path) == before

    # save_total_limit=1 deleted every marked checkpoint before the newest got its marker: take the newest
    # that is complete by its files (checkpoint-5) rather than start over.
    shutil.rmtree(tmp_path / "checkpoint-1")
    shutil.move(tmp_path / "checkpoint-2", tmp_path.parent / f"{tmp_path.name}-checkpoint-2")
    assert checkpoints.latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-5")
    shutil.move(tmp_path.parent / f"{tmp_path.name}-checkpoint-2", tmp_path / "checkpoint-2")

    # Resuming from checkpoint-2 rewrites checkpoint-3 in place, marker included.
    trainer = _tiny_trainer(tmp_path, max_steps=3, save_steps=1)
    trainer.train(resume_from_checkpoint=checkpoints.latest_complete_checkpoint(tmp_path))
    assert checkpoints.is_complete_checkpoint(tmp_path / "checkpoint-3", require_marker=True)


def test_checkpoints_without_markers_are_judged_by_their_files(tmp_path):
    """Checkpoints written without PreemptionCallback (e.g. by an older version) still resume."""
    trainer = _tiny_trainer(tmp_path, max_steps=2, save_steps=1)
    trainer.train()
    for marker in tmp_path.glob(f"checkpoint-*/{checkpoints.COMPLETE_MARKER}"):
        marker.unlink()
    assert checkpoints.latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-2")

    state = tmp_path / "checkpoint-2" / "trainer_state.json"
    state.write_text(state.read_text()[:50])  # killed while writing the last file
    assert checkpoints.latest_complete_checkpoint(tmp_path) == str(tmp_path / "checkpoint-1")
    (tmp_path / "checkpoint-1" / "optimizer.pt").unlink()
    assert checkpoints.checkpoint_problem(tmp_path / "checkpoint-1").startswith("no optimizer file")
    assert checkpoints.latest_complete_checkpoint(tmp_path) is None
    assert checkpoints.latest_complete_checkpoint(tmp_path / "does-not-exist") is None


def test_sharded_weights_need_every_shard(tmp_path):
    ckpt = tmp_path / "checkpoint-7"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": 7, "log_history": []}))
    for name in (
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_0.pth",
        "rng_state_1.pth",
        "model-00001-of-00002.safetensors",
    ):
        (ckpt / name).write_bytes(b"x")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(index))
    assert "missing shards ['model-00002-of-00002.safetensors']" in checkpoints.checkpoint_problem(ckpt)
    (ckpt / "model-00002-of-00002.safetensors").write_bytes(b"x")
    assert checkpoints.latest_complete_checkpoint(tmp_path) == str(ckpt)
    checkpoints.mark_complete(ckpt, 7)
    assert checkpoints.is_complete_checkpoint(ckpt, require_marker=True)
    (ckpt / "model-00002-of-00002.safetensors").unlink()
    assert checkpoints.checkpoint_problem(ckpt) == "model-00002-of-00002.safetensors is missing"


# ------------------------------------------------------------------------------------------------
# Several processes (accelerate launch with the configs of slurm/accelerate/): one signal stops every rank
# ------------------------------------------------------------------------------------------------


def _child(phase: str, output_dir: str, result_dir: str) -> None:
    """Training process of the multi-process tests: ``python tests/test_resume.py {stop|resume} OUT RESULTS``."""
    import torch as th

    callbacks = [_signal_at_step(3, signal.SIGUSR1, rank=1)] if phase == "stop" else []  # rank 1 only
    trainer = _tiny_trainer(Path(output_dir), 12, 100, callbacks, use_cpu=not th.cuda.is_available())
    checkpoint = checkpoints.latest_complete_checkpoint(output_dir) if phase == "resume" else None
    result = {"world_size": trainer.args.world_size, "resumed_from": checkpoint, "preempted": None}
    try:
        with resume.signal_handlers():
            trainer.train(resume_from_checkpoint=checkpoint)
    except resume.Preempted as stop:
        result["preempted"] = {"signal": stop.signum, "step": stop.global_step}
    result["global_step"] = trainer.state.global_step
    result["logged"] = logged_steps({"log_history": trainer.state.log_history})
    Path(result_dir, f"{phase}-{trainer.args.process_index}.json").write_text(json.dumps(result))


def _launch_two(config: str, phase: str, output_dir: Path, result_dir: Path) -> subprocess.CompletedProcess:
    from rlvr_vocab.launch import accelerate_config

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", accelerate_config(config)]
    cmd += ["--num_machines", "1", "--num_processes", "2", "--main_process_ip", "127.0.0.1"]
    cmd += ["--main_process_port", "0", "--machine_rank", "0", __file__, phase, str(output_dir), str(result_dir)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def _ranks_stop_together_and_resume(config: str, tmp_path: Path) -> None:
    run, results = tmp_path / "run", tmp_path / "results"
    results.mkdir()
    first = _launch_two(config, "stop", run, results)
    assert first.returncode == 0, first.stderr[-3000:]  # the child catches Preempted to report it
    stops = [json.loads((results / f"stop-{rank}.json").read_text()) for rank in (0, 1)]
    assert all(r["world_size"] == 2 for r in stops), first.stdout[-2000:] + first.stderr[-3000:]
    # rank 1 alone got SIGUSR1; rank 0 learns it through the all-reduce and stops at the same step
    assert [r["preempted"] for r in stops] == [{"signal": signal.SIGUSR1, "step": 3}] * 2
    assert checkpoints.latest_complete_checkpoint(run) == str(run / "checkpoint-3")

    second = _launch_two(config, "resume", run, results)
    assert second.returncode == 0, second.stderr[-3000:]
    for rank in (0, 1):
        done = json.loads((results / f"resume-{rank}.json").read_text())
        assert done["resumed_from"] == str(run / "checkpoint-3") and done["preempted"] is None
        assert done["global_step"] == 12 and done["logged"] == list(range(1, 13))


@pytest.mark.slow
def test_two_cpu_ranks_stop_together_and_resume(tmp_path):
    """DDP over gloo on CPU."""
    _ranks_stop_together_and_resume("ddp", tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["ddp", "fsdp2"])
def test_two_gpu_ranks_stop_together_and_resume(config, tmp_path):
    """DDP and FSDP2 over NCCL: the all-reduce on CUDA, sharded optimizer state in the checkpoint."""
    import torch as th

    if th.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    _ranks_stop_together_and_resume(config, tmp_path)


# ------------------------------------------------------------------------------------------------
# The real thing: SIGTERM a grpo_train.py run, rerun the same command
# ------------------------------------------------------------------------------------------------


def test_sigterm_then_rerun_resumes_grpo_train(tmp_path):
    max_steps = 16  # enough that SIGTERM lands well before the end, even on a loaded machine
    cmd = [
        sys.executable,
        str(REPO / "grpo_train.py"),
        "experiment=debug",
        f"training.max_steps={max_steps}",
        "training.save_steps=1",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = (tmp_path.parent / f"{tmp_path.name}-first.log").open("w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not (tmp_path / "checkpoint-3" / checkpoints.COMPLETE_MARKER).exists():
        assert proc.poll() is None, f"run ended before checkpoint-3: {Path(log.name).read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint-3 after 240 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    first_log = Path(log.name).read_text()
    assert rc == resume.EXIT_PREEMPTED, first_log[-3000:]
    stopped_at = checkpoints.checkpoint_step(checkpoints.latest_complete_checkpoint(tmp_path))
    assert 3 <= stopped_at < max_steps, first_log[-3000:]  # the signal landed before the run ended

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"Resuming from {tmp_path / f'checkpoint-{stopped_at}'}" in done.stdout + done.stderr
    state = json.loads((tmp_path / f"checkpoint-{max_steps}" / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps
    assert logged_steps(state) == list(range(1, max_steps + 1))
    metrics = tmp_path / "metrics.jsonl"
    if metrics.exists():  # the core's per-step metrics log: one training row per step across both processes
        rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        assert [row["step"] for row in rows if "loss" in row] == list(range(1, max_steps + 1))


if __name__ == "__main__":
    _child(*sys.argv[1:])
