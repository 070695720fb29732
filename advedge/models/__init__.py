"""Image classifiers by name: the base class, the registry and the CIFAR architectures.

Every model maps float images in [0, 1] (NCHW) to logits; mean/std normalisation is its first
layer. Build one with ``create_model(name, num_classes=..., **kwargs)``; ``list_models()`` names
them all. Importing this package registers every architecture.
"""

# Imported for their side effect: each architecture module registers its factories.
from advedge.models import mobilenetv2, preact_resnet, resnet, tiny, wide_resnet  # noqa: F401
from advedge.models.base import ImageClassifier, Normalize
from advedge.models.complexity import count_parameters, estimate_flops, mflops, model_cost
from advedge.models.registry import create_model, list_models, model_info, register_model

__all__ = [
    "ImageClassifier",
    "Normalize",
    "count_parameters",
    "create_model",
    "estimate_flops",
    "list_models",
    "mflops",
    "model_cost",
    "model_info",
    "register_model",
]
