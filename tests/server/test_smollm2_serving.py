"""A real pretrained model behind the real server (slow): chat works, batching is invisible."""
from __future__ import annotations

import concurrent.futures
import subprocess
import sys

import numpy as np
import pytest

from server.client import build_request

# The server and client processes inherit HF_HUB_OFFLINE=1 (tests/conftest.py): nothing here may ask the Hub.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("hf_offline")]


@pytest.fixture(scope="module")
def smollm2_server(smollm2_model_dir, server_class, hf_offline):
    server = server_class(smollm2_model_dir, "--kv-slots", "8", "--max-seq-len", "512", "--prefill-chunk-tokens", "128")
    yield server
    server.stop()


def test_client_cli_chat_answers_paris(smollm2_server):
    result = subprocess.run(
        [sys.executable, "-m", "server.client", "--target", smollm2_server.target, "--chat",
         "What is the capital of France?"], capture_output=True, text=True, timeout=300)
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    assert "Paris" in result.stdout
    assert "[eos;" in result.stderr  # the model ended its answer itself


def test_concurrent_requests_equal_each_alone(smollm2_server):
    stub = smollm2_server.stub()
    rng = np.random.default_rng(20261125)
    prompts = [rng.integers(100, 49000, n).tolist() for n in (1, 7, 30, 64, 120, 200, 260, 3)]
    max_new = [12, 20, 16, 8, 24, 10, 14, 18]
    sampling = [{} if i % 2 == 0 else dict(temperature=0.7, top_p=0.9, seed=i) for i in range(8)]

    def run(i):
        response = stub.Generate(build_request(prompt_token_ids=prompts[i], max_new_tokens=max_new[i], ignore_eos=True,
                                               **sampling[i]), timeout=300)
        return list(response.token_ids)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(run, range(8)))
    alone = [run(i) for i in range(8)]
    assert together == alone
