"""bench.bench_scaling on the CPU: the launcher's command for each point, the refusal, and a gloo run end to end."""

from __future__ import annotations

import doctest
import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from bench import bench_scaling, scaling_train
from rlvr_vocab.launch import build_command

REPO = Path(__file__).resolve().parents[1]


def test_doctests_of_the_scaling_modules():
    failed, attempted = doctest.testmod(bench_scaling)
    assert failed == 0 and attempted > 0
    assert doctest.testmod(scaling_train).failed == 0


def _args(**kw) -> Namespace:
    base = dict(device="cuda", warmup=2, steps=5, completions_per_gpu=32, micro_batch=16, generations=8)
    base.update(completion=512, gradient_checkpointing=False, seed=0)
    return Namespace(**{**base, **kw})


def test_each_point_runs_the_launchers_command_with_the_same_per_gpu_batch(tmp_path):
    """Several GPUs: accelerate launch with the repo's config for the strategy; one GPU: plain python. The
    overrides (so the per-GPU batch) are the same at every GPU count and strategy."""
    seen = {}
    for point in bench_scaling.points([1, 2, 8], ["ddp", "fsdp2"], [0, 151936]):
        env = bench_scaling.launch_env(point, "cuda", 29999)
        over = bench_scaling.overrides(_args(), point, tmp_path / "m", tmp_path / "d.jsonl", tmp_path / point.name)
        command = build_command(over, env, python="py", script=bench_scaling.SCRIPT)
        run = bench_scaling.runnable(command)
        assert env["CUDA_VISIBLE_DEVICES"] == ",".join(str(i) for i in range(point.gpus))
        if point.gpus == 1:
            assert run == ["py", "bench/scaling_train.py", *over]
        else:
            assert run[:2] == ["bash", "-c"] and command[0] == "srun"  # srun's one-node task, run as it is
            task = run[2]
            config = REPO / "slurm" / "accelerate" / f"{point.strategy}.yaml"
            assert f"-m accelerate.commands.launch --config_file {config} " in task
            assert f"--num_processes {point.gpus} " in task and "bench/scaling_train.py exp_name=scaling" in task
        batch = [o for o in over if o.startswith(("training.per_device", "training.gradient_acc", "training.num_gen"))]
        seen.setdefault(point.reasoning, set()).add(tuple(batch))
        assert f"model.reasoning_vocab_size={point.reasoning}" in over
    assert all(len(batches) == 1 for batches in seen.values())  # weak scaling: one per-GPU batch for all


def test_refuses_more_gpus_than_visible(tmp_path, capsys):
    visible = bench_scaling.visible_gpus()
    with pytest.raises(SystemExit, match=rf"up to {visible + 1} GPUs but {visible} "):
        bench_scaling.main(["--gpus", f"1,{visible + 1}", "--out", str(tmp_path)])
    assert not (tmp_path / "workload").exists()  # refused before building anything


def test_summary_takes_the_slowest_rank_and_sums_the_tokens():
    def rank(r, times, gen):
        steps = [
            {"event": "step", "step_s": t, "generation_s": g, "completion_tokens": 64, "peak_allocated_gib": 3.0 + r}
            for t, g in zip(times, gen, strict=True)
        ]
        return [{"event": "begin", "distributed_type": "MULTI_GPU", "world_size": 2}, *steps, {"event": "end"}]

    result = {"name": "ddp-2gpu-rv0", "point": {"gpus": 2, "strategy": "ddp", "reasoning": 0}}
    result["ranks"] = {0: rank(0, [9.0, 1.0, 2.0], [0, 0.5, 1.0]), 1: rank(1, [9.0, 2.0, 2.0], [0, 1.0, 1.0])}
    row = bench_scaling.summarise(result, warmup=1)
    assert row["s_per_step"] == 2.0 and row["completion_tokens_per_step"] == 128 and row["tokens_per_s"] == 64
    assert row["peak_gib_per_gpu"] == 4.0 and row["peak_gib_per_gpu_min"] == 3.0
    assert row["generation_share"] == pytest.approx((0.5 + 0.5) / 2)  # rank 0: 1.5/3, rank 1: 2/4
    result["ranks"].pop(1)
    assert "1 of 2 ranks" in bench_scaling.summarise(result, warmup=1)["error"]


@pytest.mark.slow  # ~35 s on 2 CPU cores: two runs of grpo_train's app, one of them two gloo processes
def test_cpu_run_with_one_and_two_processes(tmp_path):
    out = tmp_path / "scaling"
    argv = ["--device", "cpu", "--gpus", "1,2", "--strategy", "ddp", "--reasoning-vocab", "512", "--steps", "2"]
    argv += ["--warmup", "0", "--completions-per-gpu", "8", "--micro-batch", "8", "--generations", "4"]
    assert bench_scaling.main([*argv, "--out", str(out)]) == 0, sys.stderr
    data = json.loads((out / "scaling.json").read_text())
    one, two = data["summary"]
    assert (one["gpus"], one["world_size"], two["gpus"], two["world_size"]) == (1, 1, 2, 2)
    assert two["distributed_type"] == "MULTI_CPU" and two["ranks_agree_on_steps"] and two["measured_steps"] == 2
    assert one["completion_tokens_per_step"] == 8 * 16 and two["completion_tokens_per_step"] == 2 * 8 * 16
    assert one["fused_head"] and two["fused_head"]  # N > 0 through the reasoning head
    assert 0 < two["generation_share"] < 1 and two["efficiency"] > 0
    records = sorted((out / "points" / "ddp-2gpu-rv512" / "records").glob("rank-*.jsonl"))
    assert [p.name for p in records] == ["rank-0.jsonl", "rank-1.jsonl"]
    assert "| ddp | 512 | 2 |" in (out / "scaling.md").read_text()
    assert (out / "scaling.png").stat().st_size > 1000


def test_an_earlier_call_into_the_same_folder_keeps_its_points_only_for_the_same_workload(tmp_path):
    args = vars(_args(gpus=[1, 2], strategy="ddp"))
    ok = {"name": "ddp-2gpu-rv0", "rc": 0, "ranks": {"0": []}}
    failed = {"name": "ddp-4gpu-rv0", "rc": 1, "ranks": {}}
    path = tmp_path / "scaling.json"
    path.write_text(json.dumps({"args": {**args, "gpus": [2, 4]}, "raw": [ok, failed]}))
    assert list(bench_scaling.previous_results(path, args)) == ["ddp-2gpu-rv0"]  # other --gpus: kept; failures: not
    assert bench_scaling.previous_results(path, {**args, "completion": 1024}) == {}  # another workload: rerun all
