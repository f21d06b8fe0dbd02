"""What every network type shares: attaching a peft adapter, naming its tensors in the file, loading them back.

A network type only says which peft config builds it, which peft parameters become which file suffixes,
the scale its loaders (ComfyUI, A1111) apply, and its `ss_network_*` metadata.
"""
from __future__ import annotations

import json

import torch

from .targets import UNET_PREFIX, kohya_stem, te_prefixes

ADAPTER = "default"


class PeftNetwork:
    name = ""
    module = ""  # ss_network_module
    tensors: dict = {}  # peft parameter dict on the layer -> file key suffix

    def peft_config(self, targets: list[str], rank: int, alpha: float, factor: int, rank_pattern: dict,
                    alpha_pattern: dict):
        raise NotImplementedError

    def attach(self, model, targets: list[str], rank: int, alpha: float, factor: int = -1, conv_rank: int = 0,
               conv_alpha: float = 0.0) -> list:
        """Add a trainable adapter to `model` on exactly these modules; base weights stay frozen. Spatial
        (3x3) convs get `conv_rank`/`conv_alpha` where given (kohya's conv_dim/conv_alpha; 0: rank/alpha).
        Returns the adapter's parameters (the only ones left with requires_grad)."""
        from peft import inject_adapter_in_model

        model.requires_grad_(False)
        spatial = [t for t in targets if is_spatial_conv(model.get_submodule(t))] if conv_rank else []
        config = self.peft_config(targets, rank, alpha, factor, {t: conv_rank for t in spatial},
                                  {t: conv_alpha or alpha for t in spatial})
        inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        names = tuple(self.tensors)
        params = [p for n, p in model.named_parameters() if any(f".{t}." in n for t in names)]
        for p in params:
            p.requires_grad_(True)
        for _, layer in self.layers(model):
            layer.scaling[ADAPTER] = self.scale(layer, float(self.alpha(layer)))
        return params

    def layers(self, model):
        """(module name, peft layer) for every module of `model` adapted by this network."""
        for name, module in model.named_modules():
            if any(ADAPTER in getattr(module, attr, {}) for attr in self.tensors):
                yield name, module

    def alpha(self, layer):
        return layer.alpha[ADAPTER]

    def scale(self, layer, alpha: float) -> float:
        """The factor the file's loaders multiply the weight change by (ComfyUI: alpha / rank)."""
        return alpha / layer.r[ADAPTER]

    def _tensor(self, layer, attr):
        value = getattr(layer, attr)[ADAPTER]
        return value.weight if isinstance(value, torch.nn.Module) else value

    def _stems(self, unet, text_encoders, unet_name=None):
        """(file stem, peft layer) of every adapted module. text_encoders: None, one model, or the family's list
        (all of them, in order: the prefix of each depends on how many there are). unet_name: the family's name of
        a UNet module in files (SDXL: the SGM name); default the diffusers name, as kohya's SD1.x files have."""
        if text_encoders is None:
            text_encoders = []
        elif not isinstance(text_encoders, (list, tuple)):
            text_encoders = [text_encoders]
        for model, prefix in ((unet, UNET_PREFIX), *zip(text_encoders, te_prefixes(len(text_encoders)))):
            for name, layer in self.layers(model):
                if unet_name is not None and model is unet:
                    name = unet_name(name)
                yield kohya_stem(name, prefix), layer

    def state_dict(self, unet, text_encoders=None, dtype=torch.float16, unet_name=None) -> dict:
        """The adapters as kohya / LyCORIS tensors: `<stem>.<suffix>` and `<stem>.alpha` as trained."""
        out = {}
        for stem, layer in self._stems(unet, text_encoders, unet_name):
            for attr, suffix in self.tensors.items():
                if ADAPTER in getattr(layer, attr):
                    out[f"{stem}.{suffix}"] = self._tensor(layer, attr).detach().to("cpu", dtype)
            out[f"{stem}.alpha"] = torch.tensor(float(self.alpha(layer)))
        return out

    def load(self, state_dict: dict, unet, text_encoders=None, unet_name=None) -> list[str]:
        """Copy file tensors into adapters already attached to the models; returns the stems it did not use."""
        layers = dict(self._stems(unet, text_encoders, unet_name))
        stems = {k.split(".")[0] for k in state_dict}
        for stem in stems & layers.keys():
            layer = layers[stem]
            with torch.no_grad():
                for attr, suffix in self.tensors.items():
                    if ADAPTER in getattr(layer, attr):
                        param = self._tensor(layer, attr)
                        param.copy_(state_dict[f"{stem}.{suffix}"].to(param.dtype))
            if f"{stem}.alpha" in state_dict:
                layer.scaling[ADAPTER] = self.scale(layer, float(state_dict[f"{stem}.alpha"]))
        return sorted(stems - layers.keys())

    def delta_weight(self, layer) -> torch.Tensor:
        """W' - W of one adapted module, in the module's weight shape."""
        return layer.get_delta_weight(ADAPTER).reshape(layer.get_base_layer().weight.shape)

    def network_args(self, cfg) -> dict:
        if cfg.preset != "locon":
            return {}
        return {"conv_dim": str(cfg.conv_rank or cfg.rank), "conv_alpha": str(cfg.conv_alpha or cfg.alpha)}

    def metadata(self, cfg) -> dict:
        return {"ss_network_module": self.module, "ss_network_dim": str(cfg.rank),
                "ss_network_alpha": str(cfg.alpha), "ss_network_args": json.dumps(self.network_args(cfg))}


def is_spatial_conv(module) -> bool:
    """A conv with a kernel larger than 1x1: what kohya's conv_dim applies to (1x1 convs take the network dim)."""
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


class LycorisNetwork(PeftNetwork):
    """LyCORIS algorithms: kohya's `lycoris.kohya` module with the algorithm named in its args."""
    module = "lycoris.kohya"

    def network_args(self, cfg) -> dict:
        return {"algo": self.name, **super().network_args(cfg)}
