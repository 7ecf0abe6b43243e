"""Protocol definitions: the Open Inference Protocol (KServe v2) gRPC service.

``grpc_service.proto`` and ``model_config.proto`` are wire-compatible with NVIDIA Triton's
(package ``inference``); the ``*_pb2*.py`` modules next to them are generated from them by
``python -m defcnn.protos.generate`` and committed.
"""
