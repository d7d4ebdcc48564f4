"""Engine settings worth measuring, each variant against the server's defaults on the same requests.

    python -m bench.experiments --model DIR [--name NAME] [--concurrency 1,16,64]

    runtime      onnxruntime intra-op spinning on (the server's default is off),
                 one intra-op thread: chat mix, closed loop at each concurrency, over gRPC
                 (python -m server) and in-process
    scheduling   prefill_chunk_tokens, prefill_tokens_per_decode_row (long-prompt and chat
                 mixes) and the call-splitting overhead (split_into_calls' call_overhead_tokens):
                 closed loop at 16 for the long-prompt mix
    sampling     what the engine's sampling path (np.stack of the logits rows + sample_batch)
                 costs per step at batch 1, 16, 64, greedy and top-p

Writes bench/results/<name>-experiments.json and .md. Every variant sees the same requests.
"""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from bench.harness import LONG_MIX_CONCURRENCY, Run, measure_point, token_range, warm_up
from bench.loadgen import percentiles
from bench.report import points_table
from bench.systems import ROOT, AttnserveGrpc, AttnserveInProcess, ServerSettings
from bench.workload import LengthScale, max_total_tokens



@dataclasses.dataclass
class Variant:
    name: str
    mix: str
    grpc: bool = False  # python -m server, else the engine in-process
    settings: dict = dataclasses.field(default_factory=dict)  # ServerSettings fields
    call_overhead_tokens: int | None = None

    def system(self, model_dir: Path, base: ServerSettings):
        settings = dataclasses.replace(base, **self.settings)
        if self.grpc:
            return AttnserveGrpc(model_dir, settings, name=f"grpc[{self.name}]")
        return AttnserveInProcess(model_dir, settings, name=f"inprocess[{self.name}]",
                                  call_overhead_tokens=self.call_overhead_tokens)


def variants() -> list[Variant]:
    runtime = []
    for grpc in (True, False):
        runtime += [
            Variant("default", "chat", grpc),
            Variant("intra_op_spinning=on", "chat", grpc, settings={"intra_op_spinning": True}),
            Variant("intra_op_threads=1", "chat", grpc, settings={"intra_op_threads": 1}),
        ]
    scheduling = [Variant(f"prefill_chunk_tokens={n}", "long", settings={"prefill_chunk_tokens": n, "prefill_tokens_per_decode_row": 0})
                  for n in (64, 128, 256, 512)]
    scheduling += [Variant(f"prefill_tokens_per_decode_row={n}", mix, settings={"prefill_tokens_per_decode_row": n})
                   for mix in ("long", "chat") for n in (0, 2, 4, 8)]
    scheduling += [Variant(f"call_overhead_tokens={n}", "long", call_overhead_tokens=n) for n in (0, 128, 10**6)]
    return runtime + scheduling


def sampling_cost(vocab_size: int, batches=(1, 16, 64), repeats: int = 50) -> list[dict]:
    """Per-step cost of the engine's sampling path: stack the rows, then sample_batch."""
    from server.sampling import RequestSampler, sample_batch
    from server.types import SamplingParams

    rng = np.random.default_rng(0)
    out = []
    for b in batches:
        logits = rng.standard_normal((b, vocab_size)).astype(np.float32)
        rows = {i: logits[i] for i in range(b)}
        for label, params in (("greedy", SamplingParams()), ("top_p=0.9,T=0.8", SamplingParams(0.8, top_p=0.9, seed=1))):
            samplers = [RequestSampler(params, vocab_size) for _ in range(b)]
            timings = []
            for _ in range(repeats):
                started = time.perf_counter()
                batch = np.stack([rows[i] for i in range(b)])
                sample_batch(samplers, batch)
                timings.append(time.perf_counter() - started)
            out.append({"batch": b, "sampling": label, "ms": percentiles(timings)["p50"] * 1000})
    return out


async def run_experiments(args) -> dict:
    from tqdm import tqdm

    from server.contract import ModelCard

    model_dir = args.model
    card = ModelCard.load(model_dir)
    concurrency = tuple(int(c) for c in args.concurrency.split(","))
    scale = LengthScale(args.length_scale)
    capacity = -(-max_total_tokens(scale) // 64) * 64
    base = ServerSettings(kv_slots=max(concurrency), max_seq_len=min(capacity, card.max_positions))
    plan = argparse.Namespace(seed=args.seed, scale=scale, time_cap_s=args.time_cap, concurrency=concurrency,
                              warmup_requests=8)
    run = Run(plan, card, base, token_range(model_dir))
    long_c = min(LONG_MIX_CONCURRENCY, max(concurrency))
    results = {"model": str(model_dir), "command": "python -m bench.experiments " + " ".join(sys.argv[1:]),
               "load_at_start": [round(x, 2) for x in os.getloadavg()], "variants": []}
    chosen = [v for v in variants() if not args.only or v.name in args.only.split(",")]
    total = sum(args.rounds_requests(c) for v in chosen for c in (concurrency if v.mix == "chat" else (long_c,)))
    with tqdm(total=total, unit="req", file=sys.stderr) as progress:
        run.progress = progress
        for v in chosen:
            system = v.system(model_dir, base)
            await system.start()
            try:
                await warm_up(run, system)
                points = ([(c, run.requests("chat", args.rounds_requests(c))) for c in concurrency] if v.mix == "chat"
                          else [(long_c, run.requests("long", args.rounds_requests(long_c)))])
                for c, requests in points:
                    point = await measure_point(run, system, v.mix, "closed", requests, concurrency=c,
                                                slots=base.kv_slots)
                    results["variants"].append({"variant": v.name, **point})
            finally:
                await system.stop()
    results["sampling"] = sampling_cost(card.vocab_size)
    results["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return results


def markdown(results: dict) -> str:
    lines = [f"`{results['command']}`; load average {results['load_at_start'][0]} at start, "
             f"{results['load_at_end'][0]} at end", ""]
    lines += [points_table(results["variants"]), ""]
    lines += ["| batch | sampling | stack + sample_batch, ms (p50) |", "|---|---|---|"]
    lines += [f"| {s['batch']} | {s['sampling']} | {s['ms']:.3f} |" for s in results["sampling"]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--name", help="default: the model dir's name")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--only", help="comma-separated variant names")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--min-requests", type=int, default=8)
    parser.add_argument("--time-cap", type=float, default=120.0)
    parser.add_argument("--length-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.rounds_requests = lambda c: max(args.min_requests, args.rounds * c)
    results = asyncio.run(run_experiments(args))
    name = (args.name or args.model.name) + "-experiments"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(results, indent=1) + "\n")
    (args.out / f"{name}.md").write_text(markdown(results))
    print(markdown(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
