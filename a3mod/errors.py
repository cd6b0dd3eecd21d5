"""Typed errors. Every one names the offending value and what is allowed."""


class A3ModError(ValueError):
    """Base class of every error a3mod raises on bad input."""


class UnsupportedModelError(A3ModError):
    """The model type has no architecture adapter."""


class DiscoveryError(UnsupportedModelError):
    """Graph discovery could not explain a layer (says what it found and what is missing)."""


class RatioError(A3ModError):
    """A compression ratio or rank outside what the component allows."""


class CalibrationError(A3ModError):
    """Calibration data or statistics that cannot be used (too little, NaN/inf)."""


class CheckpointError(A3ModError):
    """An a3mod checkpoint whose sidecar and weights do not agree, or a bad output path."""


class ExportError(A3ModError):
    """A model a format cannot express (names the construct and the format); raised before any file is written."""
