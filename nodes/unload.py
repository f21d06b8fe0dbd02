"""What the Unload nodes share: free a model the pack keeps loaded between runs, optionally after another node."""
from __future__ import annotations


class UnloadNode:
    """Subclasses set DESCRIPTION, CATEGORY, AFTER (the `after` input's tooltip), DONE / NOTHING (the status when
    something was / nothing was loaded) and `release()` (True if a model was loaded)."""
    FUNCTION = "unload"
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("status",)
    OUTPUT_NODE = True
    AFTER = "Connect an output here to unload after that node ran."
    DONE, NOTHING = "Unloaded.", "Nothing was loaded."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}, "optional": {"after": ("STRING", {"forceInput": True, "tooltip": cls.AFTER})}}

    @classmethod
    def IS_CHANGED(cls, **kw):
        return float("nan")  # always runs: what it frees is not in its inputs

    def release(self) -> bool:
        raise NotImplementedError

    def unload(self, after=None):
        status = self.DONE if self.release() else self.NOTHING
        return {"ui": {"text": [status]}, "result": (status,)}
