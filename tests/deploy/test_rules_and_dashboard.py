"""promtool checks and unit-tests the PrometheusRule; the dashboard is the generator's output and
covers what an operator watches. (Whether every query returns data: test_prometheus.py.)"""
from __future__ import annotations

import re
import shutil
import sys

from tests.deploy.helpers import DEPLOY, dashboard_targets, load_dashboard, load_rules_spec, run, tool

ALERTS = {"AttnserveHighTimeToFirstToken", "AttnserveHighErrorRate", "AttnserveQueueSaturated",
          "AttnserveKVCacheFull", "AttnserveEngineStepFailures", "AttnserveTargetDown"}


def test_promtool_check_rules_passes(rules_dir):
    result = run(tool("promtool"), "check", "rules", str(rules_dir / "attnserve.rules.yaml"))
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sum(len(g["rules"]) for g in load_rules_spec()["groups"])
    assert f"SUCCESS: {rules} rules found" in result.stdout


def test_promtool_unit_tests_fire_each_alert_and_keep_healthy_series_quiet(rules_dir):
    result = run(tool("promtool"), "test", "rules", str(rules_dir / "attnserve.rules.test.yaml"))
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    tested = re.findall(r"alertname: (\w+)", (rules_dir / "attnserve.rules.test.yaml").read_text())
    alerts = {r["alert"] for g in load_rules_spec()["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == ALERTS
    assert set(tested) == alerts  # every alert has unit tests


def test_promtool_unit_tests_fail_when_a_threshold_moves(rules_dir, tmp_path):
    """The unit tests can fail: the same tests against rules with a higher TTFT threshold do."""
    shutil.copy(rules_dir / "attnserve.rules.test.yaml", tmp_path)
    rules = (rules_dir / "attnserve.rules.yaml").read_text()
    moved = rules.replace("p95_5m > 2", "p95_5m > 5")
    assert moved != rules
    (tmp_path / "attnserve.rules.yaml").write_text(moved)
    result = run(tool("promtool"), "test", "rules", str(tmp_path / "attnserve.rules.test.yaml"))
    assert result.returncode != 0 and "AttnserveHighTimeToFirstToken" in result.stdout + result.stderr


def test_committed_dashboard_is_the_generators_output():
    result = run(sys.executable, "-c", "import sys; sys.path.insert(0, 'deploy/grafana'); "
                 "import dashboard; sys.stdout.write(dashboard.render())")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (DEPLOY / "grafana" / "attnserve.json").read_text(), \
        "deploy/grafana/attnserve.json is stale: run python deploy/grafana/dashboard.py"


def test_dashboard_is_templated_on_datasource_and_model_and_has_the_operators_panels():
    dashboard = load_dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["model"]["query"]["query"] == "label_values(attnserve_model_info, model)"
    targets = dashboard_targets(dashboard)
    assert len(targets) >= 25
    for title, target in targets:
        assert target["datasource"]["uid"] == "${datasource}", title
        assert 'model=~"$model"' in target["expr"], title
    titles = {title for title, _ in targets}
    assert {"Time to first token", "Inter-token latency", "End-to-end latency", "Tokens per second",
            "Requests per second by status", "Running and waiting requests", "KV cache usage",
            "Batch occupancy", "Errors by code"} <= titles
    for latency in ("Time to first token", "Inter-token latency", "End-to-end latency"):
        quantiles = {re.search(r"histogram_quantile\(([\d.]+)", t["expr"]).group(1) for title, t in targets if title == latency}
        assert quantiles == {"0.5", "0.95", "0.99"}, latency
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_reads_only_recording_rules_that_exist():
    recorded = {r["record"] for g in load_rules_spec()["groups"] for r in g["rules"] if "record" in r}
    used = {name for _, t in dashboard_targets(load_dashboard()) for name in re.findall(r"\b\w*:\w+:\w+\b", t["expr"])}
    assert used, "the dashboard should read the recording rules"
    assert used <= recorded, used - recorded
