"""Where a transformers model folder comes from: a folder under one of ComfyUI's model folders (a dropdown name),
a path, or a hub id the user typed. One rule set for every such model (BLIP, the metric backbones).

Offline first: a local folder always wins; a hub id is used only as typed, and in the server only when its owner
allowed downloads (path_policy). In the server a typed path must be inside ComfyUI's folders; the command line
may name any folder.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from . import host, path_policy

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class FolderModel:
    """How to talk about one kind of model folder in errors."""
    folder: str  # the model folder kind ("blip", "metrics")
    what: str  # "BLIP model"
    needs: str  # what the folder must hold, e.g. "config.json, the weights and the processor files"
    example: str  # a hub id that works, e.g. "Salesforce/blip-image-captioning-base"
    error: type = ValueError

    def where_to_put_it(self) -> str:
        return (f"Download a {self.what} folder (for example {self.example}: {self.needs}) into "
                f"{' or '.join(host.model_dirs(self.folder))}")


def resolve(kind: FolderModel, name_or_path: str, markers=("config.json",)) -> tuple[str, bool]:
    """(folder path or hub id, is_local). `markers`: files the folder must hold (a transformers folder)."""
    name = (name_or_path or "").strip()
    where = kind.where_to_put_it()
    if not name:
        raise kind.error(f"No {kind.what} was chosen. {where}, or type a hub id.")
    name = os.path.expanduser(name)
    local_tool = not path_policy.server_rules()
    if os.path.isabs(name):
        path = name if local_tool else path_policy.node_path(name, f"{kind.what} folder")
    else:
        try:
            path = host.resolve_model(kind.folder, name)
        except FileNotFoundError:
            if local_tool and os.path.isdir(name):  # a relative path typed on the command line
                path = os.path.abspath(name)
            elif HUB_ID.match(name):
                if not path_policy.hub_allowed():
                    raise kind.error(path_policy.hub_refusal(name)) from None
                return name, False
            else:
                raise kind.error(f"{kind.what} '{name}' was not found. {where}, or type a hub id such as "
                                 f"{kind.example}.") from None
    if not os.path.exists(path):
        raise kind.error(f"{kind.what} folder '{path}' does not exist. {where}.")
    if not os.path.isdir(path):
        raise kind.error(f"'{path}' is not a model folder: the {kind.what} needs the whole folder ({kind.needs}). "
                         f"{where}.")
    for marker in markers:
        if not os.path.isfile(os.path.join(path, marker)):
            raise kind.error(f"'{path}' has no {marker}, so it is not a {kind.what} folder. {where}.")
    return path, True


def dtype_kwarg(dtype) -> dict:
    """from_pretrained's dtype argument: `dtype` from transformers 5, `torch_dtype` before."""
    import transformers

    return {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": dtype}
