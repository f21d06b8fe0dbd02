"""The evaluate package's one error type: a metric's weights that cannot be used."""


class BackboneError(ValueError):
    """A metric's backbone weights are missing or do not fit; the message names the folder and the files."""
