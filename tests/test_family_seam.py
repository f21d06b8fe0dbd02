"""The family seam: the loop and the methods reach the text encoders, the conditioning and the UNet's arguments only
through the family (families/registry.py), so SDXL (pooled text, two encoders, size ids) only adds a family."""
import glob
import os
import re

import torch

from test_dataset_build import _bucket_folder, build
from test_train_lora import cfg_for, env, fresh  # noqa: F401 (fixtures)
from trainers.data.items import scan_folder
from trainers.families import registry
from trainers.families.conditioning import Conditioning
from trainers.training.loop import train

ROOT = os.path.join(os.path.dirname(__file__), "..", "trainers")


class PooledFamily(registry.SD1):
    """SD1 plus a pooled embedding (as SDXL has): records what reaches the UNet's arguments."""

    name = "pooled"
    seen = []

    def encode(self, comps, texts, text_encoders=None):
        cond = super().encode(comps, texts, text_encoders)
        pooled = torch.tensor([[float(len(t)), float(sum(map(ord, t)) % 997)] for t in texts])
        return Conditioning(cond.states, pooled)

    def unet_kwargs(self, cond, batch=None):
        self.seen.append((cond.pooled.clone(), [(it.original_size, it.crop_box) for it in batch.items],
                          list(batch.texts)))
        return super().unet_kwargs(cond, batch)


def test_pooled_conditioning_and_item_geometry_reach_the_unet_through_the_family(env, fresh, monkeypatch, tmp_path):
    dataset = build(_bucket_folder(tmp_path / "src"), settings={"mode": "buckets", "bucket_step": 16})
    geometry = {it.caption: (it.original_size, it.crop_box) for it in scan_folder(dataset.path)}
    sources = {it["caption"]: (tuple(it["source_size"]), tuple(it["crop_box"])) for it in dataset.items}
    assert geometry == sources and all(size and box for size, box in geometry.values())

    monkeypatch.setitem(registry.FAMILIES, "pooled", PooledFamily())
    PooledFamily.seen = []
    comps = fresh()
    comps.family = "pooled"
    train(cfg_for(env, dataset=dataset.path, trigger_word="", steps=4, resolution=64), components=comps)
    assert len(PooledFamily.seen) == 4
    for pooled, items, texts in PooledFamily.seen:
        # The caption cache kept each caption's pooled row with it...
        assert pooled.tolist() == [[float(len(t)), float(sum(map(ord, t)) % 997)] for t in texts]
        # ...and every sample's original size and crop box came along in the batch.
        assert items == [geometry[t] for t in texts]


def test_training_code_never_names_one_text_encoder_or_the_unet_arguments():
    single = re.compile(r"\.text_encoder\b(?!s)|encoder_hidden_states|added_cond_kwargs|StableDiffusion\w*Pipeline")
    for folder in ("training", "methods"):
        for path in glob.glob(os.path.join(ROOT, folder, "*.py")):
            source = open(path, encoding="utf-8").read()
            found = single.findall(source)
            assert not found, f"{folder}/{os.path.basename(path)} reaches past the family seam: {found}"
