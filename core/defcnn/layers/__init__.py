"""Layers shared by every model: the defective mask and input normalisation."""

from defcnn.layers.defective import DefectiveMask, make_defective, mask_buffers
from defcnn.layers.normalize import Normalize

__all__ = ["DefectiveMask", "Normalize", "make_defective", "mask_buffers"]
