"""Write workflows/api/<name>.json, the API form of each workflows/<name>.json (the UI form is the source).

    python tools/export_workflows.py            # rewrite workflows/api/ from workflows/
    python tools/export_workflows.py --check    # exit 1 if any API file is missing or differs (tests run this)
    python tools/export_workflows.py --refresh-core http://127.0.0.1:8188
        # re-read ComfyUI's own node descriptions (the nodes our workflows use) from a running server

Converting needs every node's widget order: ours from the pack's NODE_CLASS_MAPPINGS, ComfyUI's from
trainers/graph/comfy_core_nodes.json (a committed copy of /object_info, so this runs without ComfyUI).
"""
from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import sys
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
from pack_loader import PACK, load_pack  # noqa: E402 (the pack imported as ComfyUI does, by its folder)

load_pack()
_format = importlib.import_module(PACK + ".trainers.graph.api_format")
VIRTUAL_NODES, describe, ui_to_api = _format.VIRTUAL_NODES, _format.describe, _format.ui_to_api

WORKFLOWS = os.path.join(ROOT, "workflows")
API_DIR = os.path.join(WORKFLOWS, "api")
CORE_NODES = os.path.join(ROOT, "trainers", "graph", "comfy_core_nodes.json")
KEPT = ("input", "input_order", "output", "output_name", "display_name")
MODEL_FILE_INPUTS = ("ckpt_name", "lora_name", "vae_name", "image")  # combos listing the server's own files  # what conversion and link checks read


def core_nodes() -> dict:
    with open(CORE_NODES, encoding="utf-8") as f:
        return json.load(f)


def object_info() -> dict:
    """/object_info as a server with this pack would answer it, for the nodes the workflows use."""
    pack = load_pack()
    return {**core_nodes(), **describe(pack.NODE_CLASS_MAPPINGS, pack.NODE_DISPLAY_NAME_MAPPINGS)}


def workflow_paths() -> list[str]:
    return sorted(glob.glob(os.path.join(WORKFLOWS, "*.json")))


def api_text(path: str, info: dict) -> str:
    with open(path, encoding="utf-8") as f:
        prompt = ui_to_api(json.load(f), info)
    return json.dumps(dict(sorted(prompt.items(), key=lambda kv: int(kv[0]))), indent=2, ensure_ascii=False) + "\n"


def api_path(path: str) -> str:
    return os.path.join(API_DIR, os.path.basename(path))


def drift() -> list[str]:
    """API files that are missing, stale, or left over from a removed workflow."""
    info = object_info()
    problems = []
    for path in workflow_paths():
        target = api_path(path)
        current = open(target, encoding="utf-8").read() if os.path.exists(target) else None
        if current != api_text(path, info):
            problems.append(f"{os.path.relpath(target, ROOT)} is {'stale' if current else 'missing'}")
    wanted = {os.path.basename(p) for p in workflow_paths()}
    problems += [f"workflows/api/{name} has no workflows/{name}" for name in sorted(os.listdir(API_DIR))
                 if name.endswith(".json") and name not in wanted] if os.path.isdir(API_DIR) else []
    return problems


def export() -> list[str]:
    info = object_info()
    os.makedirs(API_DIR, exist_ok=True)
    written = []
    for path in workflow_paths():
        with open(api_path(path), "w", encoding="utf-8") as f:
            f.write(api_text(path, info))
        written.append(os.path.relpath(api_path(path), ROOT))
    return written


def without_tooltips(entry: dict) -> dict:
    def strip(spec):
        if isinstance(spec, list) and len(spec) > 1 and isinstance(spec[1], dict):
            return [spec[0], {k: v for k, v in spec[1].items() if k != "tooltip"}, *spec[2:]]
        return spec
    kept = {k: entry[k] for k in KEPT if k in entry}
    kept["input"] = {section: {name: strip(spec) for name, spec in inputs.items()}
                     for section, inputs in kept["input"].items() if section != "hidden"}
    kept["input_order"] = {k: v for k, v in kept.get("input_order", {}).items() if k != "hidden"}
    return kept


def core_description(server_info: dict, names) -> dict:
    """The committed description: the named core nodes' entries, tooltips dropped. A combo listing the server's
    model files is an empty list (any file name: the user's folders decide)."""
    description = {name: without_tooltips(server_info[name]) for name in sorted(names)}
    for entry in description.values():
        for inputs in entry["input"].values():
            for name, spec in inputs.items():
                if isinstance(spec[0], list) and name in MODEL_FILE_INPUTS:
                    spec[0] = []
    return description


def used_core_types() -> set[str]:
    ours = set(load_pack().NODE_CLASS_MAPPINGS)
    used = set()
    for path in workflow_paths():
        with open(path, encoding="utf-8") as f:
            used |= {n["type"] for n in json.load(f)["nodes"]}
    return used - ours - set(VIRTUAL_NODES)


def refresh_core(server: str) -> None:
    with urllib.request.urlopen(server.rstrip("/") + "/object_info", timeout=60) as response:
        server_info = json.load(response)
    names = used_core_types() | set(core_nodes())
    description = core_description(server_info, names)
    with open(CORE_NODES, "w", encoding="utf-8") as f:
        json.dump(description, f, indent=1)
        f.write("\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="only report drift; exit 1 if there is any")
    ap.add_argument("--refresh-core", metavar="URL", help="re-read ComfyUI's node descriptions from a server")
    args = ap.parse_args(argv)
    if args.refresh_core:
        refresh_core(args.refresh_core)
        print(f"wrote {os.path.relpath(CORE_NODES, ROOT)}")
    if args.check:
        problems = drift()
        for line in problems:
            print(line)
        if problems:
            print("run: python tools/export_workflows.py")
        return 1 if problems else 0
    for path in export():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
