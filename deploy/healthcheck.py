"""Container HEALTHCHECK: exits 0 when attnserve's standard gRPC health service answers SERVING.

Kubernetes ignores HEALTHCHECK and uses its native gRPC probes (deploy/k8s);
this is for `docker run` and Compose. The port is the server's own setting.
"""
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    target = f"127.0.0.1:{os.environ.get('ATTNSERVE_PORT', '50051')}"
    try:
        with grpc.insecure_channel(target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    except grpc.RpcError as e:
        print(f"{target}: {e.code().name}", file=sys.stderr)
        return 1
    serving = reply.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
