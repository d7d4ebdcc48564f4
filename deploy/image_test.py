"""Build the serving image from deploy/Dockerfile.cpu and run it as a user would, with Debian's buildah and podman.

    .venv/bin/python deploy/image_test.py [--dockerfile deploy/Dockerfile.cpu] [--keep]      (or: make image-test)

No Docker engine and no registry: the `python:3.11-slim-bookworm` base is stood in for by a Debian bookworm
root file system made with mmdebstrap (Python 3.11 from Debian's archive), cached under
$ATTNSERVE_IMAGE_CACHE (default /var/tmp/attnserve-images). Then:

  build   buildah bud --target server --format docker (OCI drops HEALTHCHECK); RUN steps get the host's CA bundle
          and a pip.conf made from the host's pip settings bind-mounted read-only, proxies as build args:
          none of them is written into the image
  run     podman run (runc, host network, 127.0.0.1) of the image's ENTRYPOINT, a small model dir mounted
          read-only at /models/model, settings as ATTNSERVE_* variables; checked from outside the container:
          grpc health, reflection, Generate equal to `python -m server` outside the image on the same dir,
          the image's HEALTHCHECK, /metrics, uid 10001, and `podman stop` draining an in-flight stream (exit 0)
  inspect what the image holds (no torch, transformers, onnx, export/, model/), its size and layers, and the
          installed packages the project does not pin

Containers, images and the storage this run made are removed at the end, whatever happened; the base stays cached.
Exit status: 0 passed, 1 a check failed, 77 this machine cannot run it (not root, or apt cannot install the tools).
"""
from __future__ import annotations

import argparse
import configparser
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import traceback
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if str(ROOT / "proto") not in sys.path:
    sys.path.insert(0, str(ROOT / "proto"))

SKIP = 77
TOOLS = {"buildah": "buildah", "podman": "podman", "runc": "runc", "mmdebstrap": "mmdebstrap"}
CACHE = Path(os.environ.get("ATTNSERVE_IMAGE_CACHE", "/var/tmp/attnserve-images"))
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# The stand-in for python:3.11-slim-bookworm: what the official image has that the Dockerfile uses
# (python, venv, pip, groupadd/useradd), and no EXTERNALLY-MANAGED marker (the official image has none).
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "python-is-python3", "ca-certificates", "passwd")
BASE_SOURCES = ("deb http://deb.debian.org/debian bookworm main",
                "deb http://deb.debian.org/debian bookworm-updates main",
                "deb http://deb.debian.org/debian-security bookworm-security main")
BASE_HOOKS = ('rm -f "$1"/usr/lib/python3*/EXTERNALLY-MANAGED',
              'rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin')
BASE_TAG = "localhost/attnserve-python:3.11-slim-bookworm"
# Per variant (deploy/Dockerfile.cpu or .gpu): the image under test, and the same with a model dir inside.
IMAGE_TAG = "localhost/attnserve:{variant}-bare"
MODEL_IMAGE_TAG = "localhost/attnserve:{variant}-test-model"
PROXY_VARIABLES = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy",
                   "all_proxy")
# pip settings that decide how PyPI is reached; the rest of the host's pip configuration (find-links into a local
# wheel cache, constraints on the host's own packages) is about this machine, not about the build.
PIP_REACH = ("index-url", "extra-index-url", "trusted-host", "proxy", "timeout", "retries", "cert")
FORBIDDEN = ("torch", "transformers", "onnx", "onnxscript", "export", "model")
SERVICES = {"attnserve.v1.Generation", "grpc.health.v1.Health"}


class CheckFailed(Exception):
    pass


def log(message: str) -> None:
    print(f"[image-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def sh(*command, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command with a deadline; its output is captured, and shown when it fails."""
    command = [str(c) for c in command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT, check=False)
    if check and result.returncode != 0:
        raise CheckFailed(f"`{' '.join(command)}` exited {result.returncode}:\n{result.stdout[-3000:]}"
                          f"{result.stderr[-3000:]}")
    return result


def check(condition, message: str) -> None:
    if not condition:
        raise CheckFailed(message)
    log(f"ok   {message}")


# ---------------------------------------------------------------------------------------------------- tools


def ensure_tools() -> str | None:
    """Install buildah, podman, runc and mmdebstrap with apt when one is missing; the reason it cannot, or None."""
    if all(shutil.which(t) for t in TOOLS):
        return None
    if os.geteuid() != 0:
        return "not root: buildah, podman and mmdebstrap need root here (and apt-get to install them)"
    if shutil.which("apt-get") is None:
        return "no apt-get to install buildah, podman, runc and mmdebstrap with"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log("installing buildah podman runc mmdebstrap with apt")
    for command in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *TOOLS.values()]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, check=False)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(command)}` took more than 600 s"
        if result.returncode != 0:
            return f"apt cannot install the tools: `{' '.join(command)}` exited {result.returncode}: " \
                   f"{result.stderr.strip()[-500:]}"
    missing = [t for t in TOOLS if not shutil.which(t)]
    return f"apt installed the packages but {missing} are not on PATH" if missing else None


# ---------------------------------------------------------------------------------------------------- base


def base_tarball() -> Path:
    """The stand-in base as a root file system tarball, made once per recipe and kept in the cache."""
    recipe = json.dumps([BASE_PACKAGES, BASE_SOURCES, BASE_HOOKS])
    tarball = CACHE / f"python-3.11-bookworm-{hashlib.sha256(recipe.encode()).hexdigest()[:12]}.tar"
    if tarball.exists():
        log(f"base: cached {tarball}")
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = tarball.with_suffix(".partial.tar")
    log(f"base: mmdebstrap bookworm with {', '.join(BASE_PACKAGES)}")
    started = time.monotonic()
    sh("mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES),
       *[f"--customize-hook={hook}" for hook in BASE_HOOKS], "bookworm", partial, *BASE_SOURCES, timeout=900)
    partial.rename(tarball)
    log(f"base: made in {time.monotonic() - started:.0f} s ({tarball.stat().st_size / 1e6:.0f} MB)")
    return tarball


# ---------------------------------------------------------------------------------------------------- pip


def host_pip_settings() -> dict[str, str]:
    """The host pip's settings that decide how it reaches PyPI: its config files, then PIP_* variables."""
    settings: dict[str, str] = {}
    files = [Path("/etc/xdg/pip/pip.conf"), Path("/etc/pip.conf"), Path.home() / ".pip/pip.conf",
             Path.home() / ".config/pip/pip.conf"]
    if os.environ.get("PIP_CONFIG_FILE"):
        files.append(Path(os.environ["PIP_CONFIG_FILE"]))
    for path in files:
        if path.is_file():
            parser = configparser.ConfigParser()
            parser.read(path)
            for section in ("global", "install"):
                if parser.has_section(section):
                    for key, value in parser.items(section):
                        if key in PIP_REACH:
                            settings[key] = value
    for key in PIP_REACH:
        value = os.environ.get("PIP_" + key.upper().replace("-", "_"))
        if value:
            settings[key] = value
    if os.environ.get("PIP_DEFAULT_TIMEOUT"):
        settings["timeout"] = os.environ["PIP_DEFAULT_TIMEOUT"]
    return settings


def local_indexes(settings: dict[str, str]) -> list[Path]:
    """Folders behind file:// index URLs of the host's pip: the build gets them bind-mounted read-only at the
    same paths (a `simple/` index with its `files/` beside it: the folder above `simple`)."""
    folders = []
    for key in ("index-url", "extra-index-url"):
        for url in settings.get(key, "").split():
            if url.startswith("file://"):
                path = Path(url[len("file://"):])
                folder = path.parent if path.name == "simple" else path
                if folder.is_dir() and folder not in folders:
                    folders.append(folder)
    return folders


def build_pip_conf(directory: Path, settings: dict[str, str]) -> Path:
    """A pip.conf for the build's RUN steps: the host's index, proxy and trust settings, with the CA bundle
    at the path it is mounted at inside the build."""
    settings = dict(settings)
    if CA_BUNDLE.exists():
        settings["cert"] = str(CA_BUNDLE)
    elif "cert" in settings:
        del settings["cert"]  # a host path that the build does not have
    path = directory / "pip.conf"
    path.write_text("[global]\n" + "".join(f"{k} = {v}\n" for k, v in sorted(settings.items())))
    return path


# ---------------------------------------------------------------------------------------------------- containers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ulimits() -> list[str]:
    """Explicit limits within the host's hard ones (podman's defaults exceed them, and runc cannot raise them)."""
    out = []
    for name, kind, want in (("nofile", resource.RLIMIT_NOFILE, 4096), ("nproc", resource.RLIMIT_NPROC, 4096)):
        soft, _hard = resource.getrlimit(kind)
        value = min(want, soft if soft != resource.RLIM_INFINITY else want)
        out += ["--ulimit", f"{name}={value}:{value}"]
    return out


class Engine:
    """buildah and podman on a storage of this run's own (vfs), removed by close()."""

    def __init__(self, work: Path, existing: bool = False):
        self.storage = work / "storage"
        self.storage.mkdir(exist_ok=existing)
        self.store = ["--root", self.storage / "root", "--runroot", self.storage / "run", "--storage-driver", "vfs"]

    def buildah(self, *args, timeout: float = 120, check: bool = True):
        return sh("buildah", *self.store, *args, timeout=timeout, check=check)

    def podman(self, *args, timeout: float = 120, check: bool = True):
        return sh("podman", *self.store, "--runtime", "runc", "--cgroup-manager", "cgroupfs",
                  "--events-backend", "file", *args, timeout=timeout, check=check)

    def close(self) -> None:
        # Each step may be slow (vfs copies whole layers: the GPU image is 3 GB) but never stops the clean-up:
        # whatever podman leaves, the storage folder is removed below.
        for step in (lambda: self.podman("rm", "--all", "--force", "--time", "5", timeout=300, check=False),
                     lambda: self.podman("rmi", "--all", "--force", timeout=300, check=False),
                     lambda: self.buildah("rm", "--all", timeout=300, check=False)):
            try:
                step()
            except subprocess.TimeoutExpired as error:
                log(f"clean-up: {' '.join(error.cmd[:1] + error.cmd[-4:])} took over {error.timeout:.0f} s; "
                    f"removing its storage instead")
        # Anything still mounted under the storage (shm of a container that did not go cleanly) goes first.
        mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
                  if line.split()[1].startswith(str(self.storage))]
        for mount in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True, timeout=30, check=False)
        shutil.rmtree(self.storage, ignore_errors=True)
        log("cleaned up: containers, images and this run's storage removed (the base tarball stays cached)")


def remove_abandoned_runs() -> None:
    """The storage of earlier runs that were killed before their own clean-up (their process is gone)."""
    for work in CACHE.glob("run-*"):
        try:
            os.kill(int((work / "pid").read_text()), 0)
            continue  # still running
        except (OSError, ValueError):
            pass
        log(f"removing the storage an interrupted run left: {work}")
        if (work / "storage").is_dir():
            Engine(work, existing=True).close()
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------- checks


def run_checks(engine: Engine, dockerfile: Path, work: Path, base: Path, timings: dict,
               write_constraints: bool = False) -> None:
    variant = "gpu" if dockerfile.name.endswith(".gpu") else "cpu"
    image = IMAGE_TAG.format(variant=variant)
    if write_constraints:  # the build reads the file: it starts from no pins and then records what it installed
        constraints_file(variant).write_text(CONSTRAINTS_HEADER.format(variant=variant))
    from tests.server.helpers import HeldStream, ServerProcess, sum_samples, wait_until

    # -- the image
    started = time.monotonic()
    engine.podman("import", "--quiet", "--change", "ENV=LANG=C.UTF-8", "--change", 'CMD ["python3"]', base,
                  BASE_TAG, timeout=300)
    pip_settings = host_pip_settings()
    pip_conf = build_pip_conf(work, pip_settings)
    proxies = [arg for name in PROXY_VARIABLES if os.environ.get(name) for arg in
               ("--build-arg", f"{name}={os.environ[name]}")]
    volumes = ["--volume", f"{pip_conf}:/etc/pip.conf:ro"]
    if CA_BUNDLE.exists():
        volumes += ["--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro"]
    for folder in local_indexes(pip_settings):
        volumes += ["--volume", f"{folder}:{folder}:ro"]
    log(f"build: buildah bud -f {dockerfile.relative_to(ROOT) if dockerfile.is_relative_to(ROOT) else dockerfile}"
        f" --target server\n    pip.conf for the build: {pip_conf.read_text().splitlines()[1:]}"
        f"\n    mounted read-only in RUN steps: {[v.split(':')[0] for v in volumes[1::2]]}")
    result = engine.buildah("bud", "--file", dockerfile, "--target", "server", "--build-arg",
                            f"PYTHON_IMAGE={BASE_TAG}", *proxies, "--format", "docker", "--pull=never",
                            "--network", "host", *ulimits(), *volumes, "--tag", image, ROOT, timeout=1800,
                            check=False)
    if result.returncode != 0:
        raise CheckFailed(f"buildah bud exited {result.returncode}:\n{(result.stdout + result.stderr)[-4000:]}")
    timings["build_s"] = time.monotonic() - started
    log(f"build: {timings['build_s']:.0f} s")
    config = json.loads(engine.podman("image", "inspect", image, timeout=60).stdout)[0]
    healthcheck = (config.get("Healthcheck") or config["Config"].get("Healthcheck") or {}).get("Test")
    check(healthcheck, f"the image keeps its HEALTHCHECK (docker format): {healthcheck}")
    check(config["Config"].get("User") == "10001:10001", f"the image's USER is 10001:10001 "
                                                         f"({config['Config'].get('User')})")

    # -- a model dir, served outside the image for the reference answer
    model_dir = work / "model"
    sh(sys.executable, "-m", "bench.quick_model", "--checkpoint", work / "checkpoint", "--out", model_dir,
       timeout=300)
    request = {"prompt_token_ids": [5, 17, 42, 99, 7, 3, 250], "max_new_tokens": 24, "ignore_eos": True}
    from server.client import build_request
    host = ServerProcess(model_dir, "--kv-slots", "2", startup_timeout=120)
    try:
        reference = host.stub().Generate(build_request(**request), timeout=60)
    finally:
        host.stop()

    # -- the container
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    name = f"attnserve-image-test-{os.getpid()}"
    started = time.monotonic()
    mount = ("--volume", f"{model_dir}:/models/model:ro")
    device = ()
    if variant == "gpu":
        # fp16: the dtype CUDA serves, so that what refuses is the missing GPU, not the model dir's dtype.
        fp16_dir = work / "model-fp16"
        sh(sys.executable, "-m", "export", "--checkpoint", work / "checkpoint", "--dtype", "fp16", "--out", fp16_dir,
           timeout=600)
        check_refuses_cuda_without_a_gpu(engine, image, ("--volume", f"{fp16_dir}:/models/model:ro"))
        device = ("--env", "ATTNSERVE_DEVICE=auto")  # and serves on the CPU with --device auto
    port, metrics_port = start_container(engine, image, name, *mount, *device)
    target = f"127.0.0.1:{port}"
    channel = grpc.insecure_channel(target)
    timings["ready_s"] = time.monotonic() - started
    check(True, f"grpc health SERVING on {target}, {timings['ready_s']:.1f} s after podman run")

    services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    check(SERVICES <= services, f"reflection lists {sorted(services)}")

    answer = grpc_stub(channel).Generate(build_request(**request), timeout=60)
    same = list(answer.token_ids) == list(reference.token_ids) and answer.text == reference.text
    check(same, f"Generate in the image equals `python -m server` outside it on the same model dir: "
                f"image {list(answer.token_ids)}, host {list(reference.token_ids)}")

    result = engine.podman("healthcheck", "run", name, timeout=60, check=False)
    status = engine.podman("inspect", "--format", "{{.State.Health.Status}}", name, check=False).stdout.strip()
    check(result.returncode == 0 and status == "healthy",
          f"the image's HEALTHCHECK: podman healthcheck run exited {result.returncode}, status {status!r}"
          + ("" if result.returncode == 0 else f" ({result.stdout}{result.stderr})"))

    metrics = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    requests = sum_samples(metrics, "attnserve_request_duration_seconds_count")
    check(requests >= 1, f"/metrics scraped on 127.0.0.1:{metrics_port}: "
                         f"attnserve_request_duration_seconds_count {requests:.0f}")

    pid = engine.podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip()
    uids = next(line.split()[1:] for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:"))
    command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    check(set(uids) == {"10001"}, f"the server process ({command}, host pid {pid}) runs as uid {uids[0]}")

    # -- podman stop drains a stream in flight: it finishes every token, and the process exits 0
    stream = HeldStream(target, [1, 2, 3, 4], max_new_tokens=400, timeout=120)
    stream.read()  # admitted: the request holds a KV slot, paused until this side reads on
    stopped: dict = {}

    def stop():
        began = time.monotonic()
        stopped["result"] = engine.podman("stop", "--time", "90", name, timeout=150, check=False)
        stopped["seconds"] = time.monotonic() - began

    stopper = threading.Thread(target=stop)
    stopper.start()
    wait_until(lambda: "shutting down" in logs(engine, name), 30, "the server never began draining", interval=0.2)
    stream.finish()
    stopper.join(160)
    stream.close()
    exit_code = engine.podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    from attnserve.v1 import generation_pb2 as pb

    check(stream.tokens == 400 and stream.finish_reason == pb.FINISH_REASON_LENGTH,
          f"the stream in flight at `podman stop` finished: {stream.tokens}/400 tokens, "
          f"finish_reason {pb.FinishReason.Name(stream.finish_reason or 0)}")
    check(stopped["result"].returncode == 0 and exit_code == "0",
          f"podman stop exited {stopped['result'].returncode} after {stopped['seconds']:.1f} s, "
          f"the container exited {exit_code}")
    channel.close()

    inspect_image(engine, variant, write_constraints)
    check_model_inside(engine, variant, model_dir, build_request(**request), reference, timings, device)


def check_refuses_cuda_without_a_gpu(engine: Engine, image: str, mount: tuple) -> None:
    """The GPU image's own default, ATTNSERVE_DEVICE=cuda, on a machine without a usable GPU: one `error:` line,
    a non-zero exit, never a CPU server that looks like a GPU one."""
    result = engine.podman("run", "--rm", "--network", "none", *ulimits(), *mount, image, timeout=300, check=False)
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("error:")]
    check(result.returncode != 0 and len(errors) == 1 and "could not start CUDAExecutionProvider" in errors[0],
          f"without a GPU the image's --device cuda refuses to start: exit {result.returncode}, {errors}")


def start_container(engine: Engine, image: str, name: str, *volume) -> tuple[int, int]:
    """podman run of the image's ENTRYPOINT, settings as ATTNSERVE_* variables, until grpc health says SERVING;
    the gRPC and metrics ports."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tests.server.helpers import wait_until

    # Every listener on a port of its own (host network): the HTTP API's default 8000 may be taken here.
    port, metrics_port, http_port = free_port(), free_port(), free_port()
    engine.podman("run", "--detach", "--name", name, "--network", "host", *ulimits(), *volume,
                  "--env", "ATTNSERVE_HOST=127.0.0.1",
                  "--env", f"ATTNSERVE_PORT={port}", "--env", f"ATTNSERVE_METRICS_PORT={metrics_port}",
                  "--env", f"ATTNSERVE_HTTP_PORT={http_port}",
                  "--env", "ATTNSERVE_KV_SLOTS=2", "--env", "ATTNSERVE_DRAIN_GRACE_SECONDS=60",
                  "--env", "ATTNSERVE_STREAM_STALL_TIMEOUT_SECONDS=60", image, timeout=300)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)

        def serving():
            try:
                return health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
                    health_pb2.HealthCheckResponse.SERVING
            except grpc.RpcError:
                state = engine.podman("inspect", "--format", "{{.State.Status}}", name, check=False).stdout.strip()
                if state not in ("running", "created", "configured"):
                    raise CheckFailed(f"the container is {state}:\n" + logs(engine, name))
                return False

        wait_until(serving, 120, lambda: "grpc health never said SERVING:\n" + logs(engine, name), interval=0.5)
    return port, metrics_port


def check_model_inside(engine: Engine, variant: str, model_dir: Path, request, reference, timings: dict,
                       device: tuple) -> None:
    """deploy/Dockerfile.model: the model dir as the build context, copied into the image; served with no mount."""
    import grpc

    started = time.monotonic()
    image = MODEL_IMAGE_TAG.format(variant=variant)
    engine.buildah("bud", "--file", ROOT / "deploy" / "Dockerfile.model", "--build-arg",
                   f"SERVER_IMAGE={IMAGE_TAG.format(variant=variant)}", "--format", "docker", "--pull=never",
                   *ulimits(), "--tag", image, model_dir, timeout=300)
    timings["model_build_s"] = time.monotonic() - started
    size = int(engine.podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    log(f"build: deploy/Dockerfile.model with the model dir as context, {timings['model_build_s']:.0f} s, "
        f"image {size / 1e6:.0f} MB")
    name = f"attnserve-image-test-model-{os.getpid()}"
    port, _ = start_container(engine, image, name, *device)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        answer = grpc_stub(channel).Generate(request, timeout=60)
    check(list(answer.token_ids) == list(reference.token_ids),
          f"the image with the model inside (no mount) answers Generate as the host does: {list(answer.token_ids)}")
    result = engine.podman("stop", "--time", "30", name, timeout=60, check=False)
    exit_code = engine.podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    check(result.returncode == 0 and exit_code == "0", f"podman stop: the container exited {exit_code}")


def grpc_stub(channel):
    from attnserve.v1 import generation_pb2_grpc

    return generation_pb2_grpc.GenerationStub(channel)


def logs(engine: Engine, name: str) -> str:
    result = engine.podman("logs", name, timeout=30, check=False)
    return (result.stdout + result.stderr)[-4000:]


INSIDE = r"""
import importlib.util, json, sys
from importlib import metadata
absent = {m: importlib.util.find_spec(m) is None for m in %r}
dists = sorted({d.metadata["Name"].lower().replace("_", "-"): d.version
                for d in metadata.distributions(path=[p for p in sys.path if p.startswith("/opt/venv")])}.items())
print(json.dumps({"absent": absent, "dists": dists, "python": sys.version.split()[0]}))
"""


def inspect_image(engine: Engine, variant: str, write_constraints: bool = False) -> None:
    """What the serving image holds, by running its own python."""
    image = IMAGE_TAG.format(variant=variant)
    result = engine.podman("run", "--rm", "--network", "none", *ulimits(), "--workdir", "/", "--entrypoint",
                           "python", image, "-c", INSIDE % (FORBIDDEN,), timeout=120)
    held = json.loads(result.stdout.strip().splitlines()[-1])
    present = [m for m, absent in held["absent"].items() if not absent]
    check(not present, f"the image's python finds none of {', '.join(FORBIDDEN)}"
                       + (f" (found: {present})" if present else ""))
    # A bind-mount target that the image lacked stays behind as an empty file: the mount's contents do not.
    files = engine.podman("run", "--rm", "--network", "none", *ulimits(), "--entrypoint", "sh", image, "-c",
                          "for f in /export /model /src /opt/venv/lib/python3*/site-packages/export "
                          "/opt/venv/lib/python3*/site-packages/model; do [ -e $f ] && echo $f; done; "
                          "[ -s /etc/pip.conf ] && echo /etc/pip.conf; "
                          "cmp -s /etc/ssl/certs/ca-certificates.crt /dev/null && echo empty-ca-bundle; true",
                          timeout=120).stdout.split()
    check(not files, "no export/, model/ or /src in the image, and the build's pip.conf and CA bundle did not stay"
                     + (f" (found {files})" if files else ""))

    size = int(engine.podman("image", "inspect", "--format", "{{.Size}}", image).stdout.strip())
    log(f"image {image}: {size / 1e6:.0f} MB, python {held['python']}; layers (without --layers buildah "
        f"commits a stage's instructions as one layer, its size shown on the stage's last step):")
    history = engine.podman("history", "--format", "{{.Size}}\t{{.CreatedBy}}", image).stdout
    for line in history.strip().splitlines():
        layer_size, _, created_by = line.partition("\t")
        print(f"    {layer_size:>10}  {created_by.strip()[:110]}", flush=True)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"][variant]
    pinned = {re.match(r"[A-Za-z0-9_.-]+", r).group(0).lower().replace("_", "-") for r in requirements if "==" in r}
    installed = {name: version for name, version in held["dists"] if name not in ("pip", "setuptools", "attnserve")}
    unpinned = sorted(f"{n}=={v}" for n, v in installed.items() if n not in pinned)
    log(f"{len(installed)} packages installed in /opt/venv (besides attnserve, pip, setuptools); "
        f"{len(unpinned)} not pinned by pyproject.toml: {' '.join(unpinned)}")
    constraints = constraints_file(variant)
    if write_constraints:
        constraints.write_text(CONSTRAINTS_HEADER.format(variant=variant) + "".join(f"{n}=={v}\n" for n, v in sorted(installed.items())))
        log(f"wrote {constraints.relative_to(ROOT)} ({len(installed)} packages)")
        return
    constrained = read_constraints(constraints)
    outside = sorted(f"{n}=={v}" for n, v in installed.items() if n not in constrained)
    log(f"{len(installed) - len(outside)} of them pinned by {constraints.relative_to(ROOT)}; outside it: "
        f"{' '.join(outside) or 'none'}" + ("  (refresh: deploy/image_test.py --write-constraints)" if outside else ""))
    differ = sorted(f"{n} {installed[n]} (constraint {v})" for n, v in constrained.items()
                    if n in installed and installed[n] != v)
    # The build installs with `-c deploy/constraints-<variant>.txt`: a difference means the file did not reach it.
    check(not differ, f"the image's packages are the versions {constraints.relative_to(ROOT)} pins"
                      + (f" (differing: {', '.join(differ)})" if differ else ""))


def constraints_file(variant: str) -> Path:
    return ROOT / "deploy" / f"constraints-{variant}.txt"


CONSTRAINTS_HEADER = ("# The serving image's Python packages at the versions deploy/image_test.py built and tested it with,\n"
                      "# for `pip install -c deploy/constraints-{variant}.txt '.[{variant}]'` (a reproducible serving venv).\n"
                      "# Regenerate after a dependency changes in pyproject.toml: deploy/image_test.py --write-constraints"
                      " --dockerfile deploy/Dockerfile.{variant}\n")


def read_constraints(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dockerfile", type=Path, default=ROOT / "deploy" / "Dockerfile.cpu")
    parser.add_argument("--write-constraints", action="store_true",
                        help="write deploy/constraints-<cpu|gpu>.txt from the packages the built image holds")
    args = parser.parse_args(argv)
    dockerfile = args.dockerfile.resolve()
    started = time.monotonic()
    reason = ensure_tools()
    if reason:
        print(f"SKIP: {reason}", flush=True)
        return SKIP
    timings: dict = {}
    base = base_tarball()
    CACHE.mkdir(parents=True, exist_ok=True)
    remove_abandoned_runs()
    work = Path(tempfile.mkdtemp(prefix="run-", dir=CACHE))
    (work / "pid").write_text(str(os.getpid()))
    # A SIGTERM (a test's timeout, a CI job cancelled) still removes what this run made.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    engine = Engine(work)
    try:
        run_checks(engine, dockerfile, work, base, timings, args.write_constraints)
    except (CheckFailed, AssertionError) as error:
        print(f"FAILED: {error}", flush=True)
        return 1
    except Exception as error:  # noqa: BLE001 - a tool or a call that broke is a failed check too
        traceback.print_exc()
        print(f"FAILED: {type(error).__name__}: {error}", flush=True)
        return 1
    finally:
        engine.close()
        shutil.rmtree(work, ignore_errors=True)
        log(f"total {time.monotonic() - started:.0f} s")
    log("PASSED")
    return 0


if __name__ == "__main__":
    sys.exit(main())
