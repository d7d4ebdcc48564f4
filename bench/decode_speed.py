"""Single-stream decode speed of model dirs through the server's runner, without the server around it.

    python -m bench.decode_speed DIR [DIR ...] [--repeats 7] [--threads 2]

Each repeat: a seeded 16-token prompt as one prefill, then 64 greedy decode steps, timed; the dirs
take turns within every repeat so drift on the machine falls on all of them alike, and the first
repeat is a warm-up. Prints the median milliseconds per decode step of each dir.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from server.contract import ModelCard
from server.runner import ModelRunner, StepInputs

PROMPT_TOKENS = 16
DECODE_STEPS = 64


def decode_ms_per_token(runner: ModelRunner, prompt: np.ndarray) -> float:
    n = len(prompt)
    runner.step(StepInputs(prompt[None, :], np.arange(n, dtype=np.int64)[None], np.array([n - 1], np.int32),
                           np.array([n], np.int32)))
    token = int(prompt[-1])
    started = time.perf_counter()
    for position in range(n, n + DECODE_STEPS):
        logits = runner.step(StepInputs(np.array([[token]], np.int64), np.array([[position]], np.int64),
                                        np.array([position], np.int32), np.array([1], np.int32)))
        token = int(np.argmax(logits.reshape(-1)[-runner.card.vocab_size:]))
    return (time.perf_counter() - started) / DECODE_STEPS * 1000


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", type=Path, nargs="+")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per dir, the first one a warm-up")
    parser.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    args = parser.parse_args(argv)
    runners = [ModelRunner(d, ModelCard.from_json((d / "attnserve.json").read_text()), kv_slots=1,
                           capacity=PROMPT_TOKENS + DECODE_STEPS + 1, intra_op_threads=args.threads)
               for d in args.dirs]
    prompt = np.random.default_rng(0).integers(100, 10_000, size=PROMPT_TOKENS).astype(np.int64)
    times: dict[Path, list[float]] = {d: [] for d in args.dirs}
    for repeat in range(args.repeats):
        for d, runner in zip(args.dirs, runners):
            ms = decode_ms_per_token(runner, prompt)
            if repeat:
                times[d].append(ms)
    for d in args.dirs:
        median = statistics.median(times[d])
        print(f"{d}: {median:.2f} ms/token ({1000 / median:.1f} tokens/s); runs {[round(t, 2) for t in times[d]]}")


if __name__ == "__main__":
    main()
