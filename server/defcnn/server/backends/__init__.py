"""Inference backends behind one small interface: batch of images in, logits out."""

from defcnn.server.backends.base import Backend, cuda_usable

__all__ = ["Backend", "cuda_usable"]
