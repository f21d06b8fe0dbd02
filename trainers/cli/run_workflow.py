"""`python -m trainers run-workflow FILE --server URL`: run a workflow on a ComfyUI server and fetch its results.

    python -m trainers run-workflow workflows/api/train_lora_sd15.json --server http://127.0.0.1:8188 \
        --upload photos/ --set "Train LoRA (Personalize).steps=400" --set "Train LoRA (Personalize).trigger_word=ohwx"

FILE is either form: the API form (workflows/api/) as it is, the UI form (workflows/) converted with the server's
/object_info. Inputs are set by the node's title on the canvas ('#12.steps=400' names node 12). --upload copies a
folder of photos (and their .txt captions) into ComfyUI's input/personalize_uploads/<folder name>/ and points every
photo-folder input of the pack's nodes at it. Progress is followed over /ws; the files the nodes report (images,
reports) and their text (run summaries, the Compare Models table) are written to --out. The exit status is 0 when
the whole graph ran, 1 with ComfyUI's error text when the server refused it, a node failed or it was interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

from ..graph import client as comfy
from ..graph.api_format import is_api_prompt, ui_to_api

UPLOAD_ROOT = "personalize_uploads"


def add_run_workflow_command(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("run-workflow", help="run a workflow on a ComfyUI server and download its results",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file", help="a workflow JSON (API form or UI form)")
    p.add_argument("--server", default="http://127.0.0.1:8188", help="ComfyUI's address (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="NODE_TITLE.input=value",
                   help="set a widget value by the node's title; repeat it")
    p.add_argument("--upload", metavar="DIR", help="a folder of photos (and captions) to upload and train on")
    p.add_argument("--out", help="folder for the results (default: <workflow name>_results, never overwritten)")
    p.add_argument("--timeout", type=float, help="give up after this many seconds (default: wait)")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    try:
        out = run_workflow(args.file, args.server, args.set, args.upload, args.out, args.timeout)
    except comfy.WorkflowError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"results in {out}")
    return 0


def load_prompt(path: str, client: comfy.ComfyClient) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise comfy.WorkflowError(f"cannot read workflow {path}: {e}") from e
    if is_api_prompt(data):
        return data
    if not isinstance(data, dict) or "nodes" not in data:
        raise comfy.WorkflowError(f"{path} is not a ComfyUI workflow (neither the API form nor the UI form)")
    try:
        return ui_to_api(data, client.object_info())
    except ValueError as e:
        raise comfy.WorkflowError(f"{path}: {e}") from e


def run_workflow(path: str, server: str, assignments=(), upload: str | None = None, out: str | None = None,
                 timeout: float | None = None, report=print) -> str:
    """Queue the workflow, follow it to the end, download its results; returns the results folder."""
    client = comfy.ComfyClient(server)
    prompt = load_prompt(path, client)
    if upload:
        if not os.path.isdir(upload):
            raise comfy.WorkflowError(f"--upload {upload}: not a folder")
        subfolder = f"{UPLOAD_ROOT}/{_safe(os.path.basename(os.path.abspath(upload)))}"
        names = client.upload_folder(upload, subfolder)
        pointed = comfy.point_photo_inputs(prompt, subfolder)
        report(f"uploaded {len(names)} files to input/{subfolder}; set {', '.join(pointed) or 'no input'}")
    for assignment in assignments:  # after --upload, so a typed folder wins
        comfy.set_input(prompt, assignment)
    socket = client.websocket()  # before queueing: no message is missed
    try:
        prompt_id = client.queue(prompt)
        report(f"queued {os.path.basename(path)} as {prompt_id}")
        client.follow(socket, prompt_id, report=report, timeout=timeout)
    finally:
        socket.close()
    outputs = (client.history(prompt_id) or {}).get("outputs", {})
    return save_results(client, prompt, outputs, out or _stem(path) + "_results")


def save_results(client: comfy.ComfyClient, prompt: dict, outputs: dict, out: str) -> str:
    """Each node's files and text under <out>/<id>_<title>/, and outputs.json (what /history said)."""
    out = _new_folder(out)
    folder = lambda node_id: os.path.join(  # noqa: E731
        out, f"{node_id}_{_safe(comfy.title(prompt[node_id]) if node_id in prompt else 'node')}")
    for node_id, ref in comfy.file_refs(outputs):
        client.download(ref, folder(node_id))
    for node_id, lines in comfy.texts(outputs).items():
        os.makedirs(folder(node_id), exist_ok=True)
        with open(os.path.join(folder(node_id), "text.md"), "w", encoding="utf-8") as f:
            f.write("\n\n".join(lines) + "\n")
    with open(os.path.join(out, "outputs.json"), "w", encoding="utf-8") as f:
        json.dump(outputs, f, indent=1)
    return out


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "node"


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]


def _new_folder(path: str) -> str:
    """`path`, or path_2, path_3 ... when it exists: earlier results are never overwritten."""
    candidate, n = path, 1
    while os.path.exists(candidate):
        n += 1
        candidate = f"{path}_{n}"
    os.makedirs(candidate)
    return candidate
