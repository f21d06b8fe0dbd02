"""The DreamBench metrics of the DreamBooth paper (arXiv 2208.12242), as raw cosines like its tables.

- DINO, CLIP-I: mean cosine similarity of the generated images' embeddings to the subject photos' (DINO ViT-S/16
  class token; CLIP ViT-B/32 image features), over every generated x photo pair.
- CLIP-T: mean cosine of each image to its prompt's CLIP text embedding, the identifier replaced by the class noun
  ("a sks dog on the beach" is scored as "a dog on the beach").
- DIV: mean pairwise LPIPS among the images of one prompt, averaged over prompts (higher: more varied).
- PRES: DINO similarity of the tuned model's class-prompt images ("a dog") to the subject photos; lower means the
  class kept its own look (prior preservation).
Each score carries the backbone it was computed with and how many pairs it averages.
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

import torch


@dataclass
class Score:
    value: float
    backbone: str
    count: int  # pairs (DINO, CLIP-I, PRES, DIV) or images (CLIP-T) averaged


def neutral_prompt(prompt: str, identifier: str, class_noun: str) -> str:
    """The prompt with the identifier (and a class noun right after it) replaced by the class noun."""
    if not identifier.strip():
        return prompt
    noun = re.escape(class_noun.strip()) if class_noun.strip() else None
    pattern = rf"\b{re.escape(identifier.strip())}\b" + (rf"(\s+{noun}\b)?" if noun else "")
    replaced = re.sub(pattern, class_noun.strip(), prompt)
    return re.sub(r"\s{2,}", " ", replaced).strip()


def similarity(backbone, generated: list, references: list) -> Score:
    """Mean cosine over every generated x reference pair (DINO, CLIP-I, PRES)."""
    a, b = backbone.embed_images(generated), backbone.embed_images(references)
    return Score((a @ b.T).mean().item(), backbone.name, len(generated) * len(references))


def self_similarity(backbone, references: list) -> Score:
    """Mean cosine over the distinct pairs of the photos themselves: the "real images" row of the paper's table."""
    e = backbone.embed_images(references)
    pairs = list(itertools.combinations(range(len(references)), 2))
    if not pairs:
        return Score(float("nan"), backbone.name, 0)
    return Score(sum((e[i] @ e[j]).item() for i, j in pairs) / len(pairs), backbone.name, len(pairs))


def clip_t(clip, images: list, prompts: list[str]) -> Score:
    """Mean cosine of each image to its own prompt (prompts[i] for images[i])."""
    img, txt = clip.embed_images(images), clip.embed_texts(prompts)
    return Score((img * txt).sum(-1).mean().item(), clip.name, len(images))


@torch.no_grad()
def diversity(lpips, groups: list[list]) -> Score:
    """Mean pairwise LPIPS within each group (one prompt's images), averaged over the groups that have a pair."""
    model = lpips.managed.use()
    means, pairs = [], 0
    for group in groups:
        if len(group) < 2:
            continue
        x = _to_lpips_input(group).to(lpips.device)
        i, j = zip(*itertools.combinations(range(len(group)), 2))
        d = model(x[list(i)], x[list(j)]).flatten()
        means.append(d.mean().item())
        pairs += len(d)
    return Score(sum(means) / len(means) if means else float("nan"), lpips.name, pairs)


def _to_lpips_input(images: list) -> torch.Tensor:
    """PIL images as one [-1, 1] batch at the first image's size."""
    import numpy as np

    size = images[0].size
    arrays = [np.asarray(im.convert("RGB").resize(size) if im.size != size else im.convert("RGB"), dtype=np.float32)
              for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
