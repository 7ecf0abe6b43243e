"""The model zoo: standard and defective CNNs by name, all taking [0, 1] pixels."""

from defcnn.models.registry import ARCHS, Classifier, ModelSpec, create_model, list_models

__all__ = ["ARCHS", "Classifier", "ModelSpec", "create_model", "list_models"]
