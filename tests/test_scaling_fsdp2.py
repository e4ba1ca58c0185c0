"""FSDP2 and the tied output head with a reasoning vocabulary: one optimizer step moves the head (issue 14).

The reasoning head (trainer.add_reasoning_lm_head) reads the tied ``lm_head`` weight itself: TRL's fused kernel
takes ``head.weight`` directly and ``lm_head``'s forward never runs, so under FSDP2 nothing but the sharing with
``embed_tokens`` (same FSDP group, accelerate >= 1.15) unshards that weight and takes its gradient back.

Two gloo processes started by the repo's own launcher (``rlvr_vocab.launch.build_command`` with
``ACCELERATE_CONFIG=fsdp2``: ``accelerate launch --config_file slurm/accelerate/fsdp2.yaml``) shard the tiny model
the way the Trainer's accelerator does (accelerate's ``fsdp2_prepare_model`` with the FSDP plugin that the launcher's
environment describes: per-layer units, ``cpu_ram_efficient_loading`` from rank 0). accelerate never picks FSDP on a
CPU (``Accelerator(cpu=True)`` is MULTI_CPU, i.e. DDP over gloo), so the plugin is applied to the model directly;
torch 2.13's FSDP2 itself runs on CPU over gloo. Each rank scores its own sequence through the reasoning head, takes
one SGD step, and the result is compared with a one-process step on both sequences (FSDP averages the gradients).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from rlvr_vocab.launch import build_command

REPO = Path(__file__).resolve().parents[1]

_STEP = r'''
import json, os, sys, warnings
from types import SimpleNamespace

sys.path.insert(0, os.environ["RLVR_REPO"])
warnings.simplefilter("always")
import torch as th
import torch.distributed as dist
from omegaconf import OmegaConf

import rlvr_vocab.trainer as trainer_module
from rlvr_vocab.config import ReasoningVocabConfig
from rlvr_vocab.models import build_tiny_model, build_tiny_tokenizer
from rlvr_vocab.reasoning_vocab import extend_model

N, LR = 16, 0.5
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
tok = build_tiny_tokenizer()
model_cfg = OmegaConf.load(os.path.join(os.environ["RLVR_REPO"], "conf", "model", "tiny.yaml"))
assert model_cfg.tiny.tie_word_embeddings


def policy(seed):
    """The tiny model + N reasoning rows + the trainer's reasoning head (patched before sharding, as the trainer does)."""
    model = build_tiny_model(model_cfg, tok, th.float32, seed)
    vocab = extend_model(model, tok, N, OmegaConf.structured(ReasoningVocabConfig()))
    trainer_module.add_reasoning_lm_head(model, vocab, 1.0, 1024)
    return model, vocab


def sequence(vocab, r):
    """Prompt, <think>, standard and reasoning tokens inside the span, </think>, an answer token."""
    t = vocab.standard_size
    ids = [20 + r, 21, vocab.open_id, 30 + r, t + 1 + r, 31, t + 5, vocab.close_id, 40 + r]
    return th.tensor([ids])


def loss_of(model, ids):
    out = model(input_ids=ids, attention_mask=th.ones_like(ids), reasoning_labels=ids)
    return -out.log_probs.sum()


def full(model):
    """Every parameter as a whole tensor (DTensor shards gathered), by name; tied weights appear once."""
    if hasattr(model, "reshard"):
        model.reshard()
    return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in model.named_parameters()}


results = {"rank": rank, "world": world, "fsdp_version": os.environ.get("FSDP_VERSION"), "paths": {}}
# Reference: one process, both ranks' sequences, the mean of their losses (what FSDP's averaged gradients give).
ref, vocab = policy(0)
before = full(ref)
opt = th.optim.SGD(ref.parameters(), lr=LR)
(sum(loss_of(ref, sequence(vocab, r)) for r in range(world)) / world).backward()
opt.step()
reference = full(ref)
embed_name = next(n for n in reference if n.endswith("embed_tokens.weight"))

from accelerate.utils import FullyShardedDataParallelPlugin
from accelerate.utils.fsdp_utils import fsdp2_prepare_model

original = trainer_module.masked_token_logprobs
for path in ("dispatch", "fused"):
    if path == "fused":  # TRL's fused kernel, which reads head.weight without calling lm_head
        trainer_module.masked_token_logprobs = lambda h, head, l, i, s, t, c, e: trainer_module._fused_masked_token_logprobs(h, head, l, i, s, t, e)
    else:
        trainer_module.masked_token_logprobs = original
    used = []
    fused = trainer_module._fused_masked_token_logprobs
    model, vocab = policy(0 if rank == 0 else 1 + rank)  # cpu_ram_efficient_loading: rank 0's weights win
    plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* environment (slurm/accelerate/fsdp2.yaml)
    accelerator = SimpleNamespace(
        state=SimpleNamespace(fsdp_plugin=plugin), torch_device_mesh=None, mixed_precision="no",
        is_main_process=rank == 0, device=th.device("cpu"),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = fsdp2_prepare_model(accelerator, model)
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        start = full(model)
        opt = th.optim.SGD(model.parameters(), lr=LR)
        trainer_module._fused_masked_token_logprobs = lambda *a, **k: (used.append("fused"), fused(*a, **k))[1]
        loss_of(model, sequence(vocab, rank)).backward()
        trainer_module._fused_masked_token_logprobs = fused
        grad = embed.weight.grad
        grad_norm = None if grad is None else float((grad.full_tensor() if hasattr(grad, "full_tensor") else grad).norm())
        opt.step()
        after = full(model)
    digest = th.cat([t.flatten() for _, t in sorted(after.items())])
    gathered = [th.zeros_like(digest) for _ in range(world)]
    dist.all_gather(gathered, digest)
    moved = (after[embed_name] - start[embed_name]).abs()
    results["paths"][path] = {
        "head_class": type(head).__name__,
        "tied": head.weight is embed.weight,
        "fused_kernel_used": bool(used),
        "loaded_rank0_weights": all(th.equal(start[n], before[n]) for n in before),
        "grad_norm": grad_norm,
        "embed_moved": float(moved.sum()),
        "reasoning_rows_moved": float(moved[vocab.standard_size:].sum()),
        "reasoning_rows_moved_each": bool((moved[vocab.standard_size:].sum(1) > 0).all()),
        "max_diff_to_reference": max(float((after[n] - reference[n]).abs().max()) for n in reference),
        "reference_moved": float((reference[embed_name] - before[embed_name]).abs().sum()),
        "ranks_equal": all(th.equal(g, gathered[0]) for g in gathered),
        "warnings": sorted({str(w.message)[:200] for w in caught if "FSDP" in str(w.message) or "forward" in str(w.message)}),
    }
print("RESULT " + json.dumps(results), flush=True)
dist.destroy_process_group()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~21 s on 2 CPU cores (two processes, a reference step and two sharded steps)
def test_fsdp2_step_moves_the_tied_head_and_its_reasoning_rows(tmp_path):
    script = tmp_path / "fsdp2_step.py"
    script.write_text(_STEP)
    env = {"RLVR_NPROC_PER_NODE": "2", "ACCELERATE_CONFIG": "fsdp2", "MASTER_PORT": str(_free_port())}
    command = build_command([], env, python=sys.executable, script=str(script))
    assert command[0] == "srun"  # two processes: srun + accelerate launch; one node runs the task once
    run_env = {**os.environ, **env, "SLURM_NODEID": "0", "RLVR_REPO": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", "-c", command[-1]], env=run_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = sorted(
        (json.loads(line.split(" ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")),
        key=lambda r: r["rank"],
    )
    assert [r["rank"] for r in results] == [0, 1] and results[0]["fsdp_version"] == "2"
    for r in results:
        for path, p in r["paths"].items():
            where = f"rank {r['rank']}, {path}: {p}"
            assert p["head_class"].startswith("FSDP") and p["tied"], where
            assert p["loaded_rank0_weights"], where
            assert p["grad_norm"] is not None and p["grad_norm"] > 0, where  # the gradient reached the tied weight
            assert p["embed_moved"] > 0 and p["reasoning_rows_moved_each"], where  # every reasoning row moved
            assert p["max_diff_to_reference"] < 1e-5 < p["reference_moved"], where  # the step a single process takes
            assert p["ranks_equal"], where
        assert r["paths"]["fused"]["fused_kernel_used"]
        # the trainer's own dispatch: FSDP2 turns lm_head into an FSDPLinear, so the checkpointed chunks run
        assert not r["paths"]["dispatch"]["fused_kernel_used"]
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    pytest.main([__file__, "-s", "-q"])
