"""Export: checkpoints to verified ONNX (and TensorRT) in a Triton-layout model repository."""
