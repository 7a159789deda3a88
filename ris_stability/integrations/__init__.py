"""Bridges to particular pipelines. ``ris`` (the RIS localisation showcase) and ``ris_align`` import ris_model;
this package's own namespace does not, so the CLI can name the pipeline's loggers without loading it."""

PIPELINE_LOGGERS: tuple[str, ...] = ("ris_model",)  # loggers of the showcase pipeline that `--config` runs show

__all__ = ["PIPELINE_LOGGERS"]
