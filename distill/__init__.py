"""distill: turn an expensive teacher model into a small, cheap student for one task."""

__version__ = "0.1.0"
