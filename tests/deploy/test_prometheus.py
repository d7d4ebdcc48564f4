"""A real Prometheus scrapes a live attnserve under a short load, with the PrometheusRule's rules
loaded; then every query of the dashboard, every recording and alert rule and the
prometheus-adapter rule must return data through Prometheus' HTTP API.

    attnserve (test model, port 0) ◄── scrape every 1 s ── prometheus (127.0.0.1, tmp storage, rules)
        ▲ a few dozen requests: OK, INVALID_ARGUMENT, cancelled          ▲ /api/v1/query per expression
        and Embed and Classify calls to a test encoder and image classifier served beside the decoder

A panel that would show "No data" fails here: an empty result, or only NaN (a quantile of no
observations), is a failure. Template variables get what Grafana would put there.
"""
from __future__ import annotations

import concurrent.futures
import json
import math
import re
import subprocess
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field

import grpc
import pytest
import yaml

from server.contract import ModelCard
from attnserve.v1 import generation_pb2 as pb
from server.client import build_request
from tests.deploy.helpers import DEPLOY, dashboard_targets, load_dashboard, load_rules_spec, run, tool
from tests.server.helpers import ServerProcess, free_port

pytestmark = pytest.mark.slow

SCRAPE_LABELS = {"namespace": "attnserve-test", "pod": "attnserve-test-0"}  # what a ServiceMonitor target carries
RATE_INTERVAL = "1m"  # Grafana's $__rate_interval for a 15 s scrape: max(4 x 15 s, interval + 15 s)
GENERATION_CALLS_OK, INVALID_CALLS, CANCELLED_STREAMS = 24, 4, 3
EMBED_CALLS, CLASSIFY_CALLS = 6, 3


class Prometheus:
    """The Debian `prometheus` binary on 127.0.0.1 with its own config and storage."""

    def __init__(self, workdir, metrics_port: int, rule_file):
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rule_file)],
            "scrape_configs": [{"job_name": "attnserve", "static_configs": [
                {"targets": [f"127.0.0.1:{metrics_port}"], "labels": SCRAPE_LABELS}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = open(workdir / "prometheus.log", "w")
        self.process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address=127.0.0.1:{self.port}",
             "--log.level=warn"], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("prometheus did not start: " + (workdir / "prometheus.log").read_text()[-2000:])
            time.sleep(0.2)

    def _ready(self) -> bool:
        try:
            return urllib.request.urlopen(self.url + "/-/ready", timeout=2).status == 200
        except OSError:
            return False

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params, doseq=True)}"
        reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
        assert reply["status"] == "success", reply
        return reply["data"]

    def query(self, expr: str) -> list[dict]:
        return self.api("query", query=expr)["result"]

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_until(self, what: str, condition, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"prometheus: {what} not within {timeout} s"
            time.sleep(0.25)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.log.close()



@dataclass
class Load:
    ok_usages: list = field(default_factory=list)
    codes: dict = field(default_factory=dict)  # (method, code) -> count, as the clients saw them
    prompt_tokens_submitted: int = 0  # prompts that reached the engine (OK and cancelled)


def send_load(server: ServerProcess, encoder: str, classifier: str) -> Load:
    """Three waves a second apart, so the scrapes see the counters move: bounded in count and time."""
    stub = server.stub()
    load = Load()

    def count(method, code):
        load.codes[(method, code)] = load.codes.get((method, code), 0) + 1

    def unary(i):
        prompt = [5 + i % 50] * (4 + 3 * i)
        response = stub.Generate(build_request(prompt_token_ids=prompt, max_new_tokens=4 + i % 12, ignore_eos=True), timeout=60)
        return "Generate", response.usage, len(prompt)

    def streamed(i):
        prompt = [9 + i % 40] * (6 + 2 * i)
        *_, last = stub.GenerateStream(build_request(prompt_token_ids=prompt, max_new_tokens=6 + i % 9, ignore_eos=True), timeout=60)
        return "GenerateStream", last.usage, len(prompt)

    def invalid(i):
        with pytest.raises(grpc.RpcError) as info:
            stub.Generate(build_request(prompt_token_ids=[5, 6], max_new_tokens=5000 + i), timeout=10)
        return "Generate", info.value.code(), 0

    def embed(i):
        texts = ["word"] * (1 + i % 3) if i < EMBED_CALLS - 1 else ["word " * 400]  # the last: too long, refused
        try:
            stub.Embed(pb.EmbedRequest(model=encoder, texts=texts), timeout=30)
            return "Embed", "OK", 0
        except grpc.RpcError as error:
            return "Embed", error.code(), 0

    def classify(i):
        image = pb.Image(raw=pb.RawImage(data=bytes([i * 40]) * 64, height=8, width=8, channels=1))
        stub.Classify(pb.ClassifyRequest(model=classifier, images=[image] * (1 + i)), timeout=30)
        return "Classify", "OK", 0

    def cancelled(i):
        prompt = [11] * (8 + i)
        call = stub.GenerateStream(build_request(prompt_token_ids=prompt, max_new_tokens=400, ignore_eos=True), timeout=60)
        next(call)
        call.cancel()
        return "GenerateStream", grpc.StatusCode.CANCELLED, len(prompt)

    calls = [(unary, i) for i in range(16)] + [(streamed, i) for i in range(8)]
    calls += [(invalid, i) for i in range(INVALID_CALLS)] + [(cancelled, i) for i in range(CANCELLED_STREAMS)]
    calls += [(embed, i) for i in range(EMBED_CALLS)] + [(classify, i) for i in range(CLASSIFY_CALLS)]
    waves = [calls[i::3] for i in range(3)]
    stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        for wave in waves:
            for method, outcome, prompt_tokens in pool.map(lambda call: call[0](call[1]), wave):
                if isinstance(outcome, grpc.StatusCode):
                    count(method, outcome.name)
                elif outcome == "OK":  # an Embed or Classify call
                    count(method, outcome)
                else:
                    count(method, "OK")
                    load.ok_usages.append(outcome)
                load.prompt_tokens_submitted += prompt_tokens
            time.sleep(1.0)
    return load


@dataclass
class Observed:
    prometheus: Prometheus
    server: ServerProcess
    load: Load
    model: str
    models: list[str]  # every model served: the decoder, the encoder, the image classifier


@pytest.fixture(scope="module")
def observed(test_model_dir, test_encoder_dir, test_classifier_dir, rules_dir, tmp_path_factory):
    encoder, classifier = (json.loads((d / "attnserve.json").read_text())["name"] for d in (test_encoder_dir, test_classifier_dir))
    server = ServerProcess(test_model_dir, "--model", str(test_encoder_dir), "--model", str(test_classifier_dir),
                           "--kv-slots", "4", "--max-seq-len", "1024",
                           "--prefill-chunk-tokens", "64", "--max-queued-requests", "32")
    prometheus = None
    try:
        prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), server.metrics_port,
                                rules_dir / "attnserve.rules.yaml")
        prometheus.wait_until("a first scrape", lambda: prometheus.value('up{job="attnserve"}') == 1)
        load = send_load(server, encoder, classifier)
        model = ModelCard.load(test_model_dir).name
        finished = server.wait_for_metric("attnserve_requests_finished_total", GENERATION_CALLS_OK + CANCELLED_STREAMS)
        handled = server.metric("attnserve_grpc_server_handled_total", 'grpc_service="attnserve.v1.Generation"')
        prometheus.wait_until("the last scrape of the load", lambda: (
            prometheus.value("sum(attnserve_requests_finished_total)") == finished
            and prometheus.value('sum(attnserve_grpc_server_handled_total{grpc_service="attnserve.v1.Generation"})') == handled))
        recorded = [r["record"] for g in load_rules_spec()["groups"] for r in g["rules"] if "record" in r]
        prometheus.wait_until("every recording rule's series",
                              lambda: all(prometheus.query(name) for name in recorded))
        yield Observed(prometheus, server, load, model, [model, encoder, classifier])
    finally:
        if prometheus is not None:
            prometheus.stop()
        server.stop()


def grafana_substitute(expr: str, models: list[str]) -> str:
    """What Grafana sends for the dashboard's variables: the selected models (every one), its $__rate_interval."""
    # Each name regex-escaped, its backslashes doubled inside the PromQL string (`test\\-encoder`), as Grafana does.
    selected = "(" + "|".join(re.escape(model).replace("\\", "\\\\") for model in models) + ")"
    expr = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$model", selected)
    assert "$" not in expr, f"an unsubstituted variable in {expr}"
    return expr


def with_bool(expr: str) -> str:
    """The expression with `bool` after each comparison operator, so it returns 0/1 per series instead
    of filtering: an alert that is quiet must still evaluate over real series, not over nothing."""
    out, nesting, quote, i = [], 0, None, 0
    while i < len(expr):
        char = expr[i]
        if quote:
            quote = None if char == quote and expr[i - 1] != "\\" else quote
        elif char in "\"'":
            quote = char
        elif char in "{[":
            nesting += 1
        elif char in "}]":
            nesting -= 1
        elif nesting == 0:
            match = re.match(r"(==|!=|>=|<=|>|<)(?!\s*bool\b)", expr[i:])
            if match:
                out.append(match.group(1) + " bool")
                i += len(match.group(1))
                continue
        out.append(char)
        i += 1
    return "".join(out)


def has_data(result: list[dict]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def test_prometheus_scrapes_attnserve_and_evaluates_every_rule_without_error(observed):
    (target,) = observed.prometheus.api("targets")["activeTargets"]
    assert target["health"] == "up", target
    groups = observed.prometheus.api("rules")["groups"]
    assert {g["name"] for g in groups} == {g["name"] for g in load_rules_spec()["groups"]}
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok" and not rule.get("lastError"), rule


def test_every_dashboard_query_returns_data(observed):
    targets = dashboard_targets(load_dashboard())
    empty = []
    for title, target in targets:
        expr = grafana_substitute(target["expr"], observed.models)
        if not has_data(observed.prometheus.query(expr)):
            empty.append(f"{title}: {expr}")
    print(f"{len(targets)} dashboard queries, {len(targets) - len(empty)} with data")
    assert not empty, "panels with no data:\n" + "\n".join(empty)


def test_the_dashboards_model_variable_lists_every_served_model(observed):
    (variable,) = [v for v in load_dashboard()["templating"]["list"] if v["name"] == "model"]
    metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"]).groups()
    assert set(observed.models) <= set(observed.prometheus.api(f"label/{label}/values", **{"match[]": metric}))


def test_every_recording_and_alert_rule_returns_data(observed):
    checked, empty = 0, []
    for group in load_rules_spec()["groups"]:
        for rule in group["rules"]:
            queries = [rule["expr"], rule["record"]] if "record" in rule else [with_bool(rule["expr"])]
            for expr in queries:
                checked += 1
                if not has_data(observed.prometheus.query(expr)):
                    empty.append(f"{rule.get('record') or rule['alert']}: {expr}")
    print(f"{checked} rule expressions, {checked - len(empty)} with data")
    assert not empty, "rule expressions with no data:\n" + "\n".join(empty)


def test_with_bool_turns_filters_into_zero_or_one_and_leaves_label_matchers_alone():
    assert with_bool('up{job="a",code!="OK"} == 0') == 'up{job="a",code!="OK"} == bool 0'
    assert with_bool("a >= b and c > 0") == "a >= bool b and c > bool 0"
    assert with_bool("rate(x[5m]) > bool 1") == "rate(x[5m]) > bool 1"


def test_the_adapters_queue_metric_query_returns_the_pod(observed):
    config = yaml.safe_load((DEPLOY / "k8s" / "prometheus-adapter" / "adapter-config.yaml").read_text())
    (rule,) = yaml.safe_load(config["data"]["config.yaml"])["rules"]
    series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
    matchers = f'namespace="{SCRAPE_LABELS["namespace"]}",pod=~"{SCRAPE_LABELS["pod"]}"'
    expr = (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod"))
    result = observed.prometheus.query(expr)
    assert [s["metric"] for s in result] == [{"pod": SCRAPE_LABELS["pod"]}] and has_data(result), (expr, result)
    assert observed.prometheus.query(rule["seriesQuery"]), rule["seriesQuery"]


def test_prometheus_sees_the_counts_the_clients_saw(observed):
    prometheus, load = observed.prometheus, observed.load
    by_code = {(s["metric"]["grpc_method"], s["metric"]["grpc_code"]): float(s["value"][1]) for s in prometheus.query(
        'sum by (grpc_method, grpc_code) (attnserve_grpc_server_handled_total{grpc_service="attnserve.v1.Generation"})')}
    seen = {key: value for key, value in by_code.items() if value}
    assert seen == {**load.codes, ("GetModelInfo", "OK"): 1}
    generation = sum(n for (method, _), n in load.codes.items() if method.startswith("Generate"))
    assert generation == GENERATION_CALLS_OK + INVALID_CALLS + CANCELLED_STREAMS
    assert load.codes[("Embed", "OK")] == EMBED_CALLS - 1 and load.codes[("Embed", "INVALID_ARGUMENT")] == 1
    assert prometheus.value('sum(attnserve_batch_requests_total{outcome="ok"})') == EMBED_CALLS - 1 + CLASSIFY_CALLS
    assert prometheus.value('sum(attnserve_batch_requests_total{outcome="error"})') == 1
    assert prometheus.value("sum(attnserve_prompt_tokens_total)") == load.prompt_tokens_submitted
    generated_ok = sum(u.completion_tokens for u in load.ok_usages)
    assert prometheus.value("sum(attnserve_generated_tokens_total)") >= generated_ok + CANCELLED_STREAMS
    assert prometheus.value("sum(attnserve_time_to_first_token_seconds_count)") == GENERATION_CALLS_OK + CANCELLED_STREAMS
    assert prometheus.value('sum(attnserve_requests_finished_total{finish_reason="cancelled"})') == CANCELLED_STREAMS


def test_promtool_check_metrics_is_clean_on_a_real_scrape(observed):
    scrape = urllib.request.urlopen(f"http://127.0.0.1:{observed.server.metrics_port}/metrics", timeout=5).read().decode()
    assert "attnserve_grpc_server_handled_total" in scrape
    result = run(tool("promtool"), "check", "metrics", input=scrape)
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stdout + result.stderr
    # And promtool does lint: a counter without `_total` is reported.
    result = run(tool("promtool"), "check", "metrics", input="# HELP bad_count A count.\n# TYPE bad_count counter\nbad_count 1\n")
    assert result.returncode != 0 and "_total" in result.stdout + result.stderr
