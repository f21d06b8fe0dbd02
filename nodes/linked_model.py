"""What the loader nodes that take a trainer's output by link share: checking the inputs before a run."""
from __future__ import annotations


def validate_linked(node_cls, name_input: str, name: str, link_input: str, folder: str, input_types: dict):
    """True, or the error ComfyUI shows. `name` (a file in models/<folder>) is only checked when nothing is linked to
    `link_input` (a trainer's output names a file that does not exist yet). Naming input_types in VALIDATE_INPUTS
    makes ComfyUI leave the link types to us, so they are checked here too."""
    try:
        from comfy_execution.validation import validate_node_input  # type: ignore
    except ImportError:  # an older ComfyUI
        def validate_node_input(received, expected):
            return received in (expected, "*")
    spec = node_cls.INPUT_TYPES()  # lists the folder once
    declared = {**spec["required"], **spec["optional"]}
    for input_name, received in input_types.items():
        expected = declared.get(input_name, (None,))[0]
        if isinstance(expected, str) and not validate_node_input(received, expected):
            return f"{input_name} takes {expected}, not {received}"
    if link_input in input_types or name in declared[name_input][0]:
        return True
    return f"'{name}' is not in models/{folder}; pick one from the list or link the trainer's output to {link_input}"
