"""Run a workflow on a ComfyUI server over its HTTP API: upload photos, set inputs by node title, queue, follow
progress over /ws, download what the nodes produced. Stdlib only; used by `python -m trainers run-workflow`.
"""
from __future__ import annotations

import json
import mimetypes
import os
import struct
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

from .websocket import BINARY, WebSocket, WebSocketClosed

# Inputs of our nodes that take the folder of the subject's photos: --upload points them at the uploaded copy.
PHOTO_FOLDER_INPUTS = ("folder", "dataset_folder", "subject_folder")
UPLOADED_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".txt", ".caption")
_TEXT_EVENT = 3  # ComfyUI's binary event for a node's progress text (protocol.BinaryEventTypes.TEXT)


class WorkflowError(RuntimeError):
    """The server refused the workflow, a node failed, or the run was interrupted; the message is ComfyUI's."""


# --- the prompt ---------------------------------------------------------------------------------------------
def title(node: dict) -> str:
    """A node's title on the canvas (the API form keeps it in _meta), else its class."""
    return node.get("_meta", {}).get("title") or node["class_type"]


def find_nodes(prompt: dict, ref: str) -> list[str]:
    """Node ids a reference names: '#12' is node 12; otherwise the title (as on the canvas), else the class type."""
    if ref.startswith("#"):
        return [ref[1:]] if ref[1:] in prompt else []
    for key in (title, lambda n: n["class_type"]):
        found = [i for i, n in prompt.items() if key(n).casefold() == ref.casefold()]
        if found:
            return found
    return []


def parse_value(text: str):
    """A --set value: JSON when it parses (numbers, true/false, lists), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def set_input(prompt: dict, assignment: str) -> str:
    """Apply 'NODE_TITLE.input=value' (the title may hold dots: the last dot before '=' splits it); returns
    the node id. A title shared by several nodes must be told apart with '#id'."""
    target, sep, value = assignment.partition("=")
    ref, dot, name = target.rpartition(".")
    if not sep or not dot or not ref or not name:
        raise WorkflowError(f"--set {assignment!r}: write NODE_TITLE.input=value (or '#id.input=value')")
    found = find_nodes(prompt, ref)
    if not found:
        titles = sorted({title(n) for n in prompt.values()})
        raise WorkflowError(f"--set {assignment!r}: no node titled {ref!r}. Titles: {', '.join(titles)}")
    if len(found) > 1:
        raise WorkflowError(f"--set {assignment!r}: {len(found)} nodes are titled {ref!r} (ids "
                            f"{', '.join(found)}); name one as '#id.{name}=...'")
    inputs = prompt[found[0]]["inputs"]
    if isinstance(inputs.get(name), list):
        raise WorkflowError(f"--set {assignment!r}: {name!r} of {ref!r} is fed by a link, not a widget")
    inputs[name] = parse_value(value)
    return found[0]


def point_photo_inputs(prompt: dict, folder: str) -> list[str]:
    """Set every typed photo-folder input of our nodes to `folder`; returns what it set, as 'title.input'. An
    empty one is left alone: the workflow feeds that node its photos by a link."""
    changed = []
    for node in prompt.values():
        if not node["class_type"].startswith("Personalize"):
            continue
        for name in PHOTO_FOLDER_INPUTS:
            if isinstance(node["inputs"].get(name), str) and node["inputs"][name]:
                node["inputs"][name] = folder
                changed.append(f"{title(node)}.{name}")
    return changed


def node_error_text(body: dict) -> str:
    """ComfyUI's answer to a refused prompt, as lines a person reads."""
    error = body.get("error") or {}
    lines = [f"{error.get('message', 'the server refused the workflow')}" +
             (f": {error['details']}" if error.get("details") else "")]
    for node_id, entry in (body.get("node_errors") or {}).items():
        for e in entry.get("errors", []):
            lines.append(f"  node {node_id} ({entry.get('class_type', '?')}): {e.get('message', '')}"
                         + (f": {e['details']}" if e.get("details") else ""))
    return "\n".join(lines)


# --- the server ---------------------------------------------------------------------------------------------
class ComfyClient:
    def __init__(self, server: str, timeout: float = 60.0):
        self.server = server.rstrip("/")
        if "://" not in self.server:
            self.server = "http://" + self.server
        self.timeout = timeout
        self.client_id = uuid.uuid4().hex

    def _request(self, method: str, path: str, data: bytes | None = None, headers: dict | None = None):
        request = urllib.request.Request(self.server + path, data=data, method=method, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except urllib.error.URLError as e:
            raise WorkflowError(f"cannot reach the ComfyUI server at {self.server}: {e.reason}") from e

    def get_json(self, path: str):
        status, body = self._request("GET", path)
        if status != 200:
            raise WorkflowError(f"GET {path}: HTTP {status}: {body[:300]!r}")
        return json.loads(body)

    def object_info(self) -> dict:
        return self.get_json("/object_info")

    def upload(self, path: str, subfolder: str) -> dict:
        """One file into ComfyUI's input/<subfolder> (overwriting a file of the same name)."""
        boundary = uuid.uuid4().hex
        name = os.path.basename(path)
        kind = mimetypes.guess_type(name)[0] or "application/octet-stream"
        with open(path, "rb") as f:
            content = f.read()
        fields = [("subfolder", subfolder), ("type", "input"), ("overwrite", "true")]
        body = b"".join(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n".encode()
                        for k, v in fields)
        body += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
                 f"Content-Type: {kind}\r\n\r\n").encode() + content + f"\r\n--{boundary}--\r\n".encode()
        status, answer = self._request("POST", "/upload/image", body,
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise WorkflowError(f"upload of {path} failed: HTTP {status}: {answer[:300]!r}")
        return json.loads(answer)

    def upload_folder(self, folder: str, subfolder: str) -> list[str]:
        """The photos and caption files of a folder (not its sub-folders), into input/<subfolder>."""
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(UPLOADED_SUFFIXES)
                       and os.path.isfile(os.path.join(folder, n)))
        if not any(n.lower().endswith(UPLOADED_SUFFIXES[:5]) for n in names):
            raise WorkflowError(f"--upload {folder}: no images there ({', '.join(UPLOADED_SUFFIXES[:5])})")
        for name in names:
            self.upload(os.path.join(folder, name), subfolder)
        return names

    def queue(self, prompt: dict) -> str:
        body = json.dumps({"prompt": prompt, "client_id": self.client_id}).encode()
        status, answer = self._request("POST", "/prompt", body, {"Content-Type": "application/json"})
        try:
            parsed = json.loads(answer)
        except ValueError:
            parsed = {"error": {"message": answer[:300].decode(errors="replace")}}
        if status != 200:
            raise WorkflowError(node_error_text(parsed))
        if parsed.get("node_errors"):  # ComfyUI queued the valid part of the graph: a half run helps no one
            self.cancel(parsed.get("prompt_id"))
            parsed.setdefault("error", {"message": "ComfyUI refused part of the workflow (the rest was taken off "
                                                   "the queue)"})
            raise WorkflowError(node_error_text(parsed))
        return parsed["prompt_id"]

    def cancel(self, prompt_id: str | None) -> None:
        """Take a prompt off the queue, or stop it if it has started."""
        if prompt_id:
            headers = {"Content-Type": "application/json"}
            self._request("POST", "/queue", json.dumps({"delete": [prompt_id]}).encode(), headers)
            self._request("POST", "/interrupt", json.dumps({"prompt_id": prompt_id}).encode(), headers)

    def websocket(self) -> WebSocket:
        url = self.server.replace("http://", "ws://", 1) + f"/ws?clientId={self.client_id}"
        try:
            return WebSocket(url, timeout=self.timeout)
        except OSError as e:
            raise WorkflowError(f"cannot follow the run at {url}: {e}") from e

    def follow(self, socket: WebSocket, prompt_id: str, report=print, timeout: float | None = None) -> None:
        """Report progress until the prompt ends; raises WorkflowError on a node error or an interrupt."""
        deadline = None if timeout is None else time.time() + timeout
        last_line = None
        while True:
            if deadline is not None and time.time() > deadline:
                raise WorkflowError(f"the workflow did not finish within {timeout:.0f} s")
            try:
                message = socket.recv(wait=2.0)
            except WebSocketClosed:
                return self._wait_in_history(prompt_id, deadline)
            if message is None:
                if self._finished_in_history(prompt_id):  # missed the closing message: history knows
                    return self._raise_if_failed(prompt_id)
                continue
            opcode, payload = message
            if opcode == BINARY:
                line = _progress_text(payload)
                if line and line != last_line:
                    report(line)
                    last_line = line
                continue
            event = json.loads(payload)
            kind, data = event.get("type"), event.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            # the end: ComfyUI says so before it files the history entry the outputs are read from
            if (kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id) \
                    or kind == "execution_success":
                return self._wait_in_history(prompt_id, deadline)
            if kind == "execution_error":
                raise WorkflowError(_execution_error_text(data))
            if kind == "execution_interrupted":
                raise WorkflowError(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
            if kind == "executing" and data.get("node") is not None:
                report(f"running node {data['node']}")
            elif kind == "progress":
                report(f"node {data.get('node')}: {data.get('value')}/{data.get('max')}")

    def history(self, prompt_id: str) -> dict | None:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def _finished_in_history(self, prompt_id: str) -> bool:
        entry = self.history(prompt_id)
        return bool(entry and entry.get("status", {}).get("completed") is not None
                    and entry.get("status", {}).get("status_str") in ("success", "error"))

    def _wait_in_history(self, prompt_id: str, deadline: float | None) -> None:
        while not self._finished_in_history(prompt_id):
            if deadline is not None and time.time() > deadline:
                raise WorkflowError("the workflow did not finish in time")
            time.sleep(1.0)
        self._raise_if_failed(prompt_id)

    def _raise_if_failed(self, prompt_id: str) -> None:
        entry = self.history(prompt_id) or {}
        for kind, data in entry.get("status", {}).get("messages", []):
            if kind == "execution_error":
                raise WorkflowError(_execution_error_text(data))
            if kind == "execution_interrupted":
                raise WorkflowError(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")

    def download(self, ref: dict, folder: str) -> str:
        """A file a node reported ({filename, subfolder, type}) through /view, into `folder`."""
        query = urllib.parse.urlencode({k: ref.get(k, "") for k in ("filename", "subfolder", "type")})
        status, content = self._request("GET", f"/view?{query}")
        if status != 200:
            raise WorkflowError(f"could not download {ref.get('subfolder', '')}/{ref['filename']}: HTTP {status}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, os.path.basename(ref["filename"]))
        with open(path, "wb") as f:
            f.write(content)
        return path


def _progress_text(payload: bytes) -> str | None:
    """A node's progress text from ComfyUI's binary message (event 3: node id length, node id, text)."""
    if len(payload) < 8 or struct.unpack(">I", payload[:4])[0] != _TEXT_EVENT:
        return None
    n = struct.unpack(">I", payload[4:8])[0]
    node, text = payload[8:8 + n].decode(errors="replace"), payload[8 + n:].decode(errors="replace")
    return f"node {node}: {text}"


def _execution_error_text(data: dict) -> str:
    trace = "".join(data.get("traceback") or [])[-1500:]
    return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: {data.get('exception_type', '')}: "
            f"{data.get('exception_message', '').strip()}" + (f"\n{trace}" if trace else ""))


# --- outputs ------------------------------------------------------------------------------------------------
def file_refs(outputs: dict) -> list[tuple[str, dict]]:
    """(node id, {filename, subfolder, type}) for every file the nodes' UI outputs name (images, our files)."""
    refs = []
    for node_id, output in outputs.items():
        for values in output.values():
            for value in values if isinstance(values, list) else []:
                if isinstance(value, dict) and "filename" in value and "type" in value:
                    refs.append((node_id, value))
    return refs


def texts(outputs: dict) -> dict[str, list[str]]:
    """Each node's text outputs (run summaries, the Compare Models table)."""
    return {node_id: [t for t in output.get("text", []) if isinstance(t, str)]
            for node_id, output in outputs.items() if output.get("text")}
