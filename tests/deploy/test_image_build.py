"""The serving image built from deploy/Dockerfile.cpu and run as a user would (deploy/image_test.py, also
`make image-test`): buildah builds it on a Debian stand-in for the python base, podman runs its ENTRYPOINT with a
model dir mounted, and grpc health, reflection, Generate, HEALTHCHECK, /metrics, the uid and a draining
`podman stop` are checked from outside. Skipped only where the machine cannot: not root, or apt cannot install
buildah, podman, runc and mmdebstrap."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.deploy.helpers import DEPLOY, ROOT

SKIP = 77


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_the_serving_image_builds_and_serves():
    # The first run also makes the base (about half a minute); later ones take the cached one.
    process = subprocess.Popen([sys.executable, str(DEPLOY / "image_test.py")], cwd=ROOT, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=1400)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM: the script still removes its containers, images and storage
        output, _ = process.communicate(timeout=120)
        pytest.fail("deploy/image_test.py took more than 1400 s:\n" + output[-8000:])
    print(output[-12000:])
    if process.returncode == SKIP:
        pytest.skip(output.strip().splitlines()[-1].removeprefix("SKIP: "))
    assert process.returncode == 0, output[-8000:]
    assert "PASSED" in output
