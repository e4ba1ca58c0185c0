"""The benchmark package on the CPU: its pure pieces, the slow-step probes, the tiny checks and the time-boxing."""

from __future__ import annotations

import doctest
import gc
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from bench import bench_grpo, bench_sampler, check_sampler, decode_parts, diagnostics, floor, gpu_session, workload

REPO = Path(__file__).resolve().parents[1]


def test_doctests_of_the_bench_modules():
    for module in (workload, floor, diagnostics, bench_grpo, bench_sampler, check_sampler, gpu_session, decode_parts):
        failed, attempted = doctest.testmod(module)
        assert failed == 0 and attempted > 0, module.__name__


def test_bench_tokenizer_covers_every_model_row():
    tok = workload.build_tokenizer(1000)
    assert len(tok) == 1000 and tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = tok("t5 t17 <think>").input_ids
    assert ids[:2] == [5, 17] and tok.convert_ids_to_tokens(ids[2]) == "<think>"


# ------------------------------------------------------------------------------------------ floor model
def test_floor_model_reproduces_the_issue_numbers():
    assert floor.kv_bytes_per_token(28, 8, 128) == 112 * 1024
    weights = floor.qwen3_weight_bytes()
    assert 1.18e9 < weights < 1.20e9  # 596M parameters in bf16, the tied embedding once
    assert floor.qwen3_weight_bytes(2 * workload.VOCAB) - weights == workload.VOCAB * 1024 * 2
    kv = 112 * 1024
    # the issue's "~4.3 ms" at 256 x 1,024 and "~0.55 ms" at 32 x 512, with 4.27 TB/s
    assert floor.floor_ms_per_step(weights, kv, 256, 68 + 512, 4.27e12) == pytest.approx(4.3, abs=0.05)
    assert floor.floor_ms_per_step(weights, kv, 32, 68 + 256, 4.27e12) == pytest.approx(0.56, abs=0.02)
    # the per-run floor of a full batch is the per-step formula times the steps (mean context of the steps)
    run = floor.floor_seconds(weights, kv, [68] * 256, [1024] * 256, 4.27e12)
    per_step = floor.floor_ms_per_step(weights, kv, 256, 68 + 1024 / 2, 4.27e12)
    assert run * 1e3 / 1023 == pytest.approx(per_step, rel=1e-3)
    # rows that stop early stop reading their KV: the same total as summing step by step over the live rows
    lengths = [1024, 512, 256, 128]
    by_step = sum(weights + sum(kv * (68 + t) for n in lengths if n > t) for t in range(1, max(lengths))) / 4.27e12
    assert floor.floor_seconds(weights, kv, [68] * 4, lengths, 4.27e12) == pytest.approx(by_step, rel=1e-12)


# ------------------------------------------------------------------------------------------ GRPO summary
def _step(i, step_s, gen_s=1.5, gc2=0.0, children_cpu=0.0, mallocs=0):
    return {
        "step": i,
        "step_s": step_s,
        "generation_s": gen_s,
        "completion_tokens": 16384,
        "mfu": 0.3,
        "gc": {"pause_s": {"2": gc2} if gc2 else {}},
        "host": {"children_cpu_s": children_cpu, "children": 16},
        "cuda": {"num_device_alloc": mallocs},
        "dynamo": {"inductor.fxgraph_cache_hit": 4} if i == 1 else {},
    }


def test_summary_names_the_slow_steps_and_what_moved_in_them():
    steps = [_step(1, 40.0, 38.0)] + [_step(i, 2.0) for i in range(2, 12)]
    steps[2] = _step(3, 5.2, 2.6, gc2=1.1)  # a slow step with a long gen-2 GC pass
    steps[4] = _step(5, 5.0, 2.5, children_cpu=14.0, mallocs=3)  # one with busy child processes
    raw = {"variant": "fast-512", "label": "ours", "fix": "plain", "steps": steps, "peak_allocated_gib": 27.0}
    row = bench_grpo.summarise(raw, warmup=1)
    assert row["measured_steps"] == 10 and row["s_per_step_median"] == 2.0
    assert row["s_per_step"] == pytest.approx((8 * 2.0 + 5.2 + 5.0) / 10)
    assert row["mean_over_median"] == pytest.approx(row["s_per_step"] / 2.0)
    assert row["cache"] == "warm" and row["mfu"] == 0.3
    assert [s["step"] for s in row["slow"]] == [3, 5]
    assert "gen-2 GC 1.10 s" in row["slow"][0]["why"] and not any("child" in w for w in row["slow"][0]["why"])
    assert "child CPU 14.0 s" in row["slow"][1]["why"] and "3 cudaMalloc" in row["slow"][1]["why"]
    text = bench_grpo.markdown([raw, {"variant": "trl-512", "fix": "plain", "error": "OOM"}])
    assert "| fast-512 | plain | 2.62 | 2.00 | 1.31 |" in text and "| 3, 5 |" in text and "OOM" in text
    assert "step 3 5.20 s (gen 2.60): gen-2 GC 1.10 s" in text


def test_training_flops_counts_params_and_causal_attention():
    # Qwen3-0.6B at 32 x (80 + 512): 6 N T plus 6 L H D S^2 per sequence
    flops = bench_grpo.training_flops(596_049_920, 28, 16, 128, 32, 592)
    assert flops == pytest.approx(6 * 596_049_920 * 32 * 592 + 6 * 28 * 16 * 128 * 592**2 * 32)


# ------------------------------------------------------------------------------------------ probes
def test_step_probe_sees_gc_passes_child_processes_and_recompiles():
    import torch as th

    probe = diagnostics.StepProbe()
    child = None
    try:
        probe.begin()
        garbage = [[] for _ in range(1000)]
        for a, b in zip(garbage, garbage[1:], strict=False):
            a.append(b), b.append(a)
        del garbage
        gc.collect()  # a gen-2 pass
        burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
        child = subprocess.Popen([sys.executable, "-c", burn])
        f = th.compile(lambda x: x * 2, backend="eager", dynamic=False)
        f(th.ones(3)), f(th.ones(4))  # the second shape recompiles
        time.sleep(1.0)
        record = probe.end()
    finally:
        probe.close()
        if child is not None:
            child.kill()
            child.wait()
    assert record["gc"]["pause_s"]["2"] > 0 and record["gc"]["passes"]["2"] >= 1
    assert record["host"]["children"] >= 1 and record["host"]["children_cpu_s"] >= 0.2
    assert record["dynamo"].get("frames.total", 0) >= 2
    assert any("Recompiling" in line for line in record["recompile_log"])
    assert diagnostics.explain(record, [{}]) and probe._on_gc not in gc.callbacks


def _spin_in_a_named_function(seconds: float) -> int:
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < seconds:
        n += 1
    return n


def test_stack_sampler_counts_a_sample_in_the_window_it_was_taken(monkeypatch):
    """A sample whose stack is being read when ``take()`` is called belongs to the window ``take()`` closes (the
    sampler thread once added it after, to the next window: a step's stack showed up in the quiet one after it)."""
    import threading

    reading, proceed = threading.Event(), threading.Event()

    def slow_key(cls, frame):
        reading.set()
        proceed.wait(5)
        return "the stack"

    monkeypatch.setattr(diagnostics.StackSampler, "stack_key", classmethod(slow_key))
    sampler = diagnostics.StackSampler()
    try:
        assert reading.wait(5)
        taken = []
        taker = threading.Thread(target=lambda: taken.append(sampler.take()))
        taker.start()
        time.sleep(0.05)  # take() is called while the stack is read
        proceed.set()
        taker.join(5)
        assert taken and taken[0]["samples"] >= 1 and taken[0]["top"][0]["stack"] == "the stack"
    finally:
        proceed.set()
        sampler.close()


def test_step_probe_records_page_faults_and_where_the_host_thread_was():
    probe = diagnostics.StepProbe(log_recompiles=False)
    try:
        probe.begin()
        touched = bytearray(64 * 2**20)  # 16k fresh pages: minor faults
        touched[::4096] = b"x" * len(touched[::4096])
        _spin_in_a_named_function(0.4)
        record = probe.end()
        probe.begin()
        time.sleep(0.2)
        quiet = probe.end()
    finally:
        probe.close()
    assert record["host"]["minflt"] >= 8000 and "majflt" in record["host"] and "rchar" in record["host"]
    stacks = record["stacks"]
    assert stacks["samples"] >= 20 and stacks["expected"] >= stacks["samples"] * 0.5
    assert "_spin_in_a_named_function" in stacks["top"][0]["stack"] and stacks["top"][0]["share"] > 0.5
    assert not any("_spin_in_a_named_function" in t["stack"] for t in quiet["stacks"]["top"])  # taken per step
    assert not probe.stacks._thread.is_alive()
    slow = {"host": {"majflt": 4000, "read_bytes": 300 * 2**20}, "stacks": {"samples": 100, "expected": 500}}
    why = diagnostics.explain(slow, [{"host": {"majflt": 2}, "stacks": {"samples": 99, "expected": 100}}])
    assert why == [
        "4000 major page faults",
        "300 MiB read from disk",
        "sampler starved 80% (a long C call holding the GIL)",
    ]


def test_triton_probe_counts_and_times_compiles_per_step_and_restores_the_method(tmp_path, monkeypatch):
    """A stand-in for triton's JITFunction (the CPU has no Triton): a kernel compiled in the step shows up with
    its name, count and time, a kernel compiled before the step does not, and close() puts the method back."""

    class FakeJIT:
        def __init__(self, name):
            self.__name__ = name

        def _do_compile(self, key):
            time.sleep(0.05)
            (tmp_path / f"{self.__name__}-{key}").mkdir()  # Triton's cache gains an entry per compile
            return key

    original = FakeJIT._do_compile
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    triton = diagnostics.TritonCompiles(FakeJIT)
    probe = diagnostics.StepProbe(log_recompiles=False, triton=triton)
    try:
        FakeJIT("warm_kernel")._do_compile(0)  # before the step
        probe.begin()
        assert FakeJIT("_split_kernel")._do_compile(16) == 16
        FakeJIT("_split_kernel")._do_compile(17)
        record = probe.end()
    finally:
        probe.close()
    assert record["triton"]["compiles"] == 2 and record["triton"]["kernels"] == ["_split_kernel"]
    assert record["triton"]["compile_s"] >= 0.1 and record["triton"]["new_cache_entries"] == 2
    assert any("Triton compiles" in reason for reason in diagnostics.explain(record, [{}]))
    assert FakeJIT._do_compile is original


def test_fixed_prompt_fix_gives_every_prompt_one_length():
    varied = {len(p.split()) for p in workload.build_prompts(64, seed=1)}
    fixed = {len(p.split()) for p in workload.build_prompts(64, seed=1, lengths=bench_grpo.FIXED_PROMPT)}
    assert len(varied) > 10 and len(fixed) == 1
    assert "fixed-prompt" in bench_grpo.FIXES


# ------------------------------------------------------------------------------------------ sampler hooks
def test_forced_eos_through_a_logits_hook():
    import torch as th

    sampler = types.SimpleNamespace(logits_hook=None)
    assert workload.force_eos(sampler, [2, 5], eos_id=3) == "logits_hook"
    scores = th.zeros(2, 6)
    out = sampler.logits_hook(th.tensor(1), scores)  # step 1 = the 2nd token: row 0 must end now
    assert out[0].argmax() == 3 and th.isinf(out[0, [0, 1, 2, 4, 5]]).all()
    assert th.equal(out[1], scores[1]) and th.equal(sampler.logits_hook(0, scores), scores)
    workload.force_eos(sampler, None, eos_id=3)
    assert sampler.logits_hook is None


def test_a_sampler_compiles_once_and_a_new_shape_costs_only_captures():
    """The deadline's estimate: the compile is charged to a row until its model and path have run here (the decode
    step is compiled with batch and length dynamic); after that a new shape is charged its graph captures only."""
    bench = bench_sampler.Bench(tiny=True, bandwidth=1e10, repeats=1, compile=False)
    row, other, rv = (bench_sampler.parse_row(n) for n in ("4x8", "8x16", "4x8-rv"))
    assert bench.needs_compile(row, "eager") and bench.is_new_shape(row, "eager")
    bench.run(row, "eager", row.batch)
    assert not bench.needs_compile(row, "eager") and not bench.is_new_shape(row, "eager")
    assert not bench.needs_compile(other, "eager") and bench.is_new_shape(other, "eager")
    assert bench.needs_compile(rv, "eager") and bench.needs_compile(row, "eager-unfused")
    compiled = bench_sampler.estimate_s(other, 1.0, 2, bench.needs_compile(other, "eager"), True)
    assert compiled < bench_sampler.estimate_s(other, 1.0, 2, True, True) - 0.5 * bench_sampler.COMPILE_S


def test_a_path_constant_holds_while_its_rows_run_and_is_restored_after(monkeypatch):
    """``-peel`` (``PATH_CONSTANTS``): the kernel variant without a sampler option is set around that path's runs
    (when its graphs are captured) and not around another path's, and the module's value is back after each."""
    from rlvr_vocab.sampling import triton_decode

    seen = []
    real = bench_sampler.timed
    monkeypatch.setattr(bench_sampler, "timed", lambda *a, **k: seen.append(triton_decode.PEEL) or real(*a, **k))
    bench = bench_sampler.Bench(tiny=True, bandwidth=1e10, repeats=1, compile=False)
    row = bench_sampler.parse_row("4x8")
    before = triton_decode.PEEL
    bench.run(row, "eager-peel", row.batch)
    assert seen == [True] and triton_decode.PEEL == before is False
    bench.run(row, "eager", row.batch)
    assert seen == [True, False] and triton_decode.PEEL is False


def test_sampler_rows_on_the_cpu(tmp_path):
    out = tmp_path / "rows.jsonl"
    argv = ["--tiny", "--rows", "4x8", "4x8-rv@eager", "4x8@eager-unfused", "--bandwidth", "1e10", "--out", str(out)]
    assert bench_sampler.main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    measured = [r for r in rows if "ms_per_step" in r]
    assert {(r["row"], r["attention"]) for r in measured} >= {("4x8", "eager"), ("4x8-rv", "eager")}
    assert ("4x8", "eager-unfused") in {(r["row"], r["attention"]) for r in measured}
    for r in measured:
        assert r["fast_path"] and r["completion_tokens"] == 32 and len(r["run_s"]) == 2
        assert 0 < r["floor_ms_per_step"] and 0 < r["share_of_floor"] < 1
    assert all("skipped" in r for r in rows if r not in measured)  # e.g. triton on a sampler without it


def test_sampler_profile_says_where_a_row_spends_its_time(tmp_path):
    """--profile: one more run under torch.profiler per row (on the CPU: CPU ops, the wiring only): busy time,
    launches per decode step, and the top ops by time, a matmul among them."""
    out = tmp_path / "rows.jsonl"
    argv = ["--tiny", "--rows", "4x8", "--attention", "eager", "--bandwidth", "1e10", "--out", str(out), "--profile"]
    assert bench_sampler.main(argv) == 0
    [row] = [json.loads(line) for line in out.read_text().splitlines()]
    profile = row["profile"]
    assert profile["busy_s"] > 0 and profile["wall_s"] > 0 and profile["launches_per_step"] > 0
    assert any("mm" in k["name"] or "linear" in k["name"] for k in profile["top"]), profile["top"]
    assert profile["top"][0]["total_ms"] >= profile["top"][-1]["total_ms"]


def test_decode_parts_times_every_gemm_and_the_eager_attention_on_the_cpu(tmp_path):
    """The CPU smoke test of bench.decode_parts: the layer's maps apart and fused, the head, the eager attention
    per row (the Triton grid needs CUDA), all with positive times, in the JSON and the printed sums."""
    out = tmp_path / "parts.json"
    assert decode_parts.main(["--tiny", "--rows", "32x512", "256x1024", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    maps = {r["map"] for r in record["gemm"]}
    assert maps == {"q", "k", "v", "o", "gate", "up", "down", "qkv", "gate_up", "head"}
    assert all(r["us"] > 0 for r in record["gemm"])
    qkv = next(r for r in record["gemm"] if r["map"] == "qkv")
    assert qkv["features"] == [32, 64]  # the tiny model: hidden 32 -> 4 x 8 + 2 x 2 x 8
    eager = [r for r in record["attention"] if r["impl"] == "eager"]
    assert [r["row"] for r in eager] == ["2x8", "2x16"] and all(r["us"] > 0 and r["kv_bytes"] > 0 for r in eager)


def test_check_sampler_tiny_passes_and_its_power_check_rejects(tmp_path):
    out = tmp_path / "check.json"
    assert check_sampler.main(["--tiny", "--out", str(out)]) == 0
    results = {r["check"]: r for r in json.loads(out.read_text())}
    assert set(results) == {"logprobs", "distribution", "logprobs+mask"}
    assert results["logprobs"]["pass"] and results["logprobs"]["mean_abs_dlogp"] < 1e-4
    dist = results["distribution"]
    assert dist["pass"] and dist["power_ok"] and dist["power"]["reject"] and not dist["T=1"]["reject"]
    mask = results["logprobs+mask"]
    assert mask["reasoning_outside_span"] == 0 and mask["reasoning_inside_span"] > 0


def test_distribution_statistic_separates_laws():
    same = check_sampler.chi2_homogeneity([500, 300, 200], [510, 290, 200])
    apart = check_sampler.chi2_homogeneity([500, 300, 200], [350, 350, 300])
    assert check_sampler.chi2_sf(*same) > 0.5 and check_sampler.chi2_sf(*apart) < 1e-6


# ------------------------------------------------------------------------------------------ the session
def _fake(name, code, kind="other", min_s=0.0, max_s=30.0, **kw):
    return gpu_session.Piece(name, [sys.executable, "-c", code, "{out}", "{deadline}"], kind, 1, min_s, max_s, **kw)


def test_gpu_session_times_out_skips_and_goes_on(tmp_path):
    sleeper = "import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(60)"
    quick = "import json, sys\njson.dump({'deadline': float(sys.argv[2])}, open(sys.argv[1], 'w'))"
    pieces = [
        _fake("sleeper", sleeper, max_s=3.0),
        _fake("quick", quick),
        _fake("too-big", quick, min_s=1000.0),
    ]
    lines = []
    t0 = time.time()
    session = gpu_session.run_session(pieces, tmp_path / "out", budget_s=60, reserve_s=1, echo=lines.append)
    assert time.time() - t0 < 30
    records = {p["name"]: p for p in session["pieces"]}
    assert records["sleeper"]["status"].startswith("timeout")
    assert records["quick"]["status"] == "ok" and records["quick"]["output"]["deadline"] > t0
    assert records["too-big"]["status"].startswith("skipped")
    assert sorted(os.listdir(tmp_path / "out")) == ["logs.tar.gz", "session.json", "summary.md"]
    assert "| sleeper | timeout" in (tmp_path / "out" / "summary.md").read_text()
    assert any("quick: ok" in line for line in lines)
    with pytest.raises(ProcessLookupError):  # the timed-out piece's process was ended
        os.kill(records["sleeper"]["output"], 0)


def test_gpu_session_runs_fixes_only_after_slow_steps(tmp_path):
    def diag(slow: bool) -> str:
        times = [40.0] + [2.0] * 10
        if slow:
            times[3] = 5.5
        steps = [
            {"step": i + 1, "step_s": t, "gc": {"pause_s": {"2": 1.0 if t == 5.5 else 0.0}}}
            for i, t in enumerate(times)
        ]
        result = {"variant": "fast-512", "fix": "plain", "steps": steps}
        return f"import json, sys\njson.dump({result!r}, open(sys.argv[1], 'w'))"

    for slow in (False, True):
        pieces = [
            _fake("diag", diag(slow), kind="grpo"),
            _fake("fixA", "pass", kind="grpo", fix_slot=True),
            _fake("fixB", "pass", kind="grpo", fix_slot=True),
        ]
        for p, fix in zip(pieces[1:], ["compile-threads-1", "gc-freeze"], strict=True):
            p.cmd += ["--fix", fix]
            p.name = f"grpo:fast-512:{fix}"
        session = gpu_session.run_session(pieces, tmp_path / f"out{slow}", budget_s=60, reserve_s=1, echo=print)
        status = [p["status"] for p in session["pieces"]]
        if slow:  # the GC signal puts gc-freeze first
            assert [p["name"] for p in session["pieces"]][1:] == [
                "grpo:fast-512:gc-freeze",
                "grpo:fast-512:compile-threads-1",
            ]
            assert status == ["ok", "ok", "ok"]
        else:
            assert status[0] == "ok" and all(s.startswith("skipped (the diagnosis") for s in status[1:])


@pytest.mark.slow
def test_tiny_grpo_benchmark_runs_end_to_end(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "bench.bench_grpo", "--tiny", "--variants", "fast-512-rv", "--steps", "2"]
    subprocess.run(cmd + ["--out", str(out)], check=True, cwd=REPO, timeout=900)
    data = json.loads(out.read_text())
    summary, raw = data["summary"][0], data["raw"][0]
    assert summary["fast_path_used"] and summary["completion_tokens"] == 32 * 16
    assert len(raw["steps"]) == 2
    for step in raw["steps"]:
        assert step["generation_s"] > 0 and step["training_s"] > 0 and "gc" in step and "host" in step


@pytest.mark.slow
def test_tiny_gpu_session_wires_every_piece_kind(tmp_path):
    out = tmp_path / "session"
    pieces = ["check", "grpo:fast-512:plain", "sampler:core"]
    cmd = [sys.executable, "-m", "bench.gpu_session", "--part", "1", "--tiny", "--out", str(out), "--pieces", *pieces]
    subprocess.run(cmd, check=True, cwd=REPO, timeout=900)
    session = json.loads((out / "session.json").read_text())
    assert [p["status"] for p in session["pieces"]] == ["ok", "ok", "ok"]
    assert session["pieces"][1]["output"]["steps"] and any("ms_per_step" in r for r in session["pieces"][2]["output"])
