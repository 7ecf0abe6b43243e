"""The inference server: KServe v2 / Open Inference Protocol over gRPC. Never imports torch."""
