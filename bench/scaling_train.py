"""The training entry point of ``bench.bench_scaling``: grpo_train.py's Hydra app, every rank timing its steps.

``bench.bench_scaling`` builds the repo's launch command (``rlvr_vocab.launch.build_command``) with this file as
the script instead of grpo_train.py (it runs ``rlvr_vocab.train.main``, the same Hydra app): the launcher, its accelerate config, the Hydra config, rlvr_vocab.train and
the trainer are the ones a training job runs. What this adds, in every process, is a callback on the trainer
(``bench.bench_grpo.time_generation`` for the generation share, ``bench.diagnostics.StepProbe`` for the GPU peak)
that appends one JSON line per optimizer step to ``$RLVR_SCALING_RECORDS/rank-<rank>.jsonl``:

    {"event": "begin", "rank", "world_size", "distributed_type", "fsdp_version", "device", "params", ...}
    {"event": "step", "step", "step_s", "generation_s", "completion_tokens", "peak_allocated_gib", ...}
    {"event": "end", "run_peak_allocated_gib", "run_peak_reserved_gib", "max_rss_gib", "fused_head_calls"}

Run by hand (one process): ``RLVR_SCALING_RECORDS=/tmp/rec python bench/scaling_train.py experiment=debug``.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECORDS_ENV = "RLVR_SCALING_RECORDS"  # folder of the per-rank JSON lines (set by bench.bench_scaling)


def install(records: Path) -> None:
    """Every RLVRGRPOTrainer built from now on gets a ScalingRecorder writing under ``records``."""
    import torch as th
    from transformers import TrainerCallback

    import rlvr_vocab.trainer as trainer_module
    from bench.bench_grpo import time_generation
    from bench.diagnostics import StepProbe

    cuda = th.cuda.is_available()
    sync = th.cuda.synchronize if cuda else (lambda: None)
    fused_calls = [0]
    fused = trainer_module._fused_masked_token_logprobs

    def counted_fused(*args, **kwargs):  # which head path the reasoning vocabulary took (FSDP2 wraps lm_head)
        fused_calls[0] += 1
        return fused(*args, **kwargs)

    trainer_module._fused_masked_token_logprobs = counted_fused

    class ScalingRecorder(TrainerCallback):
        def __init__(self, trainer):
            self.trainer = trainer
            self.current: dict = {}
            self.path: Path | None = None
            self.probe = StepProbe(lambda: getattr(trainer, "fast_sampler", None), log_recompiles=False)
            model = trainer.model
            self.params = sum(p.numel() for p in model.parameters())
            time_generation(trainer, sync, self.current, self.params, model.config)

        def _write(self, record: dict) -> None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

        def on_train_begin(self, args, state, control, **kwargs):
            accelerator = self.trainer.accelerator
            self.path = records / f"rank-{args.process_index}.jsonl"
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("")
            plugin = getattr(accelerator.state, "fsdp_plugin", None)
            self._write(
                {
                    "event": "begin",
                    "rank": args.process_index,
                    "world_size": args.world_size,
                    "distributed_type": str(accelerator.distributed_type).split(".")[-1],
                    "fsdp_version": getattr(plugin, "fsdp_version", None),
                    "model_class": type(self.trainer.model_wrapped).__name__,
                    "device": th.cuda.get_device_name() if cuda else "cpu",
                    "params": self.params,
                    "reasoning_vocab_size": getattr(self.trainer.reasoning_vocab, "size", 0),
                    "per_device_train_batch_size": args.per_device_train_batch_size,
                    "gradient_accumulation_steps": args.gradient_accumulation_steps,
                    "num_generations": args.num_generations,
                    "max_completion_length": args.max_completion_length,
                    "bf16": args.bf16,
                    "gradient_checkpointing": args.gradient_checkpointing,
                    "torch": th.__version__,
                    "time": time.time(),
                }
            )
            if cuda:
                th.cuda.reset_peak_memory_stats()

        def on_step_begin(self, args, state, control, **kwargs):
            self.current.clear()
            self.probe.begin()
            sync()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            step_s = time.perf_counter() - self.t0
            probe = self.probe.end()
            record = {"event": "step", "step": state.global_step, "step_s": round(step_s, 4)}
            record.update({k: round(v, 4) if isinstance(v, float) else v for k, v in self.current.items()})
            cuda_stats = probe.get("cuda", {})
            record["peak_allocated_gib"] = cuda_stats.get("peak_allocated_gib")
            record["reserved_gib"] = cuda_stats.get("reserved_gib")
            record["gc_pause_s"] = round(sum(probe.get("gc", {}).get("pause_s", {}).values()), 4)
            record["sampler"] = probe.get("sampler", {})
            self._write(record)

        def on_train_end(self, args, state, control, **kwargs):
            self.probe.close()
            self._write(
                {
                    "event": "end",
                    "run_peak_allocated_gib": self.probe.run_peak_bytes / 2**30 if cuda else None,
                    "run_peak_reserved_gib": self.probe.run_peak_reserved_bytes / 2**30 if cuda else None,
                    "max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
                    "fused_head_calls": fused_calls[0],
                    "fast_path_used": bool(getattr(self.trainer.fast_sampler, "last_used_fast_path", False)),
                }
            )

    original_init = trainer_module.RLVRGRPOTrainer.__init__

    def __init__(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(ScalingRecorder(self))

    trainer_module.RLVRGRPOTrainer.__init__ = __init__


def main() -> None:
    sys.path.insert(0, str(REPO))
    records = os.environ.get(RECORDS_ENV)
    if not records:
        raise SystemExit(
            f"{RECORDS_ENV} is not set: the folder for the per-rank step records (bench.bench_scaling sets it)"
        )
    install(Path(records))
    from rlvr_vocab.train import main as rlvr_train  # the console script rlvr-train: grpo_train.py's Hydra app

    rlvr_train()


if __name__ == "__main__":
    main()
