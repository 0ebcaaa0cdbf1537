"""The error a model source raises: its own module, so that the loaders (models.py) and the ONNX
graph surgery (onnx_graph.py) both import it without importing each other."""


class ModelError(ValueError):
    """Unknown model, unreadable weights, a layer that cannot be explained, or bad labels."""
