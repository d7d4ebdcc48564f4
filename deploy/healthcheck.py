"""Container HEALTHCHECK: exits 0 when attnserve's standard gRPC health service answers SERVING.

Kubernetes ignores HEALTHCHECK and uses its native gRPC probes (deploy/k8s);
this is for `docker run` and Compose. It reads the server's own ATTNSERVE_*
variables (settings given as command-line flags are invisible to it):

  ATTNSERVE_HEALTH_PORT >= 1   the plaintext health-only port (the choice under mutual TLS)
  ATTNSERVE_TLS_CERT_FILE      otherwise the gRPC port over TLS, trusting the server's own
                               certificate and the name in it; with ATTNSERVE_TLS_CLIENT_CA_FILE
                               (mutual TLS) it has no client certificate and asks for the health port
  neither                      the gRPC port in plain text

ATTNSERVE_API_KEY, when set, is sent as `authorization: Bearer KEY` (for --health-needs-api-key on).
"""
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def channel(env) -> tuple[str, grpc.Channel]:
    health_port = int(env.get("ATTNSERVE_HEALTH_PORT") or -1)
    cert_file = env.get("ATTNSERVE_TLS_CERT_FILE", "")
    if health_port >= 1 or not cert_file:
        target = f"127.0.0.1:{health_port if health_port >= 1 else env.get('ATTNSERVE_PORT', '50051')}"
        return target, grpc.insecure_channel(target)
    if env.get("ATTNSERVE_TLS_CLIENT_CA_FILE"):
        raise ValueError("mutual TLS: set ATTNSERVE_HEALTH_PORT (a plaintext health-only port) for the healthcheck")
    from cryptography import x509  # the server's own dependency

    pem = Path(cert_file).read_bytes()
    leaf = x509.load_pem_x509_certificates(pem)[0]
    try:
        name = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName)[0]
    except (x509.ExtensionNotFound, IndexError):
        name = leaf.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
    target = f"127.0.0.1:{env.get('ATTNSERVE_PORT', '50051')}"
    # The server's certificate (chain) is the only root: whatever CA signed it, this is the server we mean.
    return target, grpc.secure_channel(target, grpc.ssl_channel_credentials(pem),
                                       [("grpc.ssl_target_name_override", name)])


def main(env=os.environ) -> int:
    key = env.get("ATTNSERVE_API_KEY")
    metadata = (("authorization", f"Bearer {key}"),) if key else ()
    try:
        target, ch = channel(env)
    except (OSError, ValueError, IndexError) as e:
        print(f"healthcheck: {e}", file=sys.stderr)
        return 1
    try:
        with ch:
            reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=3,
                                                         metadata=metadata)
    except grpc.RpcError as e:
        print(f"{target}: {e.code().name}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
