"""python -m bench: every system, one after another, on one model dir, in one run.

    plan (workload, settings) ─► bandwidth floor ─► for each system: start, warm up, points, stop
                                                    ─► bench/results/<name>.json, .md, -*.png

Only ratios from one run mean anything on a shared machine: the run records the
load average around every point, and the report sets each target's two figures
side by side from the same run.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bench import bandwidth, genai_build, peers, report
from bench.loadgen import closed_loop, occupancy, open_loop, summarize
from bench.systems import (ROOT, AttnserveGrpc, AttnserveInProcess, GenaiEngine, GenaiGenerator, OrtRecompute,
                           ServerSettings, System, TorchCachedLoop, TransformersGenerate)
from bench.workload import LengthScale, make_requests, max_total_tokens, poisson_arrivals

ALL_SYSTEMS = ("attnserve-grpc", "attnserve-inprocess", "attnserve-slots1", "torch-eager", "no-kv-cache",
               "genai-engine", "genai-generator")
AUTO_RATE_FRACTIONS = (0.5, 0.8)  # Poisson rates, as fractions of attnserve-grpc's closed-loop rate at the top concurrency
LONG_MIX_CONCURRENCY = 16
LONG_POISSON_FRACTION = 0.7  # of attnserve-grpc's closed-loop rate on the long mix
# Run when named in --systems, or with --peers (bench/peers.py; llamacpp needs `make peers`).
# genai-builder-*: onnxruntime-genai on the model its own builder made (bench/genai_build.py, `make peers`).
PEER_SYSTEMS = ("attnserve-http", "llamacpp", "genai-builder-engine", "genai-builder-generator")
KNOWN_SYSTEMS = ALL_SYSTEMS + PEER_SYSTEMS
ALT_PREFIX = "attnserve-grpc:"  # + a --alt-model dir's name


@dataclass
class Plan:
    model_dir: Path
    name: str
    out_dir: Path
    systems: tuple[str, ...]
    concurrency: tuple[int, ...]
    no_cache_concurrency: tuple[int, ...]
    rates: Optional[tuple[float, ...]]  # None = AUTO_RATE_FRACTIONS of the measured rate
    rounds: int  # closed loop: rounds x concurrency requests per point (at least min_requests)
    min_requests: int
    poisson_requests: int
    time_cap_s: float
    seed: int
    scale: LengthScale
    checkpoint: Optional[Path]
    prefill_chunk_tokens: int
    threads: int
    gguf: Optional[Path] = None  # llamacpp's model; None: the GGUF the model dir was imported from
    closed_only: bool = False  # no Poisson or long-mix points (peer comparisons at a few concurrencies)
    llamacpp_flags: tuple[str, ...] = ()  # appended to llama-server's command line
    alt_models: tuple[Path, ...] = ()  # more model dirs served like attnserve-grpc: systems attnserve-grpc:<dir name>
    genai_model: Optional[Path] = None  # genai-builder-*'s folder; None: bench/genai_build.py's
    warmup_requests: int = 8
    bandwidth_mb: int = 1024

    def requests_per_point(self, concurrency: int) -> int:
        return max(self.min_requests, self.rounds * concurrency)


def parse_args(argv=None) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model dir (python -m export)")
    parser.add_argument("--name", help="results name: bench/results/<name>.json (default: the model dir's name)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                        help=f"comma-separated subset of {','.join(KNOWN_SYSTEMS)} [{','.join(ALL_SYSTEMS)}]")
    parser.add_argument("--peers", action="store_true", help=f"add {', '.join(PEER_SYSTEMS)} to --systems")
    parser.add_argument("--alt-model", type=Path, action="append", default=[],
                        help="another model dir of the same model (quantized weights, say), served over gRPC with the "
                        "same settings as system attnserve-grpc:<dir name>, after the others; repeatable")
    parser.add_argument("--llamacpp-flags", default="", help="more llama-server flags, one string: --llamacpp-flags=\"--kv-unified\"")
    parser.add_argument("--genai-model", type=Path, help="genai-builder-*'s model folder (default: the one "
                        "`make peers` builds with onnxruntime-genai's own builder, int4 CPU)")
    parser.add_argument("--gguf", type=Path, help="GGUF for llamacpp (default: the one the model dir was imported from)")
    parser.add_argument("--concurrency", default="1,4,16,64", help="closed-loop concurrencies [1,4,16,64]")
    parser.add_argument("--no-cache-concurrency", default="1,4",
                        help="concurrencies for no-kv-cache, whose cost grows with the square of the length [1,4]")
    parser.add_argument("--rates", default="auto", help="Poisson rates in requests/s, or auto = "
                        f"{', '.join(map(str, AUTO_RATE_FRACTIONS))} x attnserve-grpc's closed-loop rate at the top concurrency")
    parser.add_argument("--rounds", type=int, default=2, help="closed loop: requests per point = rounds x concurrency [2]")
    parser.add_argument("--min-requests", type=int, default=8, help="closed loop: at least this many requests per point [8]")
    parser.add_argument("--poisson-requests", type=int, default=64, help="requests per Poisson point [64]")
    parser.add_argument("--time-cap", type=float, default=120.0, help="seconds per point before it is cut short [120]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length-scale", type=float, default=1.0, help="multiply every prompt and output length [1]")
    parser.add_argument("--checkpoint", type=Path, help="PyTorch checkpoint of a from-scratch model dir, for torch-eager "
                        "(default: checkpoints/<model name> when it exists)")
    parser.add_argument("--prefill-chunk-tokens", type=int, default=256, help="attnserve's per-step prompt budget [256]")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for PyTorch [all cores]")
    parser.add_argument("--closed-only", action="store_true",
                        help="only the closed-loop chat points: no Poisson or long-prompt points for attnserve-grpc")
    parser.add_argument("--quick", action="store_true", help="smoke check: concurrency 1,4, lengths x 1/8, short caps")
    args = parser.parse_args(argv)

    def ints(text):
        return tuple(int(x) for x in text.split(",") if x)

    systems = tuple(s for s in args.systems.split(",") if s)
    if args.peers:
        systems += tuple(s for s in PEER_SYSTEMS if s not in systems)
    unknown = sorted(set(systems) - set(KNOWN_SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(KNOWN_SYSTEMS)}")
    plan = Plan(
        model_dir=args.model, name=args.name or args.model.name, out_dir=args.out, systems=systems,
        concurrency=ints(args.concurrency), no_cache_concurrency=ints(args.no_cache_concurrency),
        rates=None if args.rates == "auto" else tuple(float(r) for r in args.rates.split(",")),
        rounds=args.rounds, min_requests=args.min_requests, poisson_requests=args.poisson_requests,
        time_cap_s=args.time_cap, seed=args.seed, scale=LengthScale(args.length_scale), checkpoint=args.checkpoint,
        prefill_chunk_tokens=args.prefill_chunk_tokens, threads=args.threads, gguf=args.gguf,
        closed_only=args.closed_only, alt_models=tuple(args.alt_model), genai_model=args.genai_model,
        llamacpp_flags=tuple(shlex.split(args.llamacpp_flags)),
    )
    plan = dataclasses.replace(plan, systems=plan.systems + tuple(ALT_PREFIX + m.name for m in plan.alt_models))
    if args.quick:
        plan = dataclasses.replace(plan, concurrency=(1, 4), no_cache_concurrency=(1, 4), rounds=2, min_requests=4,
                                   poisson_requests=12, time_cap_s=min(args.time_cap, 20.0),
                                   scale=LengthScale(args.length_scale / 8), warmup_requests=4, bandwidth_mb=256)
    return plan


# --------------------------------------------------------------------------- the run


@dataclass
class Run:
    plan: Plan
    card: object
    settings: ServerSettings
    token_range: tuple[int, int]
    points: list[dict] = field(default_factory=list)
    systems: dict = field(default_factory=dict)
    progress: object = None

    def requests(self, mix: str, count: int, seed_offset: int = 0):
        return make_requests(mix, count, self.plan.seed + seed_offset, self.token_range, self.plan.scale)


def token_range(model_dir: Path) -> tuple[int, int]:
    """Ordinary vocabulary ids: above every added (special) token, below the tokenizer's size."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    special = list(tokenizer.get_added_tokens_decoder())
    return (max(special) + 1 if special else 0), tokenizer.get_vocab_size(with_added_tokens=False)


def build_system(name: str, run: Run) -> Optional[System]:
    plan, card = run.plan, run.card
    model_dir = plan.model_dir
    if name == "attnserve-grpc":
        return AttnserveGrpc(model_dir, run.settings)
    if name == "attnserve-inprocess":
        return AttnserveInProcess(model_dir, run.settings)
    if name == "attnserve-http":
        return peers.AttnserveHttp(model_dir, run.settings)
    if name.startswith(ALT_PREFIX):
        alt = next(m for m in plan.alt_models if ALT_PREFIX + m.name == name)
        return AttnserveGrpc(alt, run.settings, name=name)
    if name == "llamacpp":
        binary, gguf = peers.llama_server_path(), plan.gguf or peers.source_gguf(card)
        reason = peers.llamacpp_skip_reason(binary, gguf)
        if reason:
            print(f"llamacpp skipped: {reason}", file=sys.stderr)
            return None
        threads = run.settings.intra_op_threads or os.cpu_count()  # attnserve's: 0 is one per core
        return peers.LlamaCppServer(binary, gguf, run.settings.max_seq_len, threads, plan.concurrency[0],
                                    extra_flags=plan.llamacpp_flags)
    if name == "attnserve-slots1":
        return AttnserveGrpc(model_dir, dataclasses.replace(run.settings, kv_slots=1), name="attnserve-slots1")
    if name == "no-kv-cache":
        return OrtRecompute(model_dir, run.settings.max_seq_len, max(plan.no_cache_concurrency))
    if name.startswith("genai-builder-"):
        folder = plan.genai_model or genai_build.GENAI_DIR
        if not (folder / "genai_config.json").is_file():
            print(f"{name} skipped: no onnxruntime-genai builder model in {folder} (run `make peers`)", file=sys.stderr)
            return None
        system = GenaiEngine(folder) if name.endswith("-engine") else GenaiGenerator(folder, genai_pad_token(folder))
        system.name = name
        system.description += ", on the model onnxruntime-genai's builder made (int4, CPU)"
        return system
    if name == "genai-engine":
        return GenaiEngine(model_dir)
    if name == "genai-generator":
        return GenaiGenerator(model_dir, genai_pad_token(model_dir))
    if name == "torch-eager":
        source = (card.exporter or {}).get("source") or {}
        if source.get("format") == "gguf":
            return TransformersGenerate(Path(source["path"]), plan.threads, genai_pad_token(model_dir))
        checkpoint = plan.checkpoint or ROOT / "checkpoints" / card.name
        if not (checkpoint / "model.safetensors").is_file():
            print(f"torch-eager skipped: no checkpoint for {card.name} (pass --checkpoint)", file=sys.stderr)
            return None
        return TorchCachedLoop(checkpoint, plan.threads)
    raise ValueError(name)


def genai_pad_token(model_dir: Path) -> int:
    return int(json.loads((model_dir / "genai_config.json").read_text())["model"]["pad_token_id"])


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def measure_point(run: Run, system: System, mix: str, mode: str, requests, *, concurrency: int = 0,
                        rate: float = 0.0, slots: int = 0) -> dict:
    label = f"{system.name} {mix} " + (f"c={concurrency}" if mode == "closed" else f"{rate:.2f} req/s")
    run.progress.set_postfix_str(label)
    load_before = load_average()
    before = await system.counters()
    cpu_before = (_own_cpu_seconds(), system.server_cpu_seconds())
    if mode == "closed":
        result = await closed_loop(system, requests, concurrency, run.plan.time_cap_s, run.progress.update)
    else:
        arrivals = poisson_arrivals(len(requests), rate, run.plan.seed)
        result = await open_loop(system, requests, arrivals, run.plan.time_cap_s, max(run.plan.concurrency),
                                 run.progress.update)
    after = await system.counters()
    cpu_after = (_own_cpu_seconds(), system.server_cpu_seconds())
    if result.truncated:
        await system.settle()
    run.progress.update(max(0, len(requests) - len(result.records)))  # requests never sent (time cap)
    point = {
        "system": system.name, "mix": mix, "mode": mode, "concurrency": concurrency, "rate": rate,
        **summarize(result), "steps": occupancy(before, after, slots or concurrency, result),
        "load_before": load_before, "load_after": load_average(),
        "cpu": _cpu_figures(cpu_before, cpu_after, result.ended - result.started),
    }
    run.points.append(point)
    return point


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _cpu_figures(before, after, window: float) -> dict:
    """CPU seconds of the benchmark process (load generator, and the system itself when in-process) and of a
    server subprocess over a point, and their sum as a share of every core over the window."""
    bench = after[0] - before[0]
    server = after[1] - before[1] if after[1] is not None else None
    cores = os.cpu_count() or 1
    return {"bench_process_s": bench, "server_process_s": server,
            "share_of_all_cores": (bench + (server or 0.0)) / (max(window, 1e-9) * cores)}


async def warm_up(run: Run, system: System) -> None:
    """A few short requests at the top concurrency: sessions, arenas and threads are warm before any point."""
    plan = run.plan
    count = min(plan.warmup_requests, max(plan.concurrency))
    requests = [dataclasses.replace(r, max_new_tokens=min(4, r.max_new_tokens))
                for r in run.requests("chat", count, seed_offset=1)]
    await closed_loop(system, requests, count, plan.time_cap_s)


def find_point(points, system, mix="chat", mode="closed", concurrency=None) -> Optional[dict]:
    for p in points:
        if p["system"] == system and p["mix"] == mix and p["mode"] == mode and (
                concurrency is None or p["concurrency"] == concurrency):
            return p
    return None


async def run_system(run: Run, name: str) -> None:
    plan = run.plan
    system = build_system(name, run)
    if system is None:
        return
    run.progress.set_postfix_str(f"{name}: starting")
    started = time.perf_counter()
    await system.start()
    run.systems[name] = {"description": system.description, "settings": system.settings(),
                         "startup_s": time.perf_counter() - started}
    try:
        await warm_up(run, system)
        attnserve = name.startswith("attnserve")
        concurrencies = plan.no_cache_concurrency if name == "no-kv-cache" else plan.concurrency
        for c in concurrencies:
            if await system.prepare(c):  # restarted for this concurrency: warm again
                await warm_up(run, system)
            batching = name in ("attnserve-grpc", "attnserve-inprocess", "attnserve-http") or name.startswith(ALT_PREFIX)
            slots = run.settings.kv_slots if batching else (1 if attnserve else c)
            await measure_point(run, system, "chat", "closed", run.requests("chat", plan.requests_per_point(c)),
                                concurrency=c, slots=slots)
        if name == "attnserve-grpc" and not plan.closed_only:
            await poisson_points(run, system)
    finally:
        run.systems[name]["settings"] = system.settings()  # again: a system that restarted records each start
        await system.stop()


async def poisson_points(run: Run, system: System) -> None:
    """Chat-mix Poisson arrivals, then the long-prompt mix closed and Poisson (the stall target)."""
    plan = run.plan
    slots = run.settings.kv_slots
    top = find_point(run.points, system.name, concurrency=max(plan.concurrency))
    rates = plan.rates or tuple(f * top["requests_per_s"] for f in AUTO_RATE_FRACTIONS)
    for rate in (r for r in rates if r > 0):
        await measure_point(run, system, "chat", "poisson", run.requests("chat", plan.poisson_requests, seed_offset=2),
                            rate=rate, slots=slots)
    long_c = min(LONG_MIX_CONCURRENCY, max(plan.concurrency))
    closed = await measure_point(run, system, "long", "closed", run.requests("long", plan.requests_per_point(long_c)),
                                 concurrency=long_c, slots=slots)
    if closed["requests_per_s"] > 0:  # 0: the closed-loop point finished nothing before its time cap
        await measure_point(run, system, "long", "poisson", run.requests("long", plan.poisson_requests, seed_offset=2),
                            rate=LONG_POISSON_FRACTION * closed["requests_per_s"], slots=slots)


def planned_requests(plan: Plan) -> int:
    total = 0
    for name in plan.systems:
        cs = plan.no_cache_concurrency if name == "no-kv-cache" else plan.concurrency
        total += sum(plan.requests_per_point(c) for c in cs)
        if name == "attnserve-grpc" and not plan.closed_only:
            total += plan.poisson_requests * (len(plan.rates or AUTO_RATE_FRACTIONS) + 1)
            total += plan.requests_per_point(min(LONG_MIX_CONCURRENCY, max(plan.concurrency)))
    return total


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal:")), None)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "cpu_flags": peers.cpu_flags()}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("onnxruntime", "onnxruntime-genai", "torch", "transformers", "grpcio", "numpy"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def git_state() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty_files": git("status", "--porcelain").splitlines()}


async def run_all(plan: Plan, argv: list[str]) -> dict:
    from tqdm import tqdm

    from server.contract import ModelCard

    card = ModelCard.load(plan.model_dir)
    top = max(plan.concurrency)
    capacity = -(-max_total_tokens(plan.scale) // 64) * 64
    settings = ServerSettings(kv_slots=top, max_seq_len=min(capacity, card.max_positions),
                              prefill_chunk_tokens=plan.prefill_chunk_tokens)
    run = Run(plan, card, settings, token_range(plan.model_dir))
    results = {
        "name": plan.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench " + shlex.join(argv),
        "machine": machine(), "versions": versions(), "git": git_state(),
        "model": {"dir": str(plan.model_dir), "name": card.name, "architecture": card.architecture,
                  "n_layers": card.n_layers, "d_model": card.model.get("d_model"), "vocab_size": card.vocab_size,
                  "dtype": card.dtype},
        "plan": json.loads(json.dumps(dataclasses.asdict(plan), default=str)),  # paths as strings
        "attnserve_settings": dataclasses.asdict(settings),
        "load_at_start": load_average(),
    }
    bw = bandwidth.copy_bandwidth(plan.bandwidth_mb)
    results["bandwidth"] = bw
    results["floor"] = bandwidth.floor(plan.model_dir / "model.onnx", bw)
    started = time.perf_counter()
    with tqdm(total=planned_requests(plan), unit="req", dynamic_ncols=True, file=sys.stderr) as progress:
        run.progress = progress
        for name in plan.systems:
            await run_system(run, name)
    results["elapsed_s"] = time.perf_counter() - started
    results["bandwidth_at_end"] = bandwidth.copy_bandwidth(plan.bandwidth_mb)
    results["load_at_end"] = load_average()
    results["systems"] = run.systems
    results["points"] = run.points
    results["targets"] = report.targets(results)
    results["peer_table"] = peers.peer_table(run.points)
    return results


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = parse_args(argv)
    if not (plan.model_dir / "model.onnx").is_file():
        print(f"error: {plan.model_dir} is not a model dir; build one with python -m export", file=sys.stderr)
        return 2
    results = asyncio.run(run_all(plan, argv))
    paths = report.write(results, plan.out_dir)
    print(report.markdown(results))
    if results.get("peer_table"):
        print("\nAgainst llama.cpp, same run:\n\n" + results["peer_table"])
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0
