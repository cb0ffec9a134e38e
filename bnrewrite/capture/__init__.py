"""How a model becomes graphs: ``symbolic_trace`` where it works, ``torch.export`` where it does
not, the largest capturable parts elsewhere (``capture_model``), and the eager recording pass
that counts calls and readers (``recording``)."""

from bnrewrite.capture.capture_model import capture

__all__ = ["capture"]
