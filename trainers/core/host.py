"""The one place where the engine touches its host.

Inside ComfyUI this wraps `folder_paths`, `comfy.utils.ProgressBar` and
`comfy.model_management`; outside it (tests, the command line, `accelerate
launch`) it falls back to plain folders and no-op progress. Nothing else in
`trainers/` imports ComfyUI.
"""
from __future__ import annotations

import os
import threading

try:  # ComfyUI's top-level modules exist only inside a running ComfyUI.
    import folder_paths as _fp  # type: ignore
except Exception:  # pragma: no cover - depends on the host
    _fp = None

_local = {"models": None, "output": None, "temp": None, "input": None}
_interrupt = threading.Event()

# Sub-folders of the models root, by ComfyUI folder name, for the fallback.
_FALLBACK_SUBDIRS = {"checkpoints": "checkpoints", "loras": "loras", "vae": "vae",
                     "embeddings": "embeddings", "diffusers": "diffusers", "blip": "blip"}
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class Interrupted(Exception):
    """Raised at a step boundary when the user asked to stop (outside ComfyUI)."""


def in_comfyui() -> bool:
    return _fp is not None


def configure(models_dir: str | None = None, output_dir: str | None = None,
              temp_dir: str | None = None, input_dir: str | None = None) -> None:
    """Set the folders used outside ComfyUI (command line, tests)."""
    for key, value in (("models", models_dir), ("output", output_dir), ("temp", temp_dir), ("input", input_dir)):
        if value is not None:
            _local[key] = os.path.abspath(value)


def _fallback_root(kind: str) -> str:
    if _local[kind]:
        return _local[kind]
    comfy = os.environ.get("COMFYUI_DIR")
    env = os.environ.get(f"PERSONALIZE_{kind.upper()}_DIR")
    if env:
        return os.path.abspath(env)
    if comfy:
        return os.path.join(os.path.abspath(comfy), kind)
    return os.path.abspath(kind)


def model_dirs(folder: str) -> list[str]:
    """Every directory the host searches for models of this kind ("checkpoints", "loras", ...)."""
    if _fp is not None:
        try:
            return list(_fp.get_folder_paths(folder))
        except Exception:
            pass
    return [os.path.join(_fallback_root("models"), _FALLBACK_SUBDIRS.get(folder, folder))]


def register_model_folder(folder: str, extensions=MODEL_EXTENSIONS) -> None:
    """Add models/<folder> to ComfyUI's registry (a no-op outside ComfyUI)."""
    if _fp is None or folder in getattr(_fp, "folder_names_and_paths", {}):
        return
    _fp.add_model_folder_path(folder, os.path.join(_fp.models_dir, folder))
    entry = _fp.folder_names_and_paths.get(folder)
    if entry is not None:
        _fp.folder_names_and_paths[folder] = (entry[0], set(extensions))


def list_models(folder: str, extensions=MODEL_EXTENSIONS, include_dirs: bool = False,
                dir_markers=("model_index.json",)) -> list[str]:
    """Relative names of the model files (and, optionally, model folders) the host knows.

    A model folder is one holding any of `dir_markers` (diffusers: model_index.json;
    transformers models such as BLIP: config.json); its own files are not listed.
    """
    if _fp is not None and not include_dirs:
        try:
            return list(_fp.get_filename_list(folder))
        except Exception:
            pass
    names = set()
    for root in model_dirs(folder):
        if not os.path.isdir(root):
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            rel = os.path.relpath(dirpath, root)
            if include_dirs and rel != "." and any(m in filenames for m in dir_markers):
                names.add(rel.replace(os.sep, "/"))
                dirnames[:] = []
                continue
            for f in filenames:
                if f.lower().endswith(tuple(extensions)):
                    names.add(os.path.normpath(os.path.join(rel, f)).replace(os.sep, "/"))
    return sorted(names)


def resolve_model(folder: str, name: str, allow_absolute: bool = False) -> str:
    """Full path of a model named as in a dropdown; a clear error says where to put it.

    The name is taken inside the folder as ComfyUI does ('../' cannot climb out of it). Only
    the command line passes `allow_absolute`, for a full path the local user typed.
    """
    if allow_absolute and os.path.isabs(name) and os.path.exists(name):
        return name
    inside = os.path.relpath(os.path.join(os.sep, str(name or "")), os.sep)  # '/a/../../b' -> 'b'
    for root in model_dirs(folder):
        path = os.path.join(root, inside)
        if inside != "." and os.path.exists(path):
            return path
    raise FileNotFoundError(
        f"Model '{name}' was not found in the '{folder}' folders: {', '.join(model_dirs(folder))}. "
        f"Put the file (or diffusers folder) there, or pick one from the dropdown.")


def output_dir() -> str:
    if _fp is not None:
        return _fp.get_output_directory()
    return _fallback_root("output")


def temp_dir() -> str:
    if _fp is not None:
        return _fp.get_temp_directory()
    return _local["temp"] or os.path.join(output_dir(), "..", "temp")


def input_dir() -> str:
    """ComfyUI's input folder; outside ComfyUI the current folder (relative paths mean what they say)."""
    if _fp is not None:
        return _fp.get_input_directory()
    return _local["input"] or os.getcwd()


def cache_dir() -> str:
    """Where the pack keeps its own caches (file hashes): inside ComfyUI the models root, which
    /view does not serve (it serves input, output and temp); outside it the temp folder."""
    if _fp is not None:
        return os.path.join(_fp.models_dir, ".personalize_cache")
    return temp_dir()


def writable_roots() -> list[str]:
    """Folders the pack may write models and results into: model folders, output and temp."""
    roots = [output_dir(), temp_dir()]
    for folder in ("loras", "checkpoints", "embeddings"):
        roots += model_dirs(folder)
    return [os.path.realpath(r) for r in roots]


def model_roots() -> list[str]:
    """Every model folder the host knows (extra_model_paths included); not custom_nodes, which holds code."""
    if _fp is None:
        return [_fallback_root("models")]
    return [p for name, (paths, _) in _fp.folder_names_and_paths.items() if name != "custom_nodes" for p in paths]


def tokenizer_dir(family: str = "sd1") -> str | None:
    """A local CLIP tokenizer folder: one the user put in models/clip/tokenizer, else the one
    ComfyUI ships for SD1.x/SDXL's CLIP-L."""
    candidates = [os.path.join(d, "tokenizer") for d in model_dirs("clip")]
    comfy_root = None
    if _fp is not None:
        comfy_root = os.path.dirname(os.path.abspath(_fp.__file__))
    elif os.environ.get("COMFYUI_DIR"):
        comfy_root = os.environ["COMFYUI_DIR"]
    if comfy_root:
        candidates.append(os.path.join(comfy_root, "comfy", "sd1_tokenizer"))
    for path in candidates:
        if os.path.isfile(os.path.join(path, "vocab.json")):
            return path
    return None


class Progress:
    """Step progress: ComfyUI's progress bar (with an optional preview) or a no-op."""

    def __init__(self, total: int, node_id=None):
        self.total = total
        self._bar = None
        try:
            import comfy.utils  # type: ignore
            self._bar = comfy.utils.ProgressBar(total, node_id=node_id)
        except Exception:
            self._bar = None

    def update(self, value: int, preview=None, text: str | None = None) -> None:
        if self._bar is None:
            return
        self._bar.update_absolute(value, self.total, ("JPEG", preview, 512) if preview is not None else None)
        if text:
            _send_progress_text(text)


def _send_progress_text(text: str) -> None:
    """A status line under the running node (ComfyUI's progress text channel), when the host has one."""
    try:
        from comfy_execution.utils import get_executing_context  # type: ignore
        from server import PromptServer  # type: ignore

        context = get_executing_context()
        if context is not None and hasattr(PromptServer.instance, "send_progress_text"):
            PromptServer.instance.send_progress_text(text, context.node_id)
    except Exception:  # an older ComfyUI without the channel: the progress bar alone
        pass


def _event_target():
    """(ComfyUI's PromptServer, get_executing_context) inside a running ComfyUI, else None."""
    try:
        from comfy_execution.utils import get_executing_context  # type: ignore
        from server import PromptServer  # type: ignore

        server = PromptServer.instance
    except Exception:
        return None
    return (server, get_executing_context) if server is not None else None


def live_events() -> bool:
    """Whether send_event reaches a page (the loop asks once per run, not per step)."""
    return _event_target() is not None


def send_event(kind: str, data: dict) -> None:
    """Send "personalize.<kind>" to the page that queued the running prompt (web/live.js), with the
    executing node's id added as "node"; a no-op outside ComfyUI."""
    target = _event_target()
    if target is None:
        return
    server, executing = target
    context = executing()
    # As ComfyUI's own progress hook: the executing context, else the server's last node.
    node = context.node_id if context is not None else getattr(server, "last_node_id", None)
    prompt = context.prompt_id if context is not None else getattr(server, "last_prompt_id", None)
    server.send_sync("personalize." + kind, {**data, "node": node, "prompt_id": prompt},
                     getattr(server, "client_id", None))  # node ids belong to that page's graph


def output_ref(path: str) -> dict | None:
    """{filename, subfolder, type: "output"} of a file inside the output folder, as ComfyUI's /view route takes
    it; None for a file elsewhere."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(output_dir()))
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return None
    subfolder, filename = os.path.split(rel)
    return {"filename": filename, "subfolder": subfolder.replace(os.sep, "/"), "type": "output"}


def add_json_route(path: str, handler) -> bool:
    """Serve GET `path` on ComfyUI's server (and /api`path`, as ComfyUI mirrors every route): `handler(query)` with
    the query string as a dict returns (HTTP status, JSON-able body). False outside ComfyUI: nothing to serve."""
    try:
        from aiohttp import web  # type: ignore
        from server import PromptServer  # type: ignore

        routes = PromptServer.instance.routes
    except Exception:
        return False

    async def handle(request):
        status, body = handler(dict(request.rel_url.query))
        return web.json_response(body, status=status)

    routes.get(path)(handle)
    return True


def request_interrupt() -> None:
    """Ask a running job to stop at its next step (used outside ComfyUI and by tests)."""
    _interrupt.set()


def check_interrupt() -> None:
    """Raise the host's interrupt exception if the user pressed Cancel."""
    if _interrupt.is_set():
        _interrupt.clear()
        raise Interrupted("stopped by request")
    try:
        import comfy.model_management as mm  # type: ignore
    except Exception:
        return
    mm.throw_exception_if_processing_interrupted()


def is_interrupt(exc: BaseException) -> bool:
    if isinstance(exc, (Interrupted, KeyboardInterrupt)):
        return True
    return type(exc).__name__ == "InterruptProcessingException"


def free_memory() -> None:
    """Unload what ComfyUI holds so a training run does not keep two copies in memory."""
    try:
        import comfy.model_management as mm  # type: ignore
    except Exception:
        return
    mm.unload_all_models()
    mm.soft_empty_cache()


def torch_device():
    """The device to compute on: ComfyUI's choice inside it, else CUDA or MPS when present."""
    import torch

    try:
        import comfy.model_management as mm  # type: ignore
        return mm.get_torch_device()
    except Exception:
        pass
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _comfy_patcher(module, device):
    """A comfy ModelPatcher around `module`, or None outside ComfyUI."""
    import torch

    try:
        import comfy.model_management as mm  # type: ignore
        import comfy.model_patcher  # type: ignore
    except Exception:
        return None
    # ModelPatcher assigns `.device`, which transformers models expose read-only: wrap.
    holder = torch.nn.Module()
    holder.inner = module
    return comfy.model_patcher.ModelPatcher(holder, load_device=device, offload_device=mm.unet_offload_device())


class ManagedModule:
    """A torch module kept loaded between runs that ComfyUI may offload when others need the memory.

    Inside ComfyUI a GPU module is registered with comfy.model_management through a
    ModelPatcher: `use()` asks ComfyUI to load it fully (unloading other models if the
    room is short), and ComfyUI moves it to its offload device (system RAM) when a
    later model needs the VRAM; the next `use()` brings it back. Outside ComfyUI, or
    on the CPU, `use()` simply puts the module on its device.
    """

    def __init__(self, module, device):
        import torch

        self.module = module
        self.device = torch.device(device)
        self._patcher = _comfy_patcher(module, self.device) if self.device.type != "cpu" else None

    def use(self):
        """The module, with its weights on its device (call before each run)."""
        if self._patcher is not None:
            import comfy.model_management as mm  # type: ignore
            mm.load_models_gpu([self._patcher], force_full_load=True)
        else:
            self.module.to(self.device)
        return self.module

    def release(self) -> None:
        """Drop the module; ComfyUI forgets it and the device memory is returned."""
        import gc

        import torch

        if self._patcher is not None:
            import comfy.model_management as mm  # type: ignore
            for i in range(len(mm.current_loaded_models) - 1, -1, -1):
                if mm.current_loaded_models[i].model is self._patcher:
                    mm.current_loaded_models.pop(i).model_unload()
            self._patcher = None
        self.module = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def sampler_choices() -> tuple[list[str], list[str]]:
    """ComfyUI's sampler and scheduler names (KSampler's lists); a minimal pair outside ComfyUI."""
    try:
        import comfy.samplers  # type: ignore
        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except Exception:
        return ["euler"], ["normal"]


def sample_latents(model, positive, negative, latent: dict, *, seed: int, steps: int, cfg: float,
                   sampler_name: str, scheduler: str):
    """Denoise `latent` with ComfyUI's own sampling, as its KSampler node does (inside ComfyUI only)."""
    import comfy.sample  # type: ignore

    image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(image, seed, latent.get("batch_index"))
    return comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative, image,
                               disable_pbar=True, seed=seed)


def release_cached(cache: dict) -> bool:
    """Release every loaded model in a module's cache ({key: holder with .managed and .model}) and empty it, for
    an Unload node; True if one was loaded."""
    had = bool(cache)
    for holder in cache.values():
        holder.managed.release()
        holder.model = None
    cache.clear()
    return had
