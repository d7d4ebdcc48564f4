"""The Open Inference Protocol (KServe v2) messages and service; generated from grpc_service.proto at build time."""
