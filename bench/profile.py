"""Where the time goes: py-spy on a loaded server, onnxruntime's profiler on single steps.

    python -m bench.profile --model DIR [--concurrency 1,64] [--seconds 20]

    py-spy    `python -m server` under a closed loop (chat mix) at each concurrency;
              py-spy samples every thread of the server process (GIL-holding and idle
              stacks alike); the engine thread's samples are split by what they were in
    onnxruntime   a session with enable_profiling runs decode steps at batch 1, 16, 64
              (each row holding 128 tokens) and one 256-token prefill; time by operator type

Writes bench/results/<name>-profile.json and .md (and the raw py-spy stacks).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.harness import Run, token_range, warm_up
from bench.loadgen import closed_loop, summarize
from bench.systems import ROOT, AttnserveGrpc, ServerSettings
from bench.workload import LengthScale, max_total_tokens

# Engine-thread frames, by the first of these function names found on the stack (innermost first).
ENGINE_BUCKETS = (
    ("run_with_iobinding", "onnxruntime run"),
    ("call_soon_threadsafe", "waking the asyncio loop (once per token)"),
    ("bind_step", "binding inputs/outputs"),
    ("bind", "binding inputs/outputs"),
    ("get_outputs", "logits to numpy"),
    ("sample_batch", "sampling"),
    ("build_step_inputs", "building input arrays"),
    ("push", "detokenize + stop strings"),
    ("_send", "stream callbacks"),
    ("schedule", "scheduler"),
    ("update", "scheduler"),
    ("on_step", "metrics observer"),
    ("on_request_finished", "metrics observer"),
    ("_read_inbox", "reading the inbox / waiting for work"),
)


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) each thread of a process has used, by native thread id."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rpartition(")")[2].split()
        except FileNotFoundError:  # the thread ended
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return out


def cores_by_thread(before: dict[int, float], after: dict[int, float], names: dict[int, str], window: float) -> dict:
    """Cores each thread kept busy over the window; threads Python does not know are onnxruntime's pool
    or gRPC's core threads (py-spy names only Python threads)."""
    busy: collections.Counter = collections.Counter()
    for tid, seconds in after.items():
        busy[names.get(tid, f"native thread {tid} (onnxruntime pool or gRPC core)")] += (seconds - before.get(tid, 0.0)) / window
    return {name: round(cores, 3) for name, cores in busy.most_common() if cores >= 0.005}


def pyspy_profile(pyspy: str, system: AttnserveGrpc, seconds: float, out_file: Path) -> dict:
    """Record the server for `seconds`; returns samples by thread, the engine thread's buckets, and the
    cores each thread (Python's and native ones) kept busy meanwhile."""
    cpu_before, started = thread_cpu_seconds(system.process.pid), time.perf_counter()
    command = [pyspy, "record", "--pid", str(system.process.pid), "--duration", str(int(seconds)), "--rate", "200",
               "--format", "raw", "--threads", "--idle", "--nonblocking", "-o", str(out_file)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    cpu_after, window = thread_cpu_seconds(system.process.pid), time.perf_counter() - started
    threads: collections.Counter = collections.Counter()
    thread_names: dict[int, str] = {}
    engine: collections.Counter = collections.Counter()
    leaf: collections.Counter = collections.Counter()
    for line in out_file.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        thread = frames[0]  # "thread (TID): NAME"
        threads[thread] += n
        if thread.startswith("thread ("):
            thread_names[int(thread[len("thread ("):thread.index(")")])] = thread.partition(": ")[2] or thread
        if "attnserve-engine" in thread or any("engine.py" in f and "_run" in f for f in frames):
            names = [f.split(" (")[0].split(".")[-1] for f in reversed(frames[1:])]  # innermost first, bare names
            bucket = next((label for key, label in ENGINE_BUCKETS if key in names), "other engine work")
            engine[bucket] += n
            leaf[frames[-1].split(" (")[0] + " (" + frames[-1].split(" (")[-1]] += n
    total_engine = sum(engine.values()) or 1
    return {
        "cores_by_thread": cores_by_thread(cpu_before, cpu_after, thread_names, window),
        "threads": dict(threads.most_common()),
        "engine_thread_share": {k: v / total_engine for k, v in engine.most_common()},
        "engine_thread_top_leaves": {k: v / total_engine for k, v in leaf.most_common(12)},
        "raw": str(out_file),
    }


async def profile_server(args, out_dir: Path) -> list[dict]:
    from server.contract import ModelCard

    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        raise SystemExit("py-spy is not installed: pip install py-spy (or pass --skip-pyspy)")
    card = ModelCard.load(args.model)
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    scale = LengthScale(1.0)
    capacity = -(-max_total_tokens(scale) // 64) * 64
    settings = ServerSettings(kv_slots=max(concurrency), max_seq_len=min(capacity, card.max_positions))
    plan = argparse.Namespace(seed=0, scale=scale, time_cap_s=args.seconds + 30, concurrency=concurrency,
                              warmup_requests=8)
    run = Run(plan, card, settings, token_range(args.model))
    system = AttnserveGrpc(args.model, settings)
    await system.start()
    out = []
    try:
        await warm_up(run, system)
        for c in concurrency:
            requests = run.requests("chat", 100 * c)  # more than the window needs: the loop is cut at the cap
            loop_task = asyncio.ensure_future(closed_loop(system, requests, c, args.seconds + 5))
            await asyncio.sleep(2.0)  # let the concurrency build up
            raw = out_dir / f"{args.name}-pyspy-c{c}.txt"
            before, started = os.times(), time.perf_counter()
            figures = await asyncio.to_thread(pyspy_profile, pyspy, system, args.seconds, raw)
            after, window = os.times(), time.perf_counter() - started
            point = summarize(await loop_task)
            out.append({"concurrency": c, "output_tokens_per_s": point["output_tokens_per_s"],
                        "tpot_p50_ms": (point["tpot_s"]["p50"] or 0) * 1000, **figures,
                        # the gRPC client (load generator) on the same cores, over the same window
                        "load_generator_cores": (after.user + after.system - before.user - before.system) / window})
    finally:
        await system.stop()
    return out


def ort_profile(model_dir: Path, batches=(1, 16, 64), past: int = 128, repeats: int = 20) -> list[dict]:
    """onnxruntime's own profiler on decode steps (and one 256-token prefill): time by operator type."""
    import onnxruntime as ort

    from server.contract import ModelCard
    from server.runner import StepInputs, session_options

    from bench.systems import build_runner

    card = ModelCard.load(model_dir)
    out = []
    for b, width in [(b, 1) for b in batches] + [(1, 256)]:
        runner = build_runner(model_dir, card, b, past + width + 1)
        options = session_options()  # the server's defaults, then profiling
        options.enable_profiling = True
        prefix = tempfile.mkdtemp(prefix="attnserve-ort-profile-")
        options.profile_file_prefix = os.path.join(prefix, "ort")
        runner.session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        runner.binding = runner.session.io_binding()
        rng = np.random.default_rng(0)
        ids = rng.integers(0, card.vocab_size, (b, width)).astype(np.int64)  # any vocabulary size
        positions = np.broadcast_to(np.arange(past, past + width), (b, width)).astype(np.int64).copy()
        step = StepInputs(ids, positions, np.full(b, past + width - 1, np.int32), np.full(b, width, np.int32))
        for _ in range(3):
            runner.step(step)
        wall = []
        for _ in range(repeats):
            started = time.perf_counter()
            runner.step(step)
            wall.append(time.perf_counter() - started)
        trace = json.loads(Path(runner.session.end_profiling()).read_text())
        shutil.rmtree(prefix, ignore_errors=True)
        by_op: collections.Counter = collections.Counter()
        model_run = []
        for event in trace:
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                by_op[event["args"]["op_name"]] += event["dur"]
            elif event.get("cat") == "Session" and event["name"] == "model_run":
                model_run.append(event["dur"])
        runs = 3 + repeats
        kernels = sum(by_op.values()) / runs
        out.append({
            "batch": b, "new_tokens_per_row": width, "past": past,
            "wall_ms_p50": float(np.median(wall)) * 1000,
            "model_run_ms_mean": float(np.mean(model_run[3:])) / 1000 if len(model_run) > 3 else None,
            "kernel_ms_per_run": kernels / 1000,
            "op_share": {op: t / sum(by_op.values()) for op, t in by_op.most_common(8)},
        })
    return out


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}`; load average {results['load_at_start'][0]} at start, "
             f"{results['load_at_end'][0]} at end", ""]
    for p in results.get("pyspy", []):
        lines.append(f"py-spy, server at c={p['concurrency']} ({p['output_tokens_per_s']:.0f} tok/s, "
                     f"TPOT p50 {p['tpot_p50_ms']:.1f} ms): engine thread time")
        lines += ["", "| engine thread | share |", "|---|---|"]
        lines += [f"| {k} | {v:.1%} |" for k, v in p["engine_thread_share"].items()]
        lines += ["", "| server thread | cores busy |", "|---|---|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in p["cores_by_thread"].items()]
        lines.append(f"| (the load generator, another process) | {p['load_generator_cores']:.2f} |")
        lines.append("")
    lines += ["| batch | new tokens/row | wall ms | model_run ms | kernels ms | top operators |", "|---|---|---|---|---|---|"]
    for p in results.get("onnxruntime", []):
        ops = ", ".join(f"{k} {v:.0%}" for k, v in list(p["op_share"].items())[:5])
        lines.append(f"| {p['batch']} | {p['new_tokens_per_row']} | {p['wall_ms_p50']:.2f} | "
                     f"{p['model_run_ms_mean'] or 0:.2f} | {p['kernel_ms_per_run']:.2f} | {ops} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--name", help="default: the model dir's name")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--concurrency", default="1,64")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--skip-pyspy", action="store_true")
    args = parser.parse_args(argv)
    args.name = args.name or args.model.name
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"command": "python -m bench.profile " + " ".join(sys.argv[1:] if argv is None else argv),
               "load_at_start": [round(x, 2) for x in os.getloadavg()]}
    if not args.skip_pyspy:
        results["pyspy"] = asyncio.run(profile_server(args, args.out))
    results["onnxruntime"] = ort_profile(args.model)
    results["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    (args.out / f"{args.name}-profile.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{args.name}-profile.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
