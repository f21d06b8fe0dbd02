"""A workflow in ComfyUI's two formats: the UI form the canvas saves (nodes, links, widgets_values) and the API
form POST /prompt takes ({id: {class_type, inputs, _meta}}). Stdlib only.

`ui_to_api(workflow, object_info)` needs each node's /object_info entry for the order of its widgets: a running
server's, or `describe(NODE_CLASS_MAPPINGS)` for a pack's own nodes plus a committed description of ComfyUI's.
"""
from __future__ import annotations

# Frontend-only nodes: they never reach the server.
VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
MODE_MUTED, MODE_BYPASSED = 2, 4


def _link_table(workflow: dict) -> dict:
    """link id -> (origin node, origin slot, target node, target slot, type); both link layouts."""
    table = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            table[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"],
                                 link["target_slot"], link.get("type"))
        else:
            table[link[0]] = tuple(link[1:6])
    return table


def widget_values_per_input(name: str, spec) -> int:
    """How many widgets_values entries the frontend stores for one input (0: a socket, not a widget).

    Mirrors ComfyUI_frontend: INT inputs named seed/noise_seed (or any INT/COMBO with
    control_after_generate) get a second "control_after_generate" value ("fixed", "randomize", ...);
    forceInput inputs are sockets; an image-upload combo stores the upload button's value too.
    """
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return 0
    combo = isinstance(kind, list) or kind == "COMBO"
    if not combo and kind not in WIDGET_TYPES:
        return 0
    control = opts.get("control_after_generate")
    if control is None and kind == "INT":
        control = name in ("seed", "noise_seed")
    upload = combo and any(opts.get(k) for k in ("image_upload", "video_upload", "animated_image_upload"))
    return 1 + bool(control) + bool(upload)


def widget_inputs(node_info: dict) -> list[tuple[str, int, bool]]:
    """(input name, widgets_values entries, required) in the order the frontend creates widgets."""
    spec = node_info.get("input") or {}
    order = node_info.get("input_order") or {k: list(v) for k, v in spec.items()}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            count = widget_values_per_input(name, spec[section][name])
            if count:
                out.append((name, count, section == "required"))
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a UI (canvas) workflow, as saved by ComfyUI's frontend, to an API prompt.

    Widget values are matched to inputs by the order of /object_info (required, then
    optional, control_after_generate values skipped); a linked input takes the link.
    Notes are dropped, Reroutes are followed, muted nodes are left out and bypassed nodes
    pass each output on from their first input of the same type, as the frontend does.
    """
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = _link_table(workflow)

    def source(link_id, seen=()):
        """[node id, slot] that feeds this link, through reroutes and bypassed nodes (None: nothing)."""
        origin, slot, _, _, kind = links[link_id]
        node = nodes.get(origin)
        if node is None or link_id in seen:
            raise ValueError(f"link {link_id} comes from missing node {origin} (or loops)")
        if node["type"] == "PrimitiveNode":
            return None  # its value was copied into the target's widget
        if node["type"] == "Reroute":
            upstream = (node.get("inputs") or [{}])[0].get("link")
            return None if upstream is None else source(upstream, seen + (link_id,))
        if node.get("mode") == MODE_BYPASSED:
            out_type = (node.get("outputs") or [])[slot].get("type", kind)
            for inp in node.get("inputs") or []:
                if inp.get("link") is not None and inp.get("type") == out_type:
                    return source(inp["link"], seen + (link_id,))
            return None
        if node.get("mode") == MODE_MUTED:
            return None
        return [str(origin), slot]

    prompt = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        info = object_info.get(kind)
        if info is None:
            raise ValueError(f"node {node_id} has type {kind!r}, which this ComfyUI does not know "
                             f"(a custom node that is not installed?)")
        values = node.get("widgets_values") or []
        inputs = {}
        if isinstance(values, dict):  # some nodes save their widgets by name
            inputs.update({k: v for k, v in values.items()})
        else:
            pos = 0
            for name, count, required in widget_inputs(info):
                if pos >= len(values):
                    if required:
                        raise ValueError(f"node {node_id} ({kind}) has {len(values)} widget values; "
                                         f"'{name}' has none")
                    break
                inputs[name] = values[pos]
                pos += count
            if pos != len(values):
                raise ValueError(f"node {node_id} ({kind}) has {len(values)} widget values, "
                                 f"its inputs take {pos}")
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            src = source(slot["link"])
            if src is not None:
                inputs[slot["name"]] = src
        prompt[str(node_id)] = {"class_type": kind, "inputs": inputs,
                                "_meta": {"title": node.get("title") or info.get("display_name") or kind}}
    return prompt


def is_api_prompt(data) -> bool:
    """True for an API-form workflow ({id: {"class_type": ...}}), False for the UI form."""
    return isinstance(data, dict) and "nodes" not in data and bool(data) and all(
        isinstance(v, dict) and "class_type" in v for v in data.values())


def describe(node_classes: dict, display_names: dict | None = None) -> dict:
    """/object_info entries for node classes, as ComfyUI's server builds them (inputs in INPUT_TYPES order,
    outputs, output names, the title a new node gets): enough for ui_to_api and for checking a workflow's links."""
    info = {}
    for name, cls in node_classes.items():
        spec = {k: v for k, v in cls.INPUT_TYPES().items() if k != "hidden"}
        outputs = list(cls.RETURN_TYPES)
        info[name] = {"input": spec, "input_order": {k: list(v) for k, v in spec.items()}, "output": outputs,
                      "output_name": list(getattr(cls, "RETURN_NAMES", None) or outputs),
                      "display_name": (display_names or {}).get(name, name)}
    return info
