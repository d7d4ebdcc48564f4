"""The container images: hadolint is clean on both Dockerfiles, the serving stages hold no torch,
and the server with its HEALTHCHECK script runs in a Python where torch cannot be imported.
(No Docker engine here: the images are checked through their Dockerfiles and what they run.)"""
from __future__ import annotations

import re
import sys
import tomllib

import pytest

from tests.deploy.helpers import DEPLOY, ROOT, run, tool

DOCKERFILES = {"cpu": DEPLOY / "Dockerfile.cpu", "gpu": DEPLOY / "Dockerfile.gpu"}
# Built with a model dir as its context, FROM either serving image.
MODEL_DOCKERFILE = DEPLOY / "Dockerfile.model"
TRAINING_ONLY = ("torch", "transformers", "onnxscript", "accelerate", "safetensors", "gguf")


def stages(dockerfile) -> dict[str, list[str]]:
    """Stage name -> its instructions, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", dockerfile.read_text())
    out, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = out.setdefault(match.group(1), [])
        if current is not None:
            current.append(line)
    return out


@pytest.mark.parametrize("dockerfile", [*DOCKERFILES.values(), MODEL_DOCKERFILE], ids=lambda p: p.name)
def test_hadolint_is_clean(dockerfile):
    result = run(tool("hadolint"), str(dockerfile))
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_flags_an_unpinned_install(tmp_path):
    """hadolint really lints here: an unpinned pip install and a root user get flagged."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11-slim-bookworm\nRUN pip install --no-cache-dir requests\nUSER root\n")
    result = run(tool("hadolint"), str(bad))
    assert result.returncode != 0 and "DL3013" in result.stdout and "DL3002" in result.stdout


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_image_is_multi_stage_non_root_with_a_healthcheck_and_the_model_from_a_build_stage(variant):
    by_stage = stages(DOCKERFILES[variant])
    assert {"proto", "build", "model", "server", "runtime"} <= set(by_stage)
    final = list(by_stage)[-1]
    assert final == "runtime"
    serving = by_stage["server"] + by_stage["runtime"]
    assert any(re.fullmatch(r"USER 10001:10001", line) for line in serving)
    assert any(line.startswith("HEALTHCHECK") and "healthcheck.py" in line for line in serving)
    assert any(line.startswith("ENTRYPOINT") and '"server"' in line for line in serving)
    copies_from = {re.search(r"--from=(\S+)", line).group(1) for line in serving if "--from=" in line}
    assert copies_from == {"build", "model"}
    assert any(line == "COPY --from=model /models/model /models/model" for line in by_stage["runtime"])
    # The serving stages install nothing themselves; the venv they copy gets only the package and its device extra.
    assert not any("pip install" in line for line in serving)
    (install,) = [line for line in by_stage["build"] if "pip install" in line]
    # The device's own extra; for the GPU that is onnxruntime-gpu with NVIDIA's CUDA and cuDNN wheels.
    assert re.search(r'"/src\[(\w+)\]"', install).group(1) == variant
    assert not any(name in install for name in TRAINING_ONLY)


def test_the_serving_dependencies_hold_no_training_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    serving = project["dependencies"] + project["optional-dependencies"]["cpu"] + project["optional-dependencies"]["gpu"]
    names = {re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower() for requirement in serving}
    assert not names & set(TRAINING_ONLY), names


BLOCK_TRAINING_IMPORTS = '''
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {names!r}:
            raise ImportError(f"{{name}} is not in the serving image")
sys.meta_path.insert(0, _Blocked())
'''


@pytest.mark.slow
def test_server_and_healthcheck_run_where_torch_cannot_be_imported(test_model_dir, tmp_path, monkeypatch):
    from tests.server.helpers import ServerProcess
    from server.client import AttnserveClient

    (tmp_path / "sitecustomize.py").write_text(BLOCK_TRAINING_IMPORTS.format(names=set(TRAINING_ONLY)))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    blocked = run(sys.executable, "-c", "import torch")
    assert blocked.returncode != 0 and "not in the serving image" in blocked.stderr

    server = ServerProcess(test_model_dir, "--kv-slots", "2", "--max-seq-len", "256")
    try:
        with AttnserveClient(server.target, timeout=30) as client:
            assert len(client.generate(prompt_token_ids=[5, 6, 7], max_new_tokens=4, ignore_eos=True).token_ids) == 4
        monkeypatch.setenv("ATTNSERVE_PORT", str(server.port))
        health = run(sys.executable, str(DEPLOY / "healthcheck.py"))
        assert health.returncode == 0 and "SERVING" in health.stdout, health.stdout + health.stderr
    finally:
        server.stop()
    monkeypatch.setenv("ATTNSERVE_PORT", str(server.port))
    assert run(sys.executable, str(DEPLOY / "healthcheck.py")).returncode == 1  # and fails once it is gone


def test_dockerignore_lets_in_exactly_what_the_dockerfiles_copy():
    allowed = {line.lstrip("!").rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    copied = set()
    for dockerfile in DOCKERFILES.values():
        for line in (l for lines in stages(dockerfile).values() for l in lines):
            if line.startswith("COPY ") and "--from=" not in line:
                copied |= {source.rstrip("/") for source in line.split()[1:-1]}
    assert copied == allowed, copied ^ allowed


def test_the_model_image_adds_only_the_model_dir_to_a_serving_image():
    lines = [line for line in re.sub(r"\\\n\s*", " ", MODEL_DOCKERFILE.read_text()).splitlines()
             if line.strip() and not line.startswith("#")]
    instructions = [line.split()[0] for line in lines]
    assert instructions == ["ARG", "FROM", "COPY"], lines
    assert lines[1] == "FROM ${SERVER_IMAGE}"
    # The whole build context (the model dir) lands where ATTNSERVE_MODEL points, owned by root.
    assert lines[2].split()[-2:] == [".", "/models/model/"] and "--chown=0:0" in lines[2]


@pytest.mark.parametrize("variant", DOCKERFILES)
def test_the_image_generates_its_stubs_with_the_projects_grpcio_tools(variant):
    """Stubs made by another grpcio-tools (and so another protobuf) would not import beside the image's protobuf."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (pin,) = [r for r in project["optional-dependencies"]["dev"] if r.startswith("grpcio-tools==")]
    (install,) = [line for line in stages(DOCKERFILES[variant])["proto"] if "pip install" in line]
    assert pin in install.split(), install
