"""The data package's one error type: a folder, caption or setting that cannot be used."""


class DatasetError(ValueError):
    """A training folder, caption or setting that cannot be used; says how to fix it."""
