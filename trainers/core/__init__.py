"""What every part shares: the run config, the host door (the only ComfyUI import), path policy, safe writes, run folders, checkpoints, dtypes."""
