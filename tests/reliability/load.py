"""A small grpc.aio load generator for the reliability tests: closed loops to measure capacity, an open
loop at a fixed arrival rate with cancelled streams and tight deadlines mixed in."""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Callable, Optional

import grpc

from attnserve.v1 import generation_pb2_grpc as pb_grpc
from server.client import build_request

# A block of 20 arrivals holds exactly these kinds, shuffled, so every window of the soak sees the same mix:
# 20 % streams cancelled at a random point, 5 % requests with a deadline too tight to finish, 75 % normal.
KIND_BLOCK = ["cancel"] * 4 + ["deadline"] + ["generate"] * 8 + ["stream"] * 7
PROMPT_LENGTHS = (4, 48)
MAX_NEW_TOKENS = (16, 24, 32, 48, 64)


@dataclass(frozen=True)
class Spec:
    kind: str  # generate | stream (normal), cancel (stream left after cancel_after tokens), deadline
    prompt: tuple[int, ...]
    max_new_tokens: int
    temperature: float
    seed: int
    cancel_after: int = 0  # tokens to read before cancelling; 0 = before the first one
    timeout: float = 60.0


@dataclass(frozen=True)
class Outcome:
    spec: Spec
    code: str  # the gRPC code the client saw; CANCELLED for streams it cancelled itself
    tokens: int
    started: float  # time.monotonic()
    finished: float

    @property
    def latency(self) -> float:
        return self.finished - self.started


def spec_maker(seed: int, tight_deadline: tuple[float, float] = (0.005, 0.03)) -> Callable[[int], Spec]:
    """Arrival i -> its request: the mix of KIND_BLOCK, random prompts and lengths, reproducible from `seed`."""
    rng = random.Random(seed)
    blocks: list[str] = []

    def make(i: int) -> Spec:
        if not blocks:
            blocks.extend(rng.sample(KIND_BLOCK, len(KIND_BLOCK)))
        kind = blocks.pop()
        prompt = tuple(rng.randrange(2, 500) for _ in range(rng.randint(*PROMPT_LENGTHS)))
        max_new = rng.choice(MAX_NEW_TOKENS)
        temperature = rng.choice([0.0, 0.8])
        cancel_after = rng.randint(0, max_new - 1) if kind == "cancel" else 0
        timeout = rng.uniform(*tight_deadline) if kind == "deadline" else 60.0
        return Spec(kind, prompt, max_new, temperature, rng.randrange(2**31), cancel_after, timeout)

    return make


def normal_specs(seed: int) -> Callable[[int], Spec]:
    make = spec_maker(seed)

    def normal(i: int) -> Spec:
        spec = make(i)
        return Spec("generate" if i % 2 else "stream", spec.prompt, spec.max_new_tokens, spec.temperature, spec.seed)
    return normal


async def run_one(stub: pb_grpc.GenerationStub, spec: Spec) -> Outcome:
    request = build_request(prompt_token_ids=spec.prompt, max_new_tokens=spec.max_new_tokens,
                            temperature=spec.temperature, seed=spec.seed, ignore_eos=True)
    started = time.monotonic()
    tokens, code = 0, "OK"
    try:
        if spec.kind in ("generate", "deadline"):
            response = await stub.Generate(request, timeout=spec.timeout)
            tokens = len(response.token_ids)
        else:
            call = stub.GenerateStream(request, timeout=spec.timeout)
            if spec.kind == "cancel" and spec.cancel_after == 0:
                call.cancel()
                code = "CANCELLED"
            else:
                async for message in call:
                    tokens += len(message.token_ids)
                    if spec.kind == "cancel" and tokens >= spec.cancel_after:
                        call.cancel()
                        code = "CANCELLED"
                        break
    except grpc.aio.AioRpcError as e:
        code = e.code().name
    except asyncio.CancelledError:
        code = "CANCELLED"
    return Outcome(spec, code, tokens, started, time.monotonic())


async def closed_loop(target: str, concurrency: int, duration: float, make: Callable[[int], Spec]) -> list[Outcome]:
    """`concurrency` clients, each sending its next request when the last one ends, for `duration` seconds."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        end = time.monotonic() + duration
        counter = iter(range(10**9))
        outcomes: list[Outcome] = []

        async def client():
            while time.monotonic() < end:
                outcomes.append(await run_one(stub, make(next(counter))))

        await asyncio.gather(*(client() for _ in range(concurrency)))
        return outcomes


async def open_loop(target: str, rate: float, duration: float, make: Callable[[int], Spec],
                    every_second: Optional[Callable[[float], None]] = None) -> list[Outcome]:
    """Arrivals at a fixed rate (requests per second) for `duration` seconds, whatever the server does;
    `every_second(elapsed)` is called about once a second while they arrive."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        next_tick = 0.0
        for i in range(int(rate * duration)):
            delay = start + i / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(run_one(stub, make(i))))
            elapsed = loop.time() - start
            if every_second is not None and elapsed >= next_tick:
                every_second(elapsed)
                next_tick += 1.0
        return list(await asyncio.gather(*tasks))
