"""The attnserve gRPC server: onnxruntime engine, scheduler, KV slots, metrics. Imports no torch."""
