"""The engine: plain Python, no ComfyUI import except core/host.py (the one door to the host).

Kept cheap: importing a sub-package loads only what it needs; heavy libraries load when work starts.
"""
