"""`python -m trainers run-workflow`'s parts without a server: inputs set by title, photo folders pointed at the
upload, ComfyUI's errors as text, files found in outputs, and the WebSocket frames of /ws. The COMFYUI_DIR tier
runs the client against a real ComfyUI (tests/test_comfyui_integration.py)."""
import json
import os
import socket
import struct
import threading

import pytest

from trainers.cli.main import main
from trainers.graph import client as comfy
from trainers.graph.websocket import BINARY, PONG, TEXT, WebSocket, WebSocketClosed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def api_workflow(name: str) -> dict:
    with open(os.path.join(ROOT, "workflows", "api", name), encoding="utf-8") as f:
        return json.load(f)


def test_inputs_are_set_by_title_by_id_and_by_class():
    prompt = api_workflow("train_lora_sd15.json")
    train = comfy.set_input(prompt, "Train LoRA (Personalize).steps=12")
    assert prompt[train]["inputs"]["steps"] == 12  # JSON: a number stays a number
    comfy.set_input(prompt, "train lora (personalize).trigger_word=ohwx person")  # titles ignore case
    assert prompt[train]["inputs"]["trigger_word"] == "ohwx person"
    comfy.set_input(prompt, f"#{train}.train_text_encoder=true")
    assert prompt[train]["inputs"]["train_text_encoder"] is True
    comfy.set_input(prompt, "PersonalizeTrainLoRA.rank=4")  # the class name when no title matches
    assert prompt[train]["inputs"]["rank"] == 4


def test_bad_assignments_say_what_to_write():
    prompt = api_workflow("train_dreambooth_sd15.json")
    with pytest.raises(comfy.WorkflowError, match="no node titled 'Nope'.*Titles: .*Load Checkpoint"):
        comfy.set_input(prompt, "Nope.steps=1")
    with pytest.raises(comfy.WorkflowError, match=r"2 nodes are titled 'VAE Decode' \(ids .*'#id.samples"):
        comfy.set_input(prompt, "VAE Decode.samples=1")
    with pytest.raises(comfy.WorkflowError, match="fed by a link"):
        comfy.set_input(prompt, "Tuned model.images=1")
    with pytest.raises(comfy.WorkflowError, match="NODE_TITLE.input=value"):
        comfy.set_input(prompt, "steps")


def test_upload_points_only_the_typed_photo_folders_of_our_nodes():
    prompt = api_workflow("personalize_mission_sd15.json")
    typed = {(i, k) for i, n in prompt.items() for k, v in n["inputs"].items()
             if k in comfy.PHOTO_FOLDER_INPUTS and isinstance(v, str) and v}
    linked_or_empty = {(i, k): v for i, n in prompt.items() for k, v in n["inputs"].items()
                       if k in comfy.PHOTO_FOLDER_INPUTS and (i, k) not in typed}
    changed = comfy.point_photo_inputs(prompt, "personalize_uploads/dog")
    assert typed and len(changed) == len(typed)
    assert all(prompt[i]["inputs"][k] == "personalize_uploads/dog" for i, k in typed)
    assert {key: prompt[key[0]]["inputs"][key[1]] for key in linked_or_empty} == linked_or_empty


def test_refused_prompt_and_node_failure_read_as_comfyui_said():
    body = {"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation",
                      "details": ""},
            "node_errors": {"2": {"class_type": "PersonalizeTrainLoRA", "errors": [
                {"message": "Value not in list", "details": "ckpt_name: 'x.safetensors' not in []"}]}}}
    assert comfy.node_error_text(body) == ("Prompt outputs failed validation\n  node 2 (PersonalizeTrainLoRA): "
                                           "Value not in list: ckpt_name: 'x.safetensors' not in []")
    text = comfy._execution_error_text({"node_id": "2", "node_type": "PersonalizeTrainLoRA",
                                        "exception_type": "ValueError", "exception_message": "no photos in x\n",
                                        "traceback": ["Traceback ...\n", "ValueError: no photos in x\n"]})
    assert text.startswith("node 2 (PersonalizeTrainLoRA) failed: ValueError: no photos in x") and "Traceback" in text


def test_files_and_texts_in_outputs():
    outputs = {"9": {"images": [{"filename": "a.png", "subfolder": "", "type": "output"}]},
               "4": {"text": ["| model | DINO |"], "files": [{"filename": "report.md", "subfolder": "r",
                                                              "type": "output"}]},
               "5": {"images": [{"filename": "p.png", "subfolder": "", "type": "temp"}], "animated": [False]}}
    assert [(n, r["filename"]) for n, r in comfy.file_refs(outputs)] == [("9", "a.png"), ("4", "report.md"),
                                                                          ("5", "p.png")]
    assert comfy.texts(outputs) == {"4": ["| model | DINO |"]}


def test_the_command_exits_1_with_the_reason_when_the_server_is_not_there(capsys):
    path = os.path.join(ROOT, "workflows", "api", "train_lora_sd15.json")
    assert main(["run-workflow", path, "--server", "http://127.0.0.1:9"]) == 1
    assert "cannot" in capsys.readouterr().err


# --- /ws frames ---------------------------------------------------------------------------------------------
def _frame(opcode: int, payload: bytes, final: bool = True) -> bytes:
    n = len(payload)
    size = bytes([n]) if n < 126 else bytes([126]) + struct.pack(">H", n) if n < 65536 else \
        bytes([127]) + struct.pack(">Q", n)
    return bytes([(0x80 if final else 0) | opcode]) + size + payload


def _connected():
    ours, server = socket.socketpair()
    ours.settimeout(10)
    server.settimeout(10)  # a missing answer fails the test instead of hanging it
    ws = WebSocket.__new__(WebSocket)
    ws.sock, ws._buffer = ours, b""
    return ws, server


def test_websocket_reads_fragmented_long_and_binary_messages_and_answers_pings():
    ws, server = _connected()
    long_text = json.dumps({"type": "progress", "data": {"value": 1, "max": 2, "pad": "x" * 70000}}).encode()
    # a ping may come between the fragments of a message
    frames = (_frame(TEXT, b'{"type": ', final=False) + _frame(0x9, b"hi") + _frame(0x0, b'"status"}')
              + _frame(TEXT, long_text) + _frame(BINARY, b"\x00\x00\x00\x03ab"))
    sender = threading.Thread(target=server.sendall, args=(frames,))  # more than a socket buffer holds
    sender.start()
    assert ws.recv() == (TEXT, b'{"type": "status"}')
    pong = server.recv(100)  # masked, as a client must send
    assert pong[0] == 0x80 | PONG and pong[1] == 0x80 | 2
    assert bytes(b ^ pong[2:6][i % 4] for i, b in enumerate(pong[6:])) == b"hi"
    assert ws.recv() == (TEXT, long_text)
    assert ws.recv() == (BINARY, b"\x00\x00\x00\x03ab")
    sender.join()
    assert ws.recv(wait=0.05) is None  # nothing more: the wait returns without reading half a frame
    server.sendall(_frame(0x8, b"\x03\xe8"))
    with pytest.raises(WebSocketClosed):
        ws.recv()


def test_progress_text_of_a_node_is_read_from_its_binary_message():
    node = b"12"
    payload = struct.pack(">I", 3) + struct.pack(">I", len(node)) + node + b"step 3/10  loss 0.1"
    assert comfy._progress_text(payload) == "node 12: step 3/10  loss 0.1"
    assert comfy._progress_text(struct.pack(">I", 1) + b"jpeg...") is None  # a preview image


# --- the whole command against a stand-in server -------------------------------------------------------------
class FakeComfy:
    """Answers the routes the client uses as ComfyUI does (upload, prompt, history, view, /ws), and runs a
    queued prompt by sending the messages ComfyUI sends: 'fail' in a node's inputs makes it fail."""

    def __init__(self, tmp):
        import http.server

        self.inputs, self.prompts, self.sockets, self.cancelled = tmp / "input", {}, [], []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status, body, kind="application/json"):
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                from urllib.parse import parse_qs, urlsplit

                url = urlsplit(self.path)
                query = {k: v[0] for k, v in parse_qs(url.query).items()}
                if url.path == "/ws":
                    return owner.accept(self)
                if url.path.startswith("/history/"):
                    return self.reply(200, owner.history(url.path.rsplit("/", 1)[1]))
                if url.path == "/view" and query.get("filename") == "out.png":
                    return self.reply(200, b"PNG...", "image/png")
                self.reply(404, {})

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/upload/image":
                    name = body.split(b'filename="', 1)[1].split(b'"', 1)[0].decode()
                    sub = body.split(b'name="subfolder"\r\n\r\n', 1)[1].split(b"\r\n", 1)[0].decode()
                    content = body.split(b"\r\n\r\n", 4)[-1].rsplit(b"\r\n--", 1)[0]
                    (owner.inputs / sub).mkdir(parents=True, exist_ok=True)
                    (owner.inputs / sub / name).write_bytes(content)
                    return self.reply(200, {"name": name, "subfolder": sub, "type": "input"})
                if self.path in ("/queue", "/interrupt"):
                    owner.cancelled.append((self.path, json.loads(body)))
                    return self.reply(200, b"", "text/plain")
                prompt = json.loads(body)["prompt"]
                half = [i for i, n in prompt.items() if n["inputs"].get("steps") == -1]
                if half:  # ComfyUI queues the outputs that validate and names the nodes that did not
                    return self.reply(200, {"prompt_id": "half", "number": 0, "node_errors": {half[0]: {
                        "class_type": prompt[half[0]]["class_type"], "errors": [{"message": "Value -1 smaller "
                                                                                 "than min of 1"}]}}})
                bad = [i for i, n in prompt.items() if n["inputs"].get("ckpt_name") == "missing.safetensors"]
                if bad:
                    return self.reply(400, {"error": {"type": "prompt_outputs_failed_validation",
                                                      "message": "Prompt outputs failed validation"},
                                            "node_errors": {bad[0]: {"class_type": prompt[bad[0]]["class_type"],
                                                                     "errors": [{"message": "Value not in list"}]}}})
                prompt_id = f"p{len(owner.prompts)}"
                owner.prompts[prompt_id] = prompt
                self.reply(200, {"prompt_id": prompt_id, "number": 0, "node_errors": {}})
                threading.Thread(target=owner.execute, args=(prompt_id,)).start()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accept(self, handler):
        import base64
        import hashlib

        key = handler.headers["Sec-WebSocket-Key"]
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest())
        handler.wfile.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")
        handler.wfile.flush()
        self.sockets.append(handler.connection)
        handler.close_connection = True
        threading.Event().wait(5)  # keep the connection open while the prompt runs

    def send(self, event: dict) -> None:
        for sock in list(self.sockets):
            try:
                sock.sendall(_frame(TEXT, json.dumps(event).encode()))
            except OSError:  # an earlier run's client, gone
                self.sockets.remove(sock)

    def execute(self, prompt_id):
        import time

        time.sleep(0.2)
        prompt = self.prompts[prompt_id]
        for node_id, node in prompt.items():
            self.send({"type": "executing", "data": {"node": node_id, "prompt_id": prompt_id}})
            if node["inputs"].get("dataset_folder") == "fail":
                self.send({"type": "execution_error", "data": {
                    "prompt_id": prompt_id, "node_id": node_id, "node_type": node["class_type"],
                    "exception_type": "FileNotFoundError", "exception_message": "Dataset folder 'fail' not found",
                    "traceback": []}})
                return
            if node["inputs"].get("dataset_folder") == "cancel":  # Cancel pressed while this node ran
                self.send({"type": "execution_interrupted", "data": {
                    "prompt_id": prompt_id, "node_id": node_id, "node_type": node["class_type"], "executed": []}})
                return
            self.send({"type": "progress", "data": {"node": node_id, "value": 1, "max": 1, "prompt_id": prompt_id}})
        self.send({"type": "executing", "data": {"node": None, "prompt_id": prompt_id}})

    def history(self, prompt_id):
        prompt = self.prompts.get(prompt_id, {})
        outputs = {i: {"images": [{"filename": "out.png", "subfolder": "", "type": "output"}]}
                   for i, n in prompt.items() if n["class_type"] == "SaveImage"}
        outputs.update({i: {"text": ["run summary"]} for i, n in prompt.items()
                        if n["class_type"] == "PersonalizeTrainLoRA"})
        return {prompt_id: {"outputs": outputs, "status": {"status_str": "success", "completed": True,
                                                            "messages": []}}}


def test_run_workflow_uploads_sets_follows_and_downloads(tmp_path, capsys):
    from trainers.testing.demo import make_photos

    fake = FakeComfy(tmp_path)
    photos = tmp_path / "my dog"
    make_photos(str(photos), count=2, size=32)
    (photos / "notes.pdf").write_bytes(b"not uploaded")
    path = os.path.join(ROOT, "workflows", "api", "train_lora_sd15.json")
    args = ["run-workflow", path, "--server", fake.url, "--upload", str(photos), "--out", str(tmp_path / "res"),
            "--set", "Train LoRA (Personalize).steps=5"]
    assert main(args) == 0, capsys.readouterr().err
    said = capsys.readouterr().out
    assert "uploaded" in said and "running node 2" in said and f"results in {tmp_path / 'res'}" in said
    uploaded = sorted(p.name for p in (fake.inputs / "personalize_uploads" / "my_dog").iterdir())
    assert uploaded == sorted(p.name for p in photos.iterdir() if p.suffix != ".pdf")
    train = fake.prompts["p0"]["2"]["inputs"]
    assert train["dataset_folder"] == "personalize_uploads/my_dog" and train["steps"] == 5
    saved = {os.path.relpath(os.path.join(d, f), tmp_path / "res") for d, _, fs in os.walk(tmp_path / "res")
             for f in fs}
    assert "outputs.json" in saved and any(s.endswith("out.png") for s in saved)
    assert (tmp_path / "res" / "2_Train_LoRA_Personalize" / "text.md").read_text() == "run summary\n"
    assert main(args) == 0 and os.path.isdir(tmp_path / "res_2")  # earlier results are kept

    failing = args[:-1] + ["Train LoRA (Personalize).dataset_folder=fail"]
    assert main(failing) == 1
    assert "node 2 (PersonalizeTrainLoRA) failed: FileNotFoundError: Dataset folder 'fail' not found" in \
        capsys.readouterr().err
    assert main(args[:-1] + ["Train LoRA (Personalize).dataset_folder=cancel"]) == 1
    assert "interrupted at node 2 (PersonalizeTrainLoRA)" in capsys.readouterr().err
    refused = args + ["--set", "Load Checkpoint.ckpt_name=missing.safetensors"]
    assert main(refused) == 1
    assert "Prompt outputs failed validation\n  node 1 (CheckpointLoaderSimple): Value not in list" in \
        capsys.readouterr().err
    assert main(args[:-1] + ["Train LoRA (Personalize).steps=-1"]) == 1  # half a graph queued: taken off again
    assert "refused part of the workflow" in capsys.readouterr().err
    assert fake.cancelled == [("/queue", {"delete": ["half"]}), ("/interrupt", {"prompt_id": "half"})]
    fake.server.shutdown()
