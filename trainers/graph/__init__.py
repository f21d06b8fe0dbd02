"""ComfyUI graphs without ComfyUI: the two workflow formats, and a client that runs a workflow on a server."""
