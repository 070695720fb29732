"""The defended model ``f(G(x))``: a purifier in front of a classifier, as one module.

Evaluation attacks it end to end (the adaptive setting) and export traces it into one fused graph.
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["Purified"]


class Purified(nn.Module):
    """The defended model ``f(G(x))``: a purifier in front of a classifier.

    ``num_classes`` is the classifier's, so suites size their targeted attacks right.
    """

    def __init__(self, purifier: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.purifier = purifier
        self.classifier = classifier
        self.num_classes = int(getattr(classifier, "num_classes", 0) or 0)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.purifier(x))
