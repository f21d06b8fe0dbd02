"""BLIP captioning: tiny random BLIP / BLIP-2 folders saved in a models/blip folder and loaded
back through the same code as real weights; batching, prompts, caption files and policies."""
import argparse
import os

import numpy as np
import pytest
import torch
from PIL import Image

from trainers.captioning import blip as blip_mod
from trainers.cli.caption import add_caption_command
from trainers.core import host
from trainers.captioning.blip import CaptionError, apply_affixes, caption_images, load_blip
from trainers.captioning.folders import caption_folder

WORDS = ("a photo of the dog cat man woman sitting on beach with red blue house tree car in grass "
         "standing next to small big green field road").split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _tokenizer():
    from transformers import BertTokenizer

    vocab = {w: i for i, w in enumerate(SPECIALS + WORDS)}
    try:
        return BertTokenizer(vocab=vocab)  # transformers 5
    except TypeError:  # transformers 4 reads a vocab.txt
        import tempfile
        path = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        with open(path, "w") as f:
            f.write("\n".join(vocab) + "\n")
        return BertTokenizer(vocab_file=path)


def _image_processor():
    try:
        from transformers import BlipImageProcessorPil as cls  # transformers 5 without torchvision
    except ImportError:
        from transformers import BlipImageProcessor as cls
    return cls(size={"height": 32, "width": 32})


def _tiny_vision():
    return dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4,
                image_size=32, patch_size=8, initializer_range=0.02)  # BLIP's default 1e-10 ignores the image


def save_tiny_blip(folder):
    """The blip-image-captioning layout in miniature. Special tokens are banned from the output
    (a large negative logit bias), so every caption is exactly max_length vocabulary words."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor

    tok = _tokenizer()
    config = BlipConfig(
        vision_config=_tiny_vision(), projection_dim=32,
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                         num_attention_heads=4, encoder_hidden_size=32, max_position_embeddings=64,
                         initializer_range=0.5,  # large enough that the image changes the words
                         pad_token_id=0, bos_token_id=2, sep_token_id=3, eos_token_id=3))
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.text_decoder.cls.predictions.bias[: len(SPECIALS)] = -1e4
    model.save_pretrained(folder)
    BlipProcessor(image_processor=_image_processor(), tokenizer=tok).save_pretrained(folder)
    return folder


def save_tiny_blip2(folder):
    """BLIP-2 in miniature: vision tower, Q-Former and an OPT decoder."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor

    processor = Blip2Processor(image_processor=_image_processor(), tokenizer=_tokenizer(), num_query_tokens=4)
    tok = processor.tokenizer
    config = Blip2Config(
        vision_config=_tiny_vision(), num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"),
        qformer_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                            num_attention_heads=4, encoder_hidden_size=32),
        text_config=dict(model_type="opt", vocab_size=len(tok), hidden_size=32, ffn_dim=37, num_hidden_layers=1,
                         num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=64,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3))
    torch.manual_seed(0)
    Blip2ForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_tiny_blip(str(root / "blip" / "tiny-blip"))
    save_tiny_blip2(str(root / "blip" / "tiny-blip2"))
    return str(root)


@pytest.fixture
def blip_host(models_dir):
    previous = host._local["models"]
    host.configure(models_dir=models_dir)
    yield models_dir
    blip_mod.unload()
    host._local["models"] = previous


@pytest.fixture
def blip(blip_host):
    return load_blip("tiny-blip", device="cpu")


def _photo(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _words_ok(caption):
    return caption and all(w in WORDS for w in caption.split())


# ----------------------------------------------------------------------------- loading

def test_models_folder_is_listed_and_loaded_once(blip_host):
    assert blip_mod.list_blip_models() == ["tiny-blip", "tiny-blip2"]
    first = load_blip("tiny-blip", device="cpu")
    assert first.kind == "blip" and first.dtype == torch.float32 and first.device.type == "cpu"
    assert first.source == os.path.join(blip_host, "blip", "tiny-blip")
    assert load_blip("tiny-blip", device="cpu", dtype="auto") is first  # kept between runs

    other = load_blip("tiny-blip", device="cpu", dtype="bf16")  # another key replaces it
    assert other is not first and other.model.dtype == torch.bfloat16
    assert first.managed.module is None and list(blip_mod._cache.values()) == [other]
    assert blip_mod.unload() is True and blip_mod._cache == {}
    with pytest.raises(CaptionError, match="unloaded"):
        caption_images(other, [_photo(0)])


def test_missing_model_error_names_the_blip_folder(blip_host):
    folder = os.path.join(blip_host, "blip")
    for name in ("", "no-such-model", os.path.join(blip_host, "nowhere")):
        with pytest.raises(CaptionError) as err:
            load_blip(name, device="cpu")
        assert folder in str(err.value)


def test_hub_id_only_leaves_the_machine_when_typed(blip_host, monkeypatch):
    import transformers

    calls = []

    def offline(source, **kwargs):
        calls.append((source, kwargs.get("local_files_only")))
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(CaptionError) as err:
        load_blip("Salesforce/blip-image-captioning-base", device="cpu")
    assert os.path.join(blip_host, "blip") in str(err.value)
    with pytest.raises(CaptionError):
        load_blip("tiny-blip", device="cpu")
    assert calls == [("Salesforce/blip-image-captioning-base", False),
                     (os.path.join(blip_host, "blip", "tiny-blip"), True)]


def test_blip2_layout_loads_and_captions(blip_host):
    captioner = load_blip("tiny-blip2", device="cpu")
    assert captioner.kind == "blip-2"
    captions = caption_images(captioner, [_photo(1), _photo(2)], prefix_prompt="a photo of",
                              num_beams=2, min_length=2, max_length=4)
    assert len(captions) == 2
    for c in captions:  # the image tokens and the prompt are not echoed back
        assert all(w in WORDS for w in c.split()) and 0 < len(c.split()) <= 4


# ----------------------------------------------------------------------------- captioning

def test_batched_captions_match_one_by_one(blip):
    images = [_photo(i) for i in range(5)]
    seen = []
    batched = caption_images(blip, images, batch_size=2, max_length=6, progress=lambda d, t: seen.append((d, t)))
    single = [caption_images(blip, [img], batch_size=1, max_length=6)[0] for img in images]
    assert batched == single
    assert seen == [(2, 5), (4, 5), (5, 5)]
    assert all(_words_ok(c) and len(c.split()) == 6 for c in batched)
    assert len(set(batched)) > 1  # the captions depend on the image


@pytest.mark.parametrize("prompt", ["", "a photo of"])
def test_shared_cross_attention_cache_gives_the_same_captions(blip, monkeypatch, prompt):
    images = [_photo(i) for i in range(4)]
    fast = caption_images(blip, images, prefix_prompt=prompt, num_beams=3, batch_size=4, max_length=8)
    monkeypatch.setattr(blip_mod, "SHARED_CROSS_CACHE", False)
    plain = caption_images(blip, images, prefix_prompt=prompt, num_beams=3, batch_size=4, max_length=8)
    assert fast == plain and len(set(fast)) > 1


def test_conditional_prompt_is_not_echoed(blip):
    plain = caption_images(blip, [_photo(3)], max_length=5)[0]
    prompted = caption_images(blip, [_photo(3)], prefix_prompt="  a photo  of ", max_length=5)[0]
    assert len(prompted.split()) == 5 and _words_ok(prompted)  # 5 new words, "a photo of" stripped
    assert prompted != plain  # the prompt conditioned the generation


def test_sampling_is_seeded(blip):
    images = [_photo(4), _photo(5)]
    a = caption_images(blip, images, do_sample=True, num_beams=1, seed=7, max_length=8)
    b = caption_images(blip, images, do_sample=True, num_beams=1, seed=7, max_length=8)
    c = caption_images(blip, images, do_sample=True, num_beams=1, seed=8, max_length=8)
    assert a == b and a != c


def test_max_length_wins_over_min_length(blip):
    assert len(caption_images(blip, [_photo(0)], min_length=9, max_length=4)[0].split()) == 4


def test_cancel_during_generation_stops_it(blip):
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 3:  # once before the batch, then per generated token
            raise host.Interrupted("stop")

    with pytest.raises(host.Interrupted):
        caption_images(blip, [_photo(0), _photo(1)], max_length=20, check_interrupt=check)
    assert len(calls) == 3


def _node_converter():
    """nodes/convert.py's IMAGE -> PIL converter, as ComfyUI imports the pack (the one converter for every node)."""
    import importlib

    from pack_loader import load_pack

    return importlib.import_module(f"{load_pack().__name__}.nodes.convert").image_to_pil


def test_images_from_comfy_tensor():
    batch = torch.zeros(2, 4, 5, 3)
    batch[0, 1, 2] = torch.tensor([1.0, 0.5, 0.0])
    image_to_pil = _node_converter()
    images = image_to_pil(batch)
    assert [im.size for im in images] == [(5, 4), (5, 4)] and images[0].mode == "RGB"
    assert images[0].getpixel((2, 1)) == (255, 128, 0)
    grey = image_to_pil(torch.full((3, 3, 1), 0.2))
    assert len(grey) == 1 and grey[0].getpixel((0, 0)) == (51, 51, 51)


def test_affixes():
    assert apply_affixes("a man in a suit", "a photo of sks person", "") == "a photo of sks person, a man in a suit"
    assert apply_affixes("a man , smiling ", "sks, ", ", studio light") == "sks, a man, smiling, studio light"
    # already present as a part: not repeated (re-running 'append' keeps one trigger word)
    assert apply_affixes("sks, a man, studio light", "sks", "Studio  light") == "sks, a man, studio light"
    assert apply_affixes("sksman on a beach", "sks", "") == "sks, sksman on a beach"
    assert apply_affixes("", "sks", "") == "sks"
    assert apply_affixes("a dog") == "a dog"


# ----------------------------------------------------------------------------- folders

@pytest.fixture
def photo_folder(tmp_path):
    for i, name in enumerate(("a.jpg", "b.png", "c.jpg")):
        _photo(10 + i, (64, 48)).save(tmp_path / name)
    (tmp_path / "b.txt").write_text("old caption\n", encoding="utf-8")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    (tmp_path / "notes.md").write_text("dataset notes")
    return tmp_path


def _count_generated(monkeypatch):
    seen = []
    real = blip_mod._generate

    def counting(captioner, batch, prompt, kwargs):
        seen.extend(batch)
        return real(captioner, batch, prompt, kwargs)

    monkeypatch.setattr(blip_mod, "_generate", counting)
    return seen


def test_folder_keep_policy_skips_captioned_and_broken(blip, photo_folder, monkeypatch):
    seen = _count_generated(monkeypatch)
    report = caption_folder(blip, str(photo_folder), policy="keep", prefix="sks person", max_length=4)
    assert len(seen) == 2  # a.jpg and c.jpg only: the model never saw b.png
    assert (photo_folder / "b.txt").read_text() == "old caption\n"
    for name in ("a", "c"):
        text = (photo_folder / f"{name}.txt").read_text(encoding="utf-8")
        assert text.endswith("\n") and text.startswith("sks person, ")
        assert _words_ok(text[len("sks person, "):].strip())
    assert not (photo_folder / "broken.txt").exists()
    skipped = {os.path.basename(p): why for p, why in report.skipped}
    assert set(skipped) == {"broken.jpg", "notes.md"}
    assert "damaged" in skipped["broken.jpg"] or "not an image" in skipped["broken.jpg"]
    assert [os.path.basename(p) for p in report.kept] == ["b.png"]
    assert sorted(os.path.basename(p) for p in report.written) == ["a.txt", "c.txt"]
    assert "Captioned 2 image(s)" in report.summary() and "broken.jpg" in report.summary()


def test_folder_overwrite_and_append(blip, photo_folder):
    caption_folder(blip, str(photo_folder), policy="overwrite", suffix="sks", max_length=4)
    new_b = (photo_folder / "b.txt").read_text().strip()
    assert "old caption" not in new_b and new_b.endswith(", sks") and len(new_b.split(",")[0].split()) == 4

    report = caption_folder(blip, str(photo_folder), policy="append", suffix="sks", max_length=4)
    appended = (photo_folder / "b.txt").read_text().strip()
    caption = new_b[: -len(", sks")]
    assert appended == f"{caption}, sks, {caption}"  # same image, same caption; the suffix once
    assert report.captions[str(photo_folder / "b.png")] == appended


def test_folder_reads_captions_as_training_does(blip, photo_folder):
    """keep/append read the existing caption with the one reader (data.captions.read_caption): lines
    joined with ", "; a caption that is not UTF-8 skips its image with the reason, overwrite replaces it."""
    (photo_folder / "b.txt").write_text("a man\n\n  smiling \n", encoding="utf-8")
    (photo_folder / "c.txt").write_bytes(b"caf\xe9\n")  # Latin-1, not UTF-8
    report = caption_folder(blip, str(photo_folder), policy="keep", max_length=4)
    assert report.captions[str(photo_folder / "b.png")] == "a man, smiling"
    skipped = {os.path.basename(p): why for p, why in report.skipped}
    assert "not UTF-8" in skipped["c.jpg"] and "c.txt" in skipped["c.jpg"]
    assert (photo_folder / "c.txt").read_bytes() == b"caf\xe9\n"  # left as it was
    report = caption_folder(blip, str(photo_folder), policy="overwrite", max_length=4)
    assert "c.jpg" not in {os.path.basename(p) for p, _ in report.skipped}
    assert (photo_folder / "c.txt").read_text(encoding="utf-8").strip()


def test_folder_cancel_leaves_only_complete_files(blip, tmp_path):
    for i in range(4):
        _photo(i).save(tmp_path / f"img{i}.png")

    def cancel_after_first(done, total):
        if done == 1:
            host.request_interrupt()

    with pytest.raises(host.Interrupted):
        caption_folder(blip, str(tmp_path), batch_size=1, max_length=4, progress=cancel_after_first)
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if not n.endswith(".png")] == ["img0.txt"]  # no half-written or temp files
    assert _words_ok((tmp_path / "img0.txt").read_text().strip())


def test_same_stem_images_do_not_share_a_caption(blip, tmp_path):
    _photo(0).save(tmp_path / "x.jpg")
    _photo(1).save(tmp_path / "x.png")
    report = caption_folder(blip, str(tmp_path), max_length=3)
    assert len(report.written) == 1 and [os.path.basename(p) for p, _ in report.skipped] == ["x.png"]


def test_missing_folder_and_bad_policy(blip, tmp_path):
    with pytest.raises(CaptionError, match="does not exist"):
        caption_folder(blip, str(tmp_path / "nope"))
    with pytest.raises(CaptionError, match="policy"):
        caption_folder(blip, str(tmp_path), policy="replace")


def test_command_line(blip_host, photo_folder, capsys):
    parser = argparse.ArgumentParser()
    add_caption_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["caption", str(photo_folder), "--model", "tiny-blip", "--device", "cpu",
                              "--policy", "overwrite", "--prefix", "sks", "--max-length", "3", "--beams", "1"])
    assert args.func(args) == 0
    assert "Captioned 3 image(s)" in capsys.readouterr().out
    assert (photo_folder / "b.txt").read_text().startswith("sks, ")

    args = parser.parse_args(["caption", str(photo_folder), "--model", "missing"])
    assert args.func(args) == 2
    assert os.path.join(blip_host, "blip") in capsys.readouterr().err


def test_command_keeps_a_main_parser_models_dir(tmp_path):
    parser = argparse.ArgumentParser()
    parser.add_argument("--models-dir")  # as `python -m trainers --models-dir DIR caption ...`
    add_caption_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--models-dir", str(tmp_path), "caption", str(tmp_path), "--model", "m"])
    assert args.models_dir == str(tmp_path)
    args = parser.parse_args(["caption", str(tmp_path), "--model", "m", "--models-dir", "elsewhere"])
    assert args.models_dir == "elsewhere"


# ----------------------------------------------------------------------------- inside ComfyUI

COMFY_SCRIPT = r'''
import os, sys
sys.argv = [sys.argv[0], "--cpu"]
sys.path[:0] = [os.getcwd(), os.environ["PACK_ROOT"], os.path.join(os.environ["PACK_ROOT"], "tests")]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.model_management as mm
import folder_paths
from trainers.captioning import blip as blip_mod
from trainers.core import host
import test_captioning as t

folder_paths.models_dir = os.environ["MODELS"]
t.save_tiny_blip(os.path.join(os.environ["MODELS"], "blip", "tiny-blip"))
assert host.in_comfyui() and blip_mod.list_blip_models() == ["tiny-blip"]
cap = blip_mod.load_blip("tiny-blip")
# ComfyUI runs on the CPU here; give the model the patcher a GPU model gets, to drive that path.
patcher = cap.managed._patcher = host._comfy_patcher(cap.model, torch.device("cpu"))
registered = lambda: [m for m in mm.current_loaded_models if m.model is patcher]
imgs = [t._photo(1), t._photo(2)]
first = blip_mod.caption_images(cap, imgs, max_length=5)
assert len(registered()) == 1
assert registered()[0].model_unload(memory_to_free=1000) is False  # ComfyUI offloads part of it
assert patcher.model.model_lowvram
assert blip_mod.caption_images(cap, imgs, max_length=5) == first  # brought back whole
assert not patcher.model.model_lowvram
mm.unload_all_models()
assert not registered()
assert blip_mod.caption_images(cap, imgs, max_length=5) == first and len(registered()) == 1
blip_mod.unload()
assert not registered()
print("COMFY-OK")
'''


@pytest.mark.comfyui
@pytest.mark.skipif(not os.environ.get("COMFYUI_DIR"), reason="set COMFYUI_DIR to a ComfyUI checkout")
def test_comfyui_memory_manager_can_offload_and_reload(tmp_path):
    import subprocess
    import sys

    comfy = os.path.abspath(os.environ["COMFYUI_DIR"])
    python = os.path.join(comfy, "venv", "bin", "python")
    env = dict(os.environ, PACK_ROOT=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               MODELS=str(tmp_path))
    run = subprocess.run([python if os.path.exists(python) else sys.executable, "-c", COMFY_SCRIPT],
                         cwd=comfy, env=env, capture_output=True, text=True, timeout=300)
    assert "COMFY-OK" in run.stdout, run.stdout + run.stderr


# ----------------------------------------------------------------------------- nodes

PACK = "_personalize_caption_nodes_only"  # a subprocess imports just nodes/caption.py
IMPORT_NODE_MODULE = f'''
import importlib, os, sys, types
root = sys.argv[1]
for name, path in (("{PACK}", root), ("{PACK}.nodes", os.path.join(root, "nodes"))):
    package = types.ModuleType(name)
    package.__path__ = [path]
    sys.modules.setdefault(name, package)
module = importlib.import_module("{PACK}.nodes.caption")
'''


@pytest.fixture
def caption_nodes(models_dir):
    """nodes/caption.py imported as ComfyUI does, inside a package (its imports are relative)."""
    import sys

    from pack_loader import load_pack

    pack = load_pack().__name__
    module = sys.modules[f"{pack}.nodes.caption"]
    pack_host = sys.modules[f"{pack}.trainers.core.host"]
    previous = pack_host._local["models"]
    pack_host.configure(models_dir=models_dir)
    yield module
    sys.modules[f"{pack}.trainers.captioning.blip"].unload()
    pack_host._local["models"] = previous


def test_node_module_import_is_cheap():
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = IMPORT_NODE_MODULE + "print(sorted(m for m in ('transformers', 'torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code, root], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _node_kwargs(**over):
    kw = dict(model="tiny-blip", hub_id="", prompt="a photo of", prefix="sks person", suffix="", decoding="beam search",
              num_beams=2, min_length=2, max_length=4, batch_size=2, seed=0, device="cpu", dtype="auto",
              keep_loaded=True)
    return {**kw, **over}


def test_nodes_caption_images_and_folder_then_unload(caption_nodes, tmp_path):
    nodes = caption_nodes
    assert set(nodes.NODE_CLASS_MAPPINGS) == set(nodes.NODE_DISPLAY_NAME_MAPPINGS)
    inputs = nodes.BlipCaptionImages.INPUT_TYPES()["required"]
    assert inputs["model"][0] == ["tiny-blip", "tiny-blip2", nodes.HUB_CHOICE]
    assert all("tooltip" in spec[1] for spec in inputs.values())

    images = torch.rand(3, 40, 48, 3)  # ComfyUI IMAGE: [B,H,W,C] in 0..1
    captions, text = nodes.BlipCaptionImages().caption(images, **_node_kwargs())
    assert len(captions) == 3 and text == "\n".join(captions)
    assert all(c.startswith("sks person, ") and len(c.split(", ", 1)[1].split()) == 4 for c in captions)

    for i in range(2):
        _photo(i).save(tmp_path / f"{i}.png")
    out = nodes.BlipCaptionFolder().caption(str(tmp_path), "keep", **_node_kwargs())
    assert out["result"] == (out["ui"]["text"][0], str(tmp_path))
    assert "Captioned 2 image(s)" in out["result"][0]
    assert (tmp_path / "0.txt").read_text().startswith("sks person, ")

    assert nodes.UnloadBlip().unload()["result"] == ("BLIP unloaded.",)
    assert nodes.UnloadBlip().unload()["result"] == ("No BLIP model was loaded.",)

    nodes.BlipCaptionImages().caption(images[:1], **_node_kwargs(keep_loaded=False))
    assert nodes.UnloadBlip().unload()["result"] == ("No BLIP model was loaded.",)  # freed after its run


def test_node_without_a_model_names_the_folder(caption_nodes, models_dir):
    nodes = caption_nodes
    with pytest.raises(ValueError) as err:
        nodes.BlipCaptionImages().caption(torch.rand(1, 8, 8, 3), **_node_kwargs(model=nodes.HUB_CHOICE))
    assert os.path.join(models_dir, "blip") in str(err.value)
