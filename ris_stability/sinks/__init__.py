"""Sinks: the monitor's rows and events also written to TensorBoard, MLflow and Weights & Biases (see ``base``)."""

from ris_stability.sinks.base import SinkSet, current_sinks, open_sinks, scalar_tags

__all__ = ["SinkSet", "current_sinks", "open_sinks", "scalar_tags"]
