"""The start-up probe: a model dir's graph must reproduce PyTorch's export-time logits before the server serves it."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from server import contract, probe
from server.contract import ModelCard
from server.runner import ModelRunner
from tests.server.helpers import ROOT

PROBE_LOG = logging.getLogger("test-startup-probe")


# ---- pure comparison logic ----

def test_compare_reports_the_largest_difference_and_its_row():
    reference = np.zeros((3, 5), np.float32)
    logits = reference.copy()
    logits[2, 4] = 0.25
    logits[1, 0] = -0.5
    result = probe.compare(logits, reference)
    assert (result.max_abs_diff, result.worst_row, result.rows) == (0.5, 1, 3)
    assert not probe.out_of_bound(result, 0.5) and probe.out_of_bound(result, 0.49)


def test_nan_logits_are_out_of_any_bound():
    reference = np.ones((2, 4), np.float32)
    logits = reference.copy()
    logits[1, 2] = np.nan
    result = probe.compare(logits, reference)
    assert result.max_abs_diff == np.inf and result.worst_row == 1
    assert probe.out_of_bound(result, 1e30)


def test_argmax_agreement_counts_rows():
    reference = np.array([[0, 1, 0], [1, 0, 0]], np.float32)
    logits = np.array([[0, 1, 0], [0, 0, 1]], np.float32)
    assert probe.compare(logits, reference).argmax_agreement == 1


def test_shapes_that_disagree_are_a_probe_error():
    with pytest.raises(probe.ProbeError, match=r"\[2, 3\].*\[2, 4\]"):
        probe.compare(np.zeros((2, 3)), np.zeros((2, 4)))


def test_cpu_flags_are_read_from_cpuinfo_text():
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 fma avx512f avx512_vnni xsave\nprocessor\t: 1\n"
    assert probe.parse_cpu_flags(text) == ["avx2", "fma", "avx512f", "avx512_vnni"]
    assert probe.parse_cpu_flags("no flags line\n") == []
    assert probe.format_flags([]) == "unknown"


# ---- export: every fresh model dir carries its probe ----

@pytest.mark.parametrize("dir_fixture", ["test_model_dir", "test_fp16_model_dir"])
def test_export_stores_a_probe_that_passed_on_the_exporting_machine(dir_fixture, request):
    model_dir = request.getfixturevalue(dir_fixture)
    card = ModelCard.load(model_dir)
    field = card.probe
    assert field is not None and field["file"] == contract.PROBE_FILE
    reference = np.load(model_dir / contract.PROBE_FILE)
    assert reference.shape == (len(field["decode_ids"]) + 1, card.vocab_size) and reference.dtype == np.float32
    assert field["bound"] >= card.verification["bound"]
    assert field["export"]["max_abs_diff"] <= field["bound"]
    assert isinstance(field["export"]["cpu_flags"], list)
    # The decode tokens are PyTorch's greedy choices: each is the argmax of the row before it.
    assert field["decode_ids"] == [int(row.argmax()) for row in reference[:-1]]


@pytest.mark.parametrize("dir_fixture,call_plan", [("test_model_dir", "mixed"), ("test_model_dir", "uniform"),
                                                   ("test_fp16_model_dir", "mixed")])
def test_probe_passes_through_the_serving_runner(dir_fixture, call_plan, request):
    model_dir = request.getfixturevalue(dir_fixture)
    card = ModelCard.load(model_dir)
    runner = ModelRunner(model_dir, card, kv_slots=2, capacity=64, device="cpu", call_plan=call_plan)
    result, seconds = probe.run_probe(runner, card, model_dir)
    assert not probe.out_of_bound(result, card.probe["bound"]), probe.describe(result, card.probe["bound"])
    assert seconds < 1.0


def test_a_missing_reference_file_is_a_probe_error(test_model_dir, tmp_path):
    model_dir = shutil.copytree(test_model_dir, tmp_path / "dir")
    (model_dir / contract.PROBE_FILE).unlink()
    card = ModelCard.load(model_dir)
    runner = ModelRunner(model_dir, card, kv_slots=1, capacity=64, device="cpu")
    with pytest.raises(probe.ProbeError, match="re-export"):
        probe.check_at_startup(runner, card, model_dir, 64, PROBE_LOG)


# ---- the server process ----

def test_the_test_server_ran_the_probe_before_it_reported_ready(test_server):
    log = "".join(test_server.log)
    assert "start-up probe passed" in log and "bound" in log and "CPU flags here" in log, log
    assert log.index("start-up probe passed") < log.index("attnserve ready")


def perturb_largest_initializer(model_dir: Path, seed: int = 0, relative: float = 0.05) -> str:
    """Scale each value of the largest external float32 initializer by (1 + relative * N(0, 1)), seeded; its name."""
    graph = onnx.load(str(model_dir / contract.MODEL_FILE), load_external_data=False).graph
    external = []
    for tensor in graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL and tensor.data_type == onnx.TensorProto.FLOAT:
            info = {entry.key: entry.value for entry in tensor.external_data}
            external.append((int(info["length"]), int(info.get("offset", 0)), info["location"], tensor.name))
    length, offset, location, name = max(external)
    with open(model_dir / location, "r+b") as data:
        data.seek(offset)
        values = np.frombuffer(data.read(length), np.float32).copy()
        values *= 1 + relative * np.random.default_rng(seed).standard_normal(values.size).astype(np.float32)
        data.seek(offset)
        data.write(values.tobytes())
    return name


def run_server(model_dir: Path) -> subprocess.CompletedProcess:
    """A server that is expected to exit by itself (a refused model dir)."""
    return subprocess.run(
        [sys.executable, "-m", "server", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
         "--metrics-port", "-1", "--http-port", "0", "--kv-slots", "2", "--max-seq-len", "128"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )


def test_a_dir_whose_weights_were_altered_is_refused_with_one_error_line(test_model_dir, tmp_path):
    model_dir = shutil.copytree(test_model_dir, tmp_path / "altered")
    perturb_largest_initializer(model_dir)
    result = run_server(model_dir)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Traceback" not in output and "attnserve ready" not in output, output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0], result.stderr
    bound = ModelCard.load(model_dir).probe["bound"]
    assert "start-up probe failed" in errors[0] and "max |logit diff|" in errors[0], errors[0]
    assert f"bound {bound:g}" in errors[0], errors[0]


def test_a_dir_exported_before_the_probe_serves_with_a_warning(test_model_dir, tmp_path, server_process):
    model_dir = shutil.copytree(test_model_dir, tmp_path / "old")
    card = json.loads((model_dir / contract.CARD_FILE).read_text())
    del card["probe"]  # as dirs exported before the field existed
    (model_dir / contract.CARD_FILE).write_text(json.dumps(card))
    (model_dir / contract.PROBE_FILE).unlink()
    server = server_process(model_dir, "--kv-slots", "2", "--max-seq-len", "128")
    log = "".join(server.log)
    assert "has no start-up probe" in log and "re-export" in log, log
