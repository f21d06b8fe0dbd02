"""Run a real ComfyUI with this pack installed, for the integration tests.

Stdlib only, so the tests' own interpreter needs nothing extra. The server
runs in the ComfyUI checkout named by COMFYUI_DIR, with its own venv when the
checkout has one (`<COMFYUI_DIR>/venv/bin/python`), on CPU, on a free port of
127.0.0.1. Models, output, input, temp, user data and the database all live
in a temporary folder, so a test sees only the files it put there.

    with ComfyServer() as comfy:
        prompt_id = comfy.post_prompt({...API-format prompt...})
        entry = comfy.wait(prompt_id, timeout=120)
        assert execution_error(entry) is None

Also here: `lora_keys_not_loaded(log)` (what ComfyUI's LoRA loader ignored; pair it with
`log_size()`/`log_since(mark)` to read one prompt's log). A workflow saved by the frontend (workflows/*.json)
becomes an API prompt through the pack's own trainers/graph/api_format.py `ui_to_api`.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PACK_FOLDER = "ComfyUI-Personalize"
# Model folders the temporary YAML points at; tests drop files into these.
MODEL_FOLDERS = ("checkpoints", "loras", "embeddings", "vae", "clip", "diffusers", "blip", "metrics")


class ComfyError(RuntimeError):
    """The server failed to start, answered with an error, or timed out."""


def comfyui_dir() -> str | None:
    path = os.environ.get("COMFYUI_DIR")
    return os.path.abspath(path) if path else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def install_pack(comfy_dir: str, pack_dir: str = REPO_ROOT, folder: str = PACK_FOLDER) -> str:
    """Symlink the pack into custom_nodes/<folder>; ComfyUI imports it by that folder name.

    A symlink that points elsewhere (another checkout, a CI clone) is replaced;
    a real folder of that name is left alone, and is an error unless it is this pack.
    """
    link = os.path.join(comfy_dir, "custom_nodes", folder)
    target = os.path.realpath(pack_dir)
    if os.path.islink(link):
        if os.path.realpath(link) == target:
            return link
        tmp = f"{link}.tmp-{os.getpid()}"
        os.symlink(target, tmp)
        os.replace(tmp, link)  # atomic swap of the stale link
        return link
    if os.path.exists(link):
        if os.path.realpath(link) != target:
            raise ComfyError(f"{link} exists and is not a link to {target}: move it away or "
                             f"set a different folder name.")
        return link
    os.symlink(target, link)
    return link


def _yaml_str(value: str) -> str:
    return json.dumps(value)  # a JSON string is a valid double-quoted YAML scalar


def write_model_paths_yaml(path: str, models_root: str, folders=MODEL_FOLDERS) -> None:
    """ComfyUI's extra_model_paths format (utils/extra_config.py): is_default puts our
    folders first, so whatever the pack saves into get_folder_paths(x)[0] lands here."""
    lines = ["personalize_test:", f"    base_path: {_yaml_str(models_root)}", "    is_default: true"]
    lines += [f"    {name}: {_yaml_str(name)}" for name in folders]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def custom_node_import_times(log: str) -> dict[str, tuple[float, bool]]:
    """Parse the 'Import times for custom nodes:' block: path -> (seconds, imported_ok).

    ComfyUI prints the time with one decimal ("   0.1 seconds: /path"), and
    " (IMPORT FAILED)" before the colon when the import raised.
    """
    times = {}
    block = log.split("Import times for custom nodes:", 1)
    if len(block) < 2:
        return times
    for line in block[1].splitlines()[1:]:
        m = re.match(r"\s*([\d.]+) seconds( \(IMPORT FAILED\))?: (.+)$", line)
        if not m:
            break
        times[m.group(3).strip()] = (float(m.group(1)), m.group(2) is None)
    return times


# Runs in ComfyUI's interpreter: preload what ComfyUI has loaded before it imports
# custom nodes (torch, comfy.*, its core nodes), then import the pack the way
# nodes.load_custom_node does and time only that, to the millisecond.
_IMPORT_PROBE = r"""
import importlib.util, json, os, sys, time
comfy_dir, pack = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir)
os.chdir(comfy_dir)
import comfy.options
comfy.options.enable_args_parsing(False)
from comfy.cli_args import args
args.cpu = True
import nodes, folder_paths, comfy.utils, comfy.model_management  # noqa: F401
before = set(sys.modules)
name = pack.replace(".", "_x_")
spec = importlib.util.spec_from_file_location(name, os.path.join(pack, "__init__.py"))
module = importlib.util.module_from_spec(spec)
sys.modules[name] = module
t = time.perf_counter()
spec.loader.exec_module(module)
seconds = time.perf_counter() - t
added = sorted({m.split(".")[0] for m in set(sys.modules) - before})
print("IMPORT_PROBE " + json.dumps({"seconds": seconds, "added_top_level_modules": added,
      "nodes": sorted(getattr(module, "NODE_CLASS_MAPPINGS", {}) or {})}))
"""


def measure_pack_import(comfy_dir: str | None = None, pack_folder: str = PACK_FOLDER,
                        python: str | None = None, timeout: float = 180.0, pack_path: str | None = None) -> dict:
    """Time the pack's import inside ComfyUI's interpreter with ms resolution.

    Returns {"seconds", "added_top_level_modules" (what the import pulled in that
    ComfyUI had not loaded), "nodes" (NODE_CLASS_MAPPINGS keys)}. The pack must be
    installed (install_pack) first, in the checkout's custom_nodes unless `pack_path` names where it is.
    """
    comfy_dir = comfy_dir or comfyui_dir()
    venv = os.path.join(comfy_dir, "venv", "bin", "python")
    python = python or (venv if os.path.exists(venv) else sys.executable)
    pack = pack_path or os.path.join(comfy_dir, "custom_nodes", pack_folder)
    proc = subprocess.run([python, "-c", _IMPORT_PROBE, comfy_dir, pack], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    for line in proc.stdout.splitlines():
        if line.startswith("IMPORT_PROBE "):
            return json.loads(line[len("IMPORT_PROBE "):])
    raise ComfyError(f"import probe failed (code {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                     f"{proc.stderr[-4000:]}")


def status_messages(entry: dict) -> list:
    return list(((entry or {}).get("status") or {}).get("messages") or [])


def execution_error(entry: dict) -> dict | None:
    """The execution_error payload of a history entry (node_id, node_type,
    exception_type, exception_message, traceback), or None."""
    for event, data in status_messages(entry):
        if event == "execution_error":
            return data
    return None


def was_interrupted(entry: dict) -> bool:
    return any(event == "execution_interrupted" for event, _ in status_messages(entry))


class ComfyServer:
    """A ComfyUI server process with this pack installed; use it as a context manager."""

    def __init__(self, comfy_dir: str | None = None, pack_dir: str = REPO_ROOT,
                 pack_folder: str = PACK_FOLDER, work_dir: str | None = None,
                 startup_timeout: float = 180.0, extra_args=(), env: dict | None = None,
                 keep_files: bool = False):
        self.comfy_dir = comfy_dir or comfyui_dir()
        if not self.comfy_dir or not os.path.isfile(os.path.join(self.comfy_dir, "main.py")):
            raise ComfyError(f"COMFYUI_DIR={self.comfy_dir!r} is not a ComfyUI checkout "
                             f"(no main.py): set COMFYUI_DIR to one.")
        self.pack_dir = pack_dir
        self.pack_folder = pack_folder
        # A folder we made is removed on exit unless asked to keep it (or COMFYUI_KEEP=1).
        self._own_work_dir = work_dir is None and not keep_files and not os.environ.get("COMFYUI_KEEP")
        self.work_dir = work_dir or tempfile.mkdtemp(prefix="comfy-it-")
        self.models_dir = os.path.join(self.work_dir, "models")
        self.output_dir = os.path.join(self.work_dir, "output")
        self.input_dir = os.path.join(self.work_dir, "input")
        self.temp_root = self.work_dir  # ComfyUI appends "temp" to --temp-directory
        self.user_dir = os.path.join(self.work_dir, "user")
        self.log_path = os.path.join(self.work_dir, "server.log")
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.env = env
        self.port = None
        self.url = None
        self.client_id = uuid.uuid4().hex
        self._proc = None
        self._log = None

    @property
    def pack_path(self) -> str:
        """Where this server imports the pack from: <work dir>/custom_nodes/<pack folder>, a link to the repo."""
        return os.path.join(self.work_dir, "custom_nodes", self.pack_folder)

    def model_folder(self, name: str) -> str:
        return os.path.join(self.models_dir, name)

    def add_model(self, folder: str, path: str, name: str | None = None) -> str:
        """Put a model file into a model folder (a hard link, else a symlink): no copy of big files."""
        target = os.path.join(self.model_folder(folder), name or os.path.basename(path))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            os.symlink(os.path.abspath(path), target)
        return target

    def run_folder(self, name: str) -> str:
        """Where the pack keeps a training run: <output>/personalize/runs/<name>."""
        return os.path.join(self.output_dir, "personalize", "runs", name)

    @property
    def python(self) -> str:
        venv = os.path.join(self.comfy_dir, "venv", "bin", "python")
        return venv if os.path.exists(venv) else sys.executable

    # --- life cycle -------------------------------------------------------
    def start(self) -> "ComfyServer":
        for d in [self.output_dir, self.input_dir, self.user_dir] + \
                 [self.model_folder(n) for n in MODEL_FOLDERS]:
            os.makedirs(d, exist_ok=True)
        # The pack in this server's own custom_nodes (--base-directory): packs installed in the checkout, or this
        # pack under another folder name by another test, do not load beside it.
        os.makedirs(os.path.join(self.work_dir, "custom_nodes"), exist_ok=True)
        install_pack(self.work_dir, self.pack_dir, self.pack_folder)
        yaml_path = os.path.join(self.work_dir, "extra_model_paths.yaml")
        write_model_paths_yaml(yaml_path, self.models_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--disable-auto-launch", "--extra-model-paths-config", yaml_path,
               "--output-directory", self.output_dir, "--input-directory", self.input_dir,
               "--temp-directory", self.temp_root, "--user-directory", self.user_dir,
               "--database-url", f"sqlite:///{os.path.join(self.work_dir, 'comfyui.db')}",
               "--base-directory", self.work_dir, *self.extra_args]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        self._log = open(self.log_path, "wb")
        self._proc = subprocess.Popen(cmd, cwd=self.comfy_dir, stdout=self._log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self._proc.returncode} while starting; "
                                 f"log {self.log_path}:\n{self.log_tail()}")
            try:
                self._request("GET", "/system_stats", timeout=5)
                self._request("GET", "/object_info", timeout=30)
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise ComfyError(f"ComfyUI did not answer /object_info within {self.startup_timeout:.0f} s; "
                         f"log {self.log_path}:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup(self) -> None:
        """Stop and delete the temporary folder (when this object made it)."""
        self.stop()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.cleanup()

    @property
    def returncode(self):
        return None if self._proc is None else self._proc.poll()

    # --- log --------------------------------------------------------------
    def log_text(self) -> str:
        if self._log is not None:
            self._log.flush()
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def log_size(self) -> int:
        """A mark to pass to log_since(), to read only what a later prompt logged."""
        return len(self.log_text())

    def log_since(self, mark: int) -> str:
        return self.log_text()[mark:]

    def log_tail(self, chars: int = 4000) -> str:
        return self.log_text()[-chars:]

    def pack_import_time(self) -> tuple[float, bool] | None:
        """(seconds, imported_ok) of this pack from the start-up log, or None if not listed."""
        link = self.pack_path
        for path, value in custom_node_import_times(self.log_text()).items():
            if os.path.normpath(path) == os.path.normpath(link):
                return value
        return None

    # --- HTTP -------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode("utf-8")
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw

    def get(self, path: str, timeout: float = 30.0):
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 30.0):
        return self._request("POST", path, body if body is not None else {}, timeout=timeout)

    def object_info(self, node_class: str | None = None) -> dict:
        info = self.get("/object_info" + (f"/{node_class}" if node_class else ""))
        return info.get(node_class, {}) if node_class else info

    def post_prompt(self, prompt: dict) -> str:
        """Queue an API-format prompt; a validation failure raises ComfyError with node_errors."""
        try:
            reply = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        except urllib.error.HTTPError as e:
            detail = e.read().decode("utf-8", "replace")
            raise ComfyError(f"ComfyUI rejected the prompt ({e.code}): {detail}") from None
        if reply.get("node_errors"):
            raise ComfyError(f"ComfyUI reported node errors: {json.dumps(reply['node_errors'])}")
        return reply["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)

    def queue(self) -> dict:
        return self.get("/queue")

    def is_running(self, prompt_id: str) -> bool:
        return any(item[1] == prompt_id for item in self.queue().get("queue_running", []))

    def wait(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.25) -> dict:
        """Wait for a prompt to finish and return its history entry.

        The entry holds "outputs" (per node, e.g. {"images": [...]}) and
        "status" {"status_str": "success"|"error", "completed", "messages"};
        see execution_error() and was_interrupted().
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry is not None and entry.get("status") is not None:
                return entry
            if self._proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited (code {self._proc.returncode}) while running "
                                 f"{prompt_id}; log:\n{self.log_tail()}")
            time.sleep(poll)
        raise ComfyError(f"prompt {prompt_id} did not finish within {timeout:.0f} s; "
                         f"log:\n{self.log_tail()}")

    def wait_running(self, prompt_id: str, timeout: float = 60.0) -> None:
        """Wait until the prompt is the one executing (e.g. before interrupting it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.is_running(prompt_id):
                return
            if self.history(prompt_id) is not None:
                raise ComfyError(f"prompt {prompt_id} finished before it was seen running")
            time.sleep(0.1)
        raise ComfyError(f"prompt {prompt_id} did not start within {timeout:.0f} s")

    def interrupt(self, prompt_id: str | None = None) -> None:
        self.post("/interrupt", {"prompt_id": prompt_id} if prompt_id else {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self.post("/free", {"unload_models": unload_models, "free_memory": free_memory})


# --- logs -------------------------------------------------------------------
LORA_KEY_NOT_LOADED = "lora key not loaded"


def lora_keys_not_loaded(log: str) -> list[str]:
    """The keys ComfyUI's LoRA loader ignored: it logs `lora key not loaded: <key>` per unmatched key."""
    return [line.split(LORA_KEY_NOT_LOADED, 1)[1].lstrip(": ").strip()
            for line in log.splitlines() if LORA_KEY_NOT_LOADED in line]


def wait_until(predicate, timeout: float, poll: float = 0.1, what: str = "condition"):
    """Poll `predicate()` until it returns something truthy, and return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise ComfyError(f"timed out after {timeout:.0f} s waiting for {what}")
