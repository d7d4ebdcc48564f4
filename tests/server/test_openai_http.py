"""The OpenAI-compatible HTTP API: real server processes, driven by the official `openai` SDK.

What it answers must match the gRPC API (same tokens, text and usage for the
same prompt), its errors must raise the SDK's own exception types, and a
client that leaves a stream must free its KV slot.
"""
from __future__ import annotations

import json
import shutil
import socket
import ssl
import urllib.error
import urllib.request

import openai
import pytest

from attnserve.v1 import generation_pb2 as pb
from server.client import build_request
from server.errors import InvalidRequestError, QueueFullError, ServerDrainingError
from server.http_errors import ModelNotFoundError, classify, error_body, translate
from server.convert import request_fields
from server.openai_convert import to_request_fields
from tests.server.helpers import InProcessServer, free_port, queue_held_full, wait_until

FLAGS = ("--kv-slots", "2", "--max-seq-len", "1024", "--max-request-bytes", "65536",
         "--max-new-tokens-limit", "1000", "--default-max-new-tokens", "16")
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m.role }}> {{ m.content }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant> {% endif %}")
PROMPT_IDS = [5, 17, 42, 9, 88, 3, 21]



def sdk(server, api_key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key=api_key, max_retries=0,
                         timeout=60)


def post(server, path: str, data: bytes, headers: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a raw POST, for what the SDK cannot send."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", data=data, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


@pytest.fixture(scope="module")
def plain(test_model_dir, server_class):
    """The test model (no chat template) with the HTTP API on."""
    server = server_class(test_model_dir, *FLAGS, "--http-port", str(free_port()))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def chat(test_model_dir, server_class, tmp_path_factory):
    """A copy of the test model whose card has a chat template, served under another name."""
    model_dir = tmp_path_factory.mktemp("chat-model") / "model"
    shutil.copytree(test_model_dir, model_dir)
    card = model_dir / "attnserve.json"
    card.write_text(json.dumps(json.loads(card.read_text()) | {"chat_template": CHAT_TEMPLATE}))
    server = server_class(model_dir, *FLAGS, "--http-port", str(free_port()), "--served-model-name", "chatty")
    yield server
    server.stop()


# ---- the pure conversion -------------------------------------------------------------------


def test_validation_errors_name_the_openai_fields():
    error = translate(InvalidRequestError("max_new_tokens", "the prompt's 9 tokens plus max_new_tokens 2000 exceed"),
                      {"max_new_tokens": "max_tokens"})
    assert error.field == "max_tokens" and str(error) == "max_tokens: the prompt's 9 tokens plus max_tokens 2000 exceed"
    assert translate(InvalidRequestError("sampling.temperature", "must be >= 0")).field == "temperature"
    assert translate(InvalidRequestError("stop[1]", "is empty")).field == "stop"


def test_exceptions_map_to_openai_statuses_in_one_place():
    assert classify(InvalidRequestError("n", "x"))[:3] == (400, "invalid_request_error", None)
    assert classify(ModelNotFoundError("a", "b"))[:3] == (404, "invalid_request_error", "model_not_found")
    assert classify(QueueFullError("full"))[0] == 429
    assert error_body(QueueFullError("full"))[1]["Retry-After"] == "1"
    assert classify(ServerDrainingError("draining"))[0] == 503
    status, _, _, message = classify(ValueError("secret detail"))
    assert status == 500 and "secret" not in message and "ValueError" in message


def test_a_body_becomes_the_fields_the_same_grpc_request_does():
    fields, options = to_request_fields(
        {"model": "m", "prompt": PROMPT_IDS, "max_tokens": 5, "temperature": 0, "seed": 3, "stop": "x",
         "top_k": -1, "unknown_field": [1, 2]}, chat=False, served_name="m")
    assert fields == request_fields(build_request(prompt_token_ids=PROMPT_IDS, max_new_tokens=5, temperature=0.0,
                                                  seed=3, stop=["x"]))
    assert not options.stream and options.logprobs is None
    with pytest.raises(InvalidRequestError, match="^max_tokens: must be an integer"):
        to_request_fields({"prompt": "a", "max_tokens": "5"}, chat=False, served_name="m")
    with pytest.raises(InvalidRequestError, match="^seed: .* 64-bit"):
        to_request_fields({"prompt": "a", "seed": 2 ** 64}, chat=False, served_name="m")


def test_http_port_and_served_name_come_from_flags_or_the_environment():
    from server.config import parse_config

    assert parse_config(["--model", "m"], environ={}).http_port == 8000
    assert parse_config(["--model", "m"], environ={"ATTNSERVE_HTTP_PORT": "0"}).http_port == 0
    assert parse_config(["--model", "m", "--served-model-name", "x"], environ={}).served_model_name == "x"
    with pytest.raises(ValueError, match="--http-port must be in"):
        parse_config(["--model", "m", "--http-port", "70000"], environ={})


# ---- completions ---------------------------------------------------------------------------


def test_greedy_completion_equals_the_grpc_answer_for_the_same_token_ids(plain):
    grpc_answer = plain.stub().Generate(build_request(prompt_token_ids=PROMPT_IDS, max_new_tokens=12), timeout=30)
    answer = sdk(plain).completions.create(model="test", prompt=PROMPT_IDS, max_tokens=12, temperature=0)
    assert answer.object == "text_completion" and answer.model == "test"
    assert answer.choices[0].text == grpc_answer.text
    assert answer.usage.prompt_tokens == grpc_answer.usage.prompt_tokens == len(PROMPT_IDS)
    assert answer.usage.completion_tokens == grpc_answer.usage.completion_tokens
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    expected_reason = "length" if grpc_answer.usage.completion_tokens == 12 else "stop"
    assert answer.choices[0].finish_reason == expected_reason


def test_text_prompt_and_ignore_eos_give_exactly_max_tokens(plain):
    answer = sdk(plain).completions.create(model="test", prompt="hello there", max_tokens=20, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert answer.usage.completion_tokens == 20 and answer.choices[0].finish_reason == "length"


def test_streamed_text_joins_to_the_unary_text_and_ends_with_usage(plain):
    client = sdk(plain)
    whole = client.completions.create(model="test", prompt=PROMPT_IDS, max_tokens=24, temperature=0,
                                      extra_body={"ignore_eos": True})
    chunks = list(client.completions.create(model="test", prompt=PROMPT_IDS, max_tokens=24, temperature=0,
                                            extra_body={"ignore_eos": True}, stream=True,
                                            stream_options={"include_usage": True}))
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    assert chunks[-1].usage is not None and not chunks[-1].choices
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 24


def test_seeded_sampling_repeats(plain):
    client = sdk(plain)

    def sample():
        return client.completions.create(model="test", prompt=PROMPT_IDS, max_tokens=16, temperature=1.0,
                                         seed=1234, extra_body={"ignore_eos": True}).choices[0].text
    assert sample() == sample()


def test_completion_logprobs(plain):
    answer = sdk(plain).completions.create(model="test", prompt=PROMPT_IDS, max_tokens=4, temperature=0,
                                           logprobs=3, extra_body={"ignore_eos": True})
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 4
    assert all(len(top) == 3 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == answer.choices[0].text


def test_stop_string_ends_with_stop(plain):
    client = sdk(plain)
    text = client.completions.create(model="test", prompt=PROMPT_IDS, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2, text
    answer = client.completions.create(model="test", prompt=PROMPT_IDS, max_tokens=40, temperature=0, stop=[stop],
                                       extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].text == text[:text.index(stop)]


# ---- errors --------------------------------------------------------------------------------


def plain_vocab_size(server) -> int:
    return server.stub().GetModelInfo(pb.GetModelInfoRequest(), timeout=10).vocab_size



def test_bad_fields_raise_bad_request_naming_the_openai_field(plain):
    client = sdk(plain)
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="test", prompt="hi", temperature=-1)
    assert bad.value.param == "temperature" and "temperature" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="test", prompt="hi", max_tokens=5000)
    assert bad.value.param == "max_tokens" and "max_new_tokens" not in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="test", prompt="hi", n=2)
    assert bad.value.param == "n"
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="test", prompt="hi", presence_penalty=0.5)
    assert bad.value.param == "presence_penalty" and "not supported" in bad.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="test", prompt=[plain_vocab_size(plain)])
    assert bad.value.param == "prompt" and "vocabulary" in bad.value.message
    assert client.completions.create(model="test", prompt="hi", max_tokens=2, presence_penalty=0,
                                     frequency_penalty=0).usage.completion_tokens <= 2


def test_a_wrong_model_is_not_found(plain):
    with pytest.raises(openai.NotFoundError) as missing:
        sdk(plain).completions.create(model="gpt-4", prompt="hi")
    assert missing.value.code == "model_not_found"


def test_chat_without_a_template_is_a_bad_request(plain):
    with pytest.raises(openai.BadRequestError) as bad:
        sdk(plain).chat.completions.create(model="test", messages=[{"role": "user", "content": "hi"}])
    assert bad.value.param == "messages" and "chat template" in bad.value.message


def test_malformed_json_is_400_and_an_oversized_body_413(plain):
    status, _, body = post(plain, "/v1/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == "body"
    status, _, body = post(plain, "/v1/completions", json.dumps({"model": "test", "prompt": "x" * 70000}).encode())
    assert status == 413 and "max-request-bytes" in body["error"]["message"]


def test_a_client_timeout_ends_the_request_with_504(plain):
    # 983 tokens take at least 0.2 s on the test model (0.2 ms per decode step at the fastest measured),
    # ten times the 20 ms deadline: the engine ends the request at its deadline, not at its length.
    long = {"model": "test", "prompt": PROMPT_IDS, "max_tokens": 1000 - len(PROMPT_IDS), "ignore_eos": True}
    status, _, body = post(plain, "/v1/completions", json.dumps({**long, "timeout": 0.02}).encode())
    assert status == 504 and body["error"]["code"] == "timeout" and "deadline" in body["error"]["message"]
    status, _, body = post(plain, "/v1/completions", json.dumps(long).encode(), {"X-Request-Timeout": "0.02"})
    assert status == 504 and body["error"]["type"] == "server_error"
    with pytest.raises(openai.InternalServerError) as timed_out:  # the SDK's type for a 5xx
        sdk(plain).completions.create(model="test", prompt=PROMPT_IDS, max_tokens=1000 - len(PROMPT_IDS),
                                      extra_body={"ignore_eos": True, "timeout": 0.02})
    assert timed_out.value.status_code == 504
    status, _, body = post(plain, "/v1/completions", json.dumps({**long, "timeout": -1}).encode())
    assert status == 400 and body["error"]["param"] == "timeout"
    status, _, body = post(plain, "/v1/completions", json.dumps(long).encode(), {"X-Request-Timeout": "soon"})
    assert status == 400 and body["error"]["param"] == "X-Request-Timeout"
    wait_until(lambda: plain.metric("attnserve_kv_slots_in_use") == 0, 30, "a timed-out request kept its KV slot")


def test_models_health_and_metrics(plain):
    models = sdk(plain).models.list()
    assert [m.id for m in models.data] == ["test"]
    with urllib.request.urlopen(f"http://127.0.0.1:{plain.http_port}/health", timeout=10) as response:
        assert response.status == 200
    assert plain.metric("attnserve_http_requests_total", 'code="200",model="test",route="/v1/completions"') >= 1
    assert plain.metric("attnserve_http_requests_total", 'code="200",model="test",route="/v1/models"') >= 1


def test_tokenize_and_detokenize_answer_as_the_grpc_tokenize_does(plain, chat):
    grpc_ids = list(plain.stub().Tokenize(pb.TokenizeRequest(prompt="hello there"), timeout=30).token_ids)
    status, _, body = post(plain, "/tokenize", json.dumps({"model": "test", "prompt": "hello there"}).encode())
    assert status == 200 and body["tokens"] == grpc_ids and body["count"] == len(grpc_ids)
    assert body["max_model_len"] == 1024
    status, _, body = post(plain, "/detokenize", json.dumps({"tokens": grpc_ids}).encode())
    assert status == 200 and body["prompt"] == "hello there"
    messages = [{"role": "user", "content": "hi"}]
    grpc_chat = chat.stub().Tokenize(pb.TokenizeRequest(messages=pb.ChatMessages(
        messages=[pb.ChatMessage(role="user", content="hi")])), timeout=30)
    status, _, body = post(chat, "/tokenize", json.dumps({"messages": messages}).encode())
    assert status == 200 and body["tokens"] == list(grpc_chat.token_ids)
    status, _, body = post(plain, "/detokenize", json.dumps({"tokens": [1, 10 ** 6]}).encode())
    assert status == 400 and body["error"]["param"] == "tokens" and "vocabulary" in body["error"]["message"]
    status, _, body = post(plain, "/tokenize", json.dumps({"prompt": "x", "model": "other"}).encode())
    assert status == 404 and body["error"]["code"] == "model_not_found"


def test_requests_are_counted_under_the_protocol_they_came_through(plain):
    def generated(protocol):
        return plain.metric("attnserve_generated_tokens_total", f'protocol="{protocol}"')

    http_before, grpc_before = generated("http"), generated("grpc")
    sdk(plain).completions.create(model="test", prompt=PROMPT_IDS, max_tokens=5, extra_body={"ignore_eos": True})
    plain.stub().Generate(build_request(prompt_token_ids=PROMPT_IDS, max_new_tokens=3, ignore_eos=True), timeout=30)
    # The engine reports a request just after its client has the answer.
    wait_until(lambda: (generated("http") - http_before, generated("grpc") - grpc_before) == (5, 3), 10,
               lambda: f"generated tokens by protocol moved by {generated('http') - http_before} (http) and "
                       f"{generated('grpc') - grpc_before} (grpc), not 5 and 3")


def test_a_closed_stream_cancels_its_request_and_frees_its_slot(plain):
    cancelled_before = plain.metric("attnserve_requests_finished_total", 'finish_reason="cancelled"')
    stream = sdk(plain).completions.create(model="test", prompt=PROMPT_IDS, max_tokens=1000 - len(PROMPT_IDS),
                                           temperature=0, logprobs=20, stream=True,
                                           extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(3), stream):
        pass
    stream.close()
    wait_until(lambda: plain.metric("attnserve_requests_finished_total", 'finish_reason="cancelled"')
               > cancelled_before, 30, "the closed stream's request was not cancelled")
    wait_until(lambda: plain.metric("attnserve_kv_slots_in_use") == 0, 30, "the closed stream kept its KV slot")


# ---- chat ----------------------------------------------------------------------------------


def test_chat_renders_the_template_like_grpc_and_streams_the_same_text(chat):
    client = sdk(chat)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    grpc_answer = chat.stub().Generate(build_request(messages=[(m["role"], m["content"]) for m in messages],
                                                     max_new_tokens=10, ignore_eos=True), timeout=30)
    answer = client.chat.completions.create(model="chatty", messages=messages, max_completion_tokens=10,
                                            temperature=0, extra_body={"ignore_eos": True})
    assert answer.object == "chat.completion" and answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == grpc_answer.text
    assert answer.usage.prompt_tokens == grpc_answer.usage.prompt_tokens
    assert answer.usage.completion_tokens == 10 and answer.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(model="chatty", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == grpc_answer.text
    assert chunks[-1].usage.prompt_tokens == grpc_answer.usage.prompt_tokens


def test_chat_logprobs_and_the_served_name(chat):
    client = sdk(chat)
    assert [m.id for m in client.models.list().data] == ["chatty"]
    answer = client.chat.completions.create(model="chatty", messages=[{"role": "user", "content": "hi"}],
                                            max_tokens=3, temperature=0, logprobs=True, top_logprobs=2,
                                            extra_body={"ignore_eos": True})
    content = answer.choices[0].logprobs.content
    assert len(content) == 3 and all(len(entry.top_logprobs) == 2 for entry in content)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="test", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="chatty", messages=[{"role": "user", "content": "hi"}],
                                       logprobs=True, top_logprobs=50)
    assert bad.value.param == "top_logprobs"


# ---- API keys ------------------------------------------------------------------------------


def test_api_keys_guard_v1_but_not_health(test_model_dir, server_class):
    keyed = server_class(test_model_dir, *FLAGS, "--http-port", str(free_port()), env={"ATTNSERVE_API_KEYS": "sekret"})
    try:
        with pytest.raises(openai.AuthenticationError) as refused:
            sdk(keyed, api_key="wrong").models.list()
        assert refused.value.code == "invalid_api_key"
        status, _, body = post(keyed, "/v1/completions", b"{not json")  # refused before the body is parsed
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert sdk(keyed, api_key="sekret").completions.create(model="test", prompt="hi", max_tokens=2).usage
        with urllib.request.urlopen(f"http://127.0.0.1:{keyed.http_port}/health", timeout=10) as response:
            assert response.status == 200
        assert keyed.metric("attnserve_api_key_checks_total", 'outcome="wrong"') >= 1
        assert keyed.metric("attnserve_api_key_checks_total", 'outcome="missing"') >= 1
    finally:
        keyed.stop()


def get(server, path: str, headers: dict | None = None) -> tuple[int, dict, str]:
    request = urllib.request.Request(f"http://127.0.0.1:{server.http_port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


def test_metrics_on_the_http_port_are_the_registry_under_the_metrics_ports_key_rule(test_model_dir):
    # metrics_port=-1 (InProcessServer's): the HTTP port is the only place to scrape, as a router would.
    for needs_key in ("off", "on"):
        server = InProcessServer(test_model_dir, kv_slots=1, max_seq_len=256, http_port=free_port(),
                                 api_keys="sekret", metrics_needs_api_key=needs_key)
        try:
            status, headers, text = get(server.server, "/metrics")
            if needs_key == "on":
                assert status == 401 and json.loads(text)["error"]["code"] == "invalid_api_key"
                assert headers["WWW-Authenticate"].startswith("Bearer")
                status, headers, text = get(server.server, "/metrics", {"Authorization": "Bearer sekret"})
            assert status == 200 and headers["Content-Type"].startswith("text/plain; version=")
            assert "attnserve_kv_cache_usage_ratio{" in text and "_created" not in text
            families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")}
            assert families == {line.split()[2] for line in server.metrics_text().splitlines()
                                if line.startswith("# TYPE")}
            assert get(server.server, "/v1/models")[0] == 401  # /v1 keeps needing its key either way
        finally:
            server.stop()


# ---- health follows the gRPC health status -------------------------------------------------


def test_health_is_503_once_the_server_stops_serving(test_model_dir):
    server = InProcessServer(test_model_dir, kv_slots=1, max_seq_len=256, http_port=free_port())
    url = f"http://127.0.0.1:{server.server.http_port}/health"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
        server.run(server.server.set_serving(False))  # what draining and a broken engine do first
        with pytest.raises(urllib.error.HTTPError) as unavailable:
            urllib.request.urlopen(url, timeout=10)
        assert unavailable.value.code == 503
    finally:
        server.stop()
    with pytest.raises(urllib.error.URLError):  # stopping the server closed the HTTP site too
        urllib.request.urlopen(url, timeout=10)


def test_a_busy_http_port_fails_the_start_with_one_line(test_model_dir, server_class):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(RuntimeError, match=f"cannot serve the HTTP API on 127.0.0.1:{port}"):
            server_class(test_model_dir, *FLAGS, "--http-port", str(port), startup_timeout=60)


def test_with_tls_the_http_api_speaks_tls_only(test_model_dir, server_class, tmp_path):
    import trustme

    ca = trustme.CA()
    pair = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    pair.cert_chain_pems[0].write_to_path(str(cert))
    pair.private_key_pem.write_to_path(str(key))
    server = server_class(test_model_dir, *FLAGS, "--http-port", str(free_port()),
                          "--tls-cert-file", str(cert), "--tls-key-file", str(key))
    try:
        context = ssl.create_default_context()
        ca.configure_trust(context)
        client = openai.OpenAI(base_url=f"https://localhost:{server.http_port}/v1", api_key="unused", max_retries=0,
                               timeout=60, http_client=openai.DefaultHttpxClient(verify=context))
        assert client.completions.create(model="test", prompt="hi", max_tokens=2).usage.prompt_tokens > 0
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}/health", timeout=10)
    finally:
        server.stop()


def test_a_full_queue_is_429_with_retry_after(test_model_dir):
    server = InProcessServer(test_model_dir, kv_slots=1, max_queued_requests=1, max_seq_len=1024,
                             http_port=free_port())
    try:
        with queue_held_full(server, PROMPT_IDS):
            status, headers, body = post(server.server, "/v1/completions",
                                         json.dumps({"prompt": "hi", "max_tokens": 2}).encode())
            assert status == 429 and headers["Retry-After"] == "1"
            assert body["error"]["type"] == "rate_limit_error" and "max-queued-requests" in body["error"]["message"]
            assert server.metric("attnserve_requests_rejected_total", 'protocol="http",reason="queue_full"') == 1
            assert server.metric("attnserve_requests_rejected_total", 'protocol="grpc",reason="queue_full"') == 0
    finally:
        server.stop()
