"""deploy/k8s/inference-pool: the InferencePool and its endpoint picker hang together with the Deployment
and with what a real attnserve serves.

kubernetes-validate has no schema for the Gateway API Inference Extension's InferencePool, so the built-in
kinds (the picker's Deployment, Service, ConfigMap and RBAC) are validated strictly and the pool is
checked structurally: its selector picks the server's pods, its target port is their `http` port, its
picker reference names the picker's Service and port, and every metric the picker is told to read is a
gauge on a real server's HTTP /metrics (port 0 and free ports on 127.0.0.1).
"""
from __future__ import annotations

import re
import urllib.request

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.helpers import DEPLOY, OVERLAYS, run, tool
from tests.server.helpers import HeldStream, ServerProcess, free_port, wait_until

POOL_DIR = DEPLOY / "k8s" / "inference-pool"
KUBERNETES_VERSIONS = ("1.29.0", "1.37.0")
CRD_KINDS = {"InferencePool"}
# The picker's metric flags and the EndpointPickerConfig engine-config fields that name the same signal.
SIGNALS = {"total-queued-requests-metric": "queuedRequestsSpec",
           "total-running-requests-metric": "runningRequestsSpec",
           "kv-cache-usage-percentage-metric": "kvUsageSpec"}


@pytest.fixture(scope="module")
def pool_rendered() -> str:
    result = run(tool("kubectl"), "kustomize", str(POOL_DIR))
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def pool(pool_rendered) -> dict[str, dict]:
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(pool_rendered) if d}


def picker_container(pool) -> dict:
    (only,) = pool["Deployment/attnserve-endpoint-picker"]["spec"]["template"]["spec"]["containers"]
    return only


def picker_flags(pool) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in picker_container(pool)["args"])


def picker_config(pool) -> dict:
    """The EndpointPickerConfig the picker reads from --config-file, out of its ConfigMap."""
    path = picker_flags(pool)["config-file"]
    c = picker_container(pool)
    (mount,) = [m for m in c["volumeMounts"] if path.startswith(m["mountPath"] + "/")]
    volumes = {v["name"]: v for v in pool["Deployment/attnserve-endpoint-picker"]["spec"]["template"]["spec"]["volumes"]}
    config_map = pool["ConfigMap/" + volumes[mount["name"]]["configMap"]["name"]]
    return yaml.safe_load(config_map["data"][path[len(mount["mountPath"]) + 1:]])


def engine_config(pool) -> dict:
    config = picker_config(pool)
    (extractor,) = [p for p in config["plugins"] if p["type"] == "model-server-protocol-metrics"]
    params = extractor["parameters"]
    (engine,) = [e for e in params["engineConfigs"] if e["name"] == params["defaultEngine"]]
    return engine


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_pickers_built_in_objects_pass_strict_validation(pool_rendered, tmp_path, version):
    (tmp_path / "pool.yaml").write_text(pool_rendered)
    result = run(tool("kubernetes-validate"), "--strict", "-k", version, str(tmp_path / "pool.yaml"))
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "ERROR" not in output, output
    skipped = set(re.findall(r"Couldn't find schema for kind (\w+)", output))
    assert skipped == CRD_KINDS, output
    documents = [d for d in yaml.safe_load_all(pool_rendered) if d]
    assert len(re.findall(r"passed for resource", output)) == len([d for d in documents if d["kind"] not in CRD_KINDS])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_pool_selects_the_servers_pods_on_their_http_port(pool, manifests, overlay):
    spec = pool["InferencePool/attnserve"]
    assert spec["apiVersion"] == "inference.networking.k8s.io/v1"
    template = manifests[overlay]["Deployment/attnserve"]["spec"]["template"]
    assert spec["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
    (server,) = template["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in server["ports"]}
    assert spec["spec"]["targetPorts"] == [{"number": ports["http"]}]
    # Only the server's pods: the picker's own pods carry another component label.
    picker_labels = pool["Deployment/attnserve-endpoint-picker"]["spec"]["template"]["metadata"]["labels"]
    assert not spec["spec"]["selector"]["matchLabels"].items() <= picker_labels.items()


def test_the_pool_points_at_the_pickers_service_and_the_picker_at_the_pool(pool):
    ref = pool["InferencePool/attnserve"]["spec"]["endpointPickerRef"]
    assert ref["failureMode"] in ("FailOpen", "FailClose")
    service = pool[f"Service/{ref['name']}"]["spec"]
    (port,) = [p for p in service["ports"] if p["port"] == ref["port"]["number"]]
    container_ports = {p["name"]: p["containerPort"] for p in picker_container(pool)["ports"]}
    flags = picker_flags(pool)
    assert container_ports[port["targetPort"]] == int(flags["grpc-port"])
    picker_labels = pool["Deployment/attnserve-endpoint-picker"]["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= picker_labels.items()
    assert flags["pool-name"] == "attnserve"
    for probe in ("readinessProbe", "livenessProbe"):
        assert picker_container(pool)[probe]["grpc"]["port"] == int(flags["grpc-health-port"])
    # The picker's account may read its pool and the pods, nothing more.
    rules = pool["Role/attnserve-endpoint-picker"]["rules"]
    assert {r for rule in rules for r in rule["resources"]} >= {"inferencepools", "pods"}
    assert all(set(rule["verbs"]) <= {"get", "watch", "list"} for rule in rules)
    binding = pool["RoleBinding/attnserve-endpoint-picker"]
    assert binding["subjects"][0]["name"] == pool["Deployment/attnserve-endpoint-picker"]["spec"]["template"][
        "spec"]["serviceAccountName"]


def test_the_config_file_and_the_flags_name_the_same_metrics_and_scrape_path(pool):
    config, engine, flags = picker_config(pool), engine_config(pool), picker_flags(pool)
    assert config["kind"] == "EndpointPickerConfig"
    for flag, field in SIGNALS.items():
        assert engine[field] == flags[flag], flag
    (source,) = [p for p in config["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"] == {"scheme": flags["model-server-metrics-scheme"],
                                    "path": flags["model-server-metrics-path"]} == {"scheme": "http", "path": "/metrics"}
    plugin_names = {p["name"] for p in config["plugins"]}
    referenced = {r["pluginRef"] for profile in config["schedulingProfiles"] for r in profile["plugins"]}
    referenced |= {s["pluginRef"] for s in config["data"]["sources"]}
    referenced |= {e["pluginRef"] for s in config["data"]["sources"] for e in s["extractors"]}
    assert referenced <= plugin_names


@pytest.mark.slow
def test_every_metric_the_picker_reads_is_a_gauge_on_the_servers_http_metrics(pool, test_model_dir):
    """Scrape a real server where the picker does (the pool's target port, the configured path) and read
    each configured series; then hold one of its two KV slots and read the KV-cache usage move to 0.5."""
    names = {field: engine_config(pool)[field] for field in SIGNALS.values()}
    path = picker_flags(pool)["model-server-metrics-path"]
    server = ServerProcess(test_model_dir, "--kv-slots", "2", "--max-seq-len", "1024", "--http-port", str(free_port()))
    held = None

    def scrape() -> dict[str, tuple[str, float]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.http_port}{path}", timeout=10) as response:
            assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
            text = response.read().decode()
        return {s.name: (family.type, s.value) for family in text_string_to_metric_families(text) for s in family.samples}

    try:
        samples = scrape()
        for field, name in names.items():
            assert name in samples, f"{field}: {name} is not on the HTTP port's {path}"
            assert samples[name][0] == "gauge", name
        assert samples[names["kvUsageSpec"]][1] == 0 and samples[names["queuedRequestsSpec"]][1] == 0
        held = HeldStream(server.target, [5, 6, 7, 8], max_new_tokens=900)
        held.read()  # admitted: one of the two slots is held while the test does not read
        wait_until(lambda: scrape()[names["kvUsageSpec"]][1] == 0.5, 30,
                   lambda: f"KV-cache usage with one of two slots held: {scrape()[names['kvUsageSpec']][1]}")
        assert scrape()[names["runningRequestsSpec"]][1] == 1
    finally:
        if held is not None:
            held.close()
        server.stop()
