"""Results of one run: the benchmark's targets, a markdown table, PNG plots and the JSON they come from."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

TOP, MID = 64, 16


def _point(results: dict, system: str, concurrency: Optional[int] = None, mix: str = "chat", mode: str = "closed"):
    for p in results["points"]:
        if (p["system"], p["mix"], p["mode"]) == (system, mix, mode) and concurrency in (None, p["concurrency"]):
            return p
    return None


def _ratio_target(name: str, numerator: Optional[dict], denominator: Optional[dict], figure: str,
                  threshold: float, higher_is_better: bool = True) -> dict:
    """numerator/denominator of one figure (a key, or 'ttft_p50'-style nested key) against a threshold."""
    def value(point):
        if point is None:
            return None
        if figure in point:
            return point[figure]
        group, pct = figure.rsplit("_", 1)
        return point[group + "_s"][pct]

    a, b = value(numerator), value(denominator)
    if a is None or b is None or b == 0:
        return {"target": name, "value": None, "threshold": threshold, "met": None, "detail": "not measured in this run"}
    ratio = a / b
    met = ratio >= threshold if higher_is_better else ratio <= threshold
    cut = " (a point was cut at its time cap)" if numerator["truncated"] or denominator["truncated"] else ""
    return {"target": name, "value": ratio, "threshold": threshold, "met": met,
            "detail": f"{a:.4g} / {b:.4g}{cut}", "higher_is_better": higher_is_better}


def targets(results: dict) -> list[dict]:
    """The benchmark's targets, each a ratio of two figures measured in this run."""
    grpc = "attnserve-grpc"
    out = [
        _ratio_target(f"gRPC ≥ 0.85 × in-process engine, output tokens/s, c={TOP}",
                      _point(results, grpc, TOP), _point(results, "attnserve-inprocess", TOP), "output_tokens_per_s", 0.85),
    ]
    for c in (MID, TOP):
        out.append(_ratio_target(f"≥ 1.0 × genai Engine, output tokens/s, c={c}", _point(results, grpc, c),
                                 _point(results, "genai-engine", c), "output_tokens_per_s", 1.0))
        out.append(_ratio_target(f"TTFT p50 no worse than genai Engine (ratio ≤ 1), c={c}", _point(results, grpc, c),
                                 _point(results, "genai-engine", c), "ttft_p50", 1.0, higher_is_better=False))
    out.append(_ratio_target(f"≥ 8 × no-batching server (--kv-slots 1), output tokens/s, c={TOP}",
                             _point(results, grpc, TOP), _point(results, "attnserve-slots1", TOP), "output_tokens_per_s", 8.0))
    for c in (1, MID):
        out.append(_ratio_target(f"≥ 3 × PyTorch eager, output tokens/s, c={c}", _point(results, grpc, c),
                                 _point(results, "torch-eager", c), "output_tokens_per_s", 3.0))
    for mode in ("poisson", "closed"):
        p = _point(results, grpc, mix="long", mode=mode)
        out.append(_ratio_target(f"long-prompt mix ({mode}): ITL p99 ≤ 3 × ITL p50", p, p, "itl_p99", 3.0,
                                 higher_is_better=False) if p is None else _itl_spread(p, mode))
    c1 = _point(results, grpc, 1)
    floor = results.get("floor", {}).get("floor_s_per_token")
    if c1 and floor and c1["tpot_s"]["p50"]:
        tpot = c1["tpot_s"]["p50"]
        out.append({"target": "decode at c=1 within 1.5 × the bandwidth floor (TPOT p50 / floor)", "value": tpot / floor,
                    "threshold": 1.5, "met": tpot / floor <= 1.5, "higher_is_better": False,
                    "detail": f"{tpot * 1000:.3g} ms / {floor * 1000:.3g} ms"})
    return out


def _itl_spread(point: dict, mode: str) -> dict:
    p50, p99 = point["itl_s"]["p50"], point["itl_s"]["p99"]
    ratio = p99 / p50 if p50 else None
    return {"target": f"long-prompt mix ({mode}): ITL p99 ≤ 3 × ITL p50", "value": ratio, "threshold": 3.0,
            "met": None if ratio is None else ratio <= 3.0, "higher_is_better": False,
            "detail": f"{p99 * 1000:.3g} ms / {p50 * 1000:.3g} ms"}


# --------------------------------------------------------------------------- markdown


def _ms(x: Optional[float]) -> str:
    return "—" if x is None else f"{x * 1000:.1f}" if x < 10 else f"{x * 1000:.0f}"


def _num(x: Optional[float], digits: int = 3) -> str:
    return "—" if x is None else f"{x:.{digits}g}" if abs(x) < 10 ** digits else f"{x:.0f}"


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{x:.0%}"


def points_table(points: list[dict]) -> str:
    header = ("| system | mix | load | tok/s | req/s | TTFT p50/p90/p99 ms | ITL p50/p90/p99 ms | "
              "e2e p50/p90/p99 s | TPOT p50 ms | rows/step | occupancy | CPU busy | done/sent |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for p in points:
        load = f"c={p['concurrency']}" if p["mode"] == "closed" else f"{p['rate']:.2f}/s Poisson"
        t, i, e = p["ttft_s"], p["itl_s"], p["e2e_s"]
        steps = p.get("steps") or {}
        flags = (" (cut at cap)" if p["truncated"] else "") + (f", {p['requests_failed']} failed" if p["requests_failed"] else "")
        lines.append(
            f"| {p['system']} | {p['mix']} | {load} | {p['output_tokens_per_s']:.1f} | {p['requests_per_s']:.2f} | "
            f"{_ms(t['p50'])} / {_ms(t['p90'])} / {_ms(t['p99'])} | {_ms(i['p50'])} / {_ms(i['p90'])} / {_ms(i['p99'])} | "
            f"{_num(e['p50'])} / {_num(e['p90'])} / {_num(e['p99'])} | {_ms(p['tpot_s']['p50'])} | {_num(steps.get('rows_per_step'))} | "
            f"{_num(steps.get('occupancy'), 2)} | {_pct(p.get('cpu', {}).get('share_of_all_cores'))} | {p['requests_finished']}/{p['requests_sent']}{flags} |"
        )
    return "\n".join(lines)


def targets_table(items: list[dict]) -> str:
    lines = ["| target | measured | threshold | met | figures |", "|---|---|---|---|---|"]
    for t in items:
        met = {True: "met", False: "**missed**", None: "n/a"}[t["met"]]
        lines.append(f"| {t['target']} | {_num(t['value'])} | {t['threshold']:g} | {met} | {t['detail']} |")
    return "\n".join(lines)


def markdown(results: dict) -> str:
    m, bw, floor = results["machine"], results["bandwidth"], results["floor"]
    loads = [p["load_before"][0] for p in results["points"]] + [p["load_after"][0] for p in results["points"]]
    return "\n".join([
        f"### {results['name']}: {results['model']['name']} ({results['model']['n_layers']} layers, "
        f"d {results['model']['d_model']}, vocab {results['model']['vocab_size']}, {results['model']['dtype']})",
        "",
        f"`{results['command']}`, {results['created']}, git {results['git']['commit'][:10]}"
        f"{' (dirty)' if results['git']['dirty_files'] else ''}",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_bytes'] / 2**30:.0f} GiB; load average (1 min) "
        f"{results['load_at_start'][0]} at start, {min(loads, default=0):.2f} to {max(loads, default=0):.2f} "
        f"around the points, {results['load_at_end'][0]} at end.",
        f"Copy bandwidth (read + write): {bw['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s at start, "
        f"{results['bandwidth_at_end']['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s at end; weights read per token "
        f"{floor['weight_bytes_per_token'] / 1e6:.1f} MB, so the floor is {floor['floor_s_per_token'] * 1000:.2f} ms/token "
        f"({floor['floor_tokens_per_s']:.0f} tokens/s at batch 1).",
        f"attnserve: {results['attnserve_settings']}",
        "",
        points_table(results["points"]),
        "",
        targets_table(results["targets"]),
        "",
    ])


# --------------------------------------------------------------------------- plots


def plot(results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    closed = [p for p in results["points"] if p["mix"] == "chat" and p["mode"] == "closed"]
    systems = list(dict.fromkeys(p["system"] for p in closed))
    series = {s: sorted((p for p in closed if p["system"] == s), key=lambda p: p["concurrency"]) for s in systems}
    title = f"{results['name']} ({results['model']['name']}), chat mix, closed loop"
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s, pts in series.items():
        ax.plot([p["concurrency"] for p in pts], [p["output_tokens_per_s"] for p in pts], marker="o", label=s)
    ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel="output tokens/s", title=title)
    ax.set_xticks(sorted({p["concurrency"] for p in closed}), labels=[str(c) for c in sorted({p["concurrency"] for p in closed})])
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    paths.append(out_dir / f"{results['name']}-throughput.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, figure, label in ((axes[0], "ttft_s", "TTFT"), (axes[1], "itl_s", "inter-token latency")):
        for k, (s, pts) in enumerate(series.items()):
            color = f"C{k}"
            xs = [p["concurrency"] for p in pts]
            for pct, style in (("p50", "-"), ("p99", "--")):
                ys = [p[figure][pct] * 1000 if p[figure][pct] is not None else float("nan") for p in pts]
                ax.plot(xs, ys, style, marker="o", color=color, label=f"{s} {pct}")
        ax.set(xscale="log", yscale="log", xlabel="concurrency", ylabel=f"{label} (ms)", title=f"{label} p50 (solid), p99 (dashed)")
        ax.set_xticks(sorted({p["concurrency"] for p in closed}), labels=[str(c) for c in sorted({p["concurrency"] for p in closed})])
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    paths.append(out_dir / f"{results['name']}-latency.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def write(results: dict, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{results['name']}.json"
    json_path.write_text(json.dumps(results, indent=1) + "\n")
    md_path = out_dir / f"{results['name']}.md"
    md_path.write_text(markdown(results))
    return [json_path, md_path, *plot(results, out_dir)]
