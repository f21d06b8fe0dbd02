"""Names typed into a widget and the write guard: a name never leaves its folder, whatever it holds, and a
LoRA is only ever written inside the host's writable folders. Also: when a caption already has the trigger."""
import copy
import os
import sys

import pytest

from pack_loader import load_pack
from test_train_lora import cfg_for
from trainers.core import host, path_policy, safe_io
from trainers.methods import base as method_base
from trainers.data.captions import with_trigger
from trainers.testing.demo import make_photos
from trainers.training.loop import train

RESERVED = ["CON", "PRN", "AUX", "NUL", *(f"COM{n}" for n in range(1, 10)), *(f"LPT{n}" for n in range(1, 10))]


def assert_safe_name(name: str, max_bytes: int = 120) -> None:
    """What any file system (Windows included) accepts as one plain entry of a folder."""
    assert name and name not in (".", "..")
    assert not any(c in name for c in '/\\:*?"<>|') and all(ord(c) >= 32 for c in name), repr(name)
    assert len(name.encode("utf-8")) <= max_bytes  # encodable: no lone surrogates
    assert name == name.strip(" .")  # Windows drops trailing dots and spaces
    assert name.split(".")[0].rstrip(" ").upper() not in RESERVED
    assert not os.path.isabs(name) and os.path.basename(name) == name


# ---- sanitize_name ---------------------------------------------------------------------

@pytest.mark.parametrize("hostile,kept", [
    ("..", "untitled"), ("../..", "untitled"), ("../../evil", "evil"), ("a/../b", "a_b"), ("./a/./b", "a_b"),
    ("/abs/evil", "abs_evil"), ("//server/share/x", "server_share_x"),
    ("..\\..\\evil", "evil"), ("a\\b", "a_b"), ("C:\\x", "C__x"), ("c:/Windows/x", "c__Windows_x"), ("C:", "C_"),
    ("a\x00b", "a_b"), ("line\nbreak\ttab\x1f\x7f", "line_break_tab_\x7f"),
    ("photo\ud800\udfffname", "photo__name"), ("\udcff", "_"),
    ("...hidden...", "hidden"), ("  spaced  ", "spaced"), ("", "untitled"), (None, "untitled"),
])
def test_sanitize_name_keeps_one_plain_entry(hostile, kept):
    name = safe_io.sanitize_name(hostile)
    assert name == kept
    assert_safe_name(name)


@pytest.mark.parametrize("reserved", RESERVED)
def test_windows_device_names_get_an_underscore_on_their_stem(reserved):
    for typed in (reserved, reserved.lower(), reserved.title()):
        assert safe_io.sanitize_name(typed) == typed + "_"
        assert safe_io.sanitize_name(typed + ".safetensors") == typed + "_.safetensors"
        assert safe_io.sanitize_name(typed + ".tar.gz") == typed + "_.tar.gz"
        assert safe_io.sanitize_name("folder/" + typed) == "folder_" + typed  # not a stem of its own any more
        assert_safe_name(safe_io.sanitize_name(typed + ".txt"))


def test_superscript_ports_and_names_that_only_look_reserved():
    assert safe_io.sanitize_name("COM\u00b9") == "COM\u00b9_"  # Windows reads ¹²³ as port digits too
    for plain in ("CONSOLE", "icon", "COM10", "COM0", "LPT", "nul1", "AUXiliary.txt", "my.con", "CON_"):
        assert safe_io.sanitize_name(plain) == plain


@pytest.mark.parametrize("text", ["é" * 70, "😀" * 40 + "x", "a€b😀" * 20, "ñ" * 3 + "x" * 200])
def test_byte_limit_never_cuts_a_character(text):
    for max_bytes in range(1, 64):
        name = safe_io.sanitize_name(text, default="d", max_bytes=max_bytes)
        assert len(name.encode("utf-8")) <= max_bytes
        assert name == "d" or text.startswith(name)  # whole characters from the start
        assert name == "d" or len(name.encode("utf-8")) > max_bytes - 4  # no more than one character dropped


def test_byte_limit_still_leaves_no_reserved_name_or_trailing_dot():
    assert safe_io.sanitize_name("CON.txt", max_bytes=5) == "CON_"
    assert safe_io.sanitize_name("CON      x", max_bytes=6) == "CON_"  # the cut leaves "CON" + spaces
    assert safe_io.sanitize_name("ab.cd", max_bytes=3) == "ab"
    assert_safe_name(safe_io.sanitize_name("lpt9" + "é" * 100, max_bytes=5), max_bytes=5)


# ---- ensure_inside and the write roots -------------------------------------------------

@pytest.fixture
def out_dirs(tmp_path):
    for name in ("out", "out2", "other"):
        (tmp_path / name).mkdir()
    return tmp_path


def test_ensure_inside_accepts_the_root_and_what_is_below_it(out_dirs):
    out = str(out_dirs / "out")
    for path in (out, out + os.sep, os.path.join(out, "a.bin"), os.path.join(out, "x", "..", "y", "z.bin")):
        assert safe_io.ensure_inside(path, [out]) == path
    assert safe_io.ensure_inside(str(out_dirs / "other" / "f"), [out, str(out_dirs / "other")])


@pytest.mark.parametrize("escape", [
    "../other/f", "..", "../out2/f", "../out2", "a/../../other/f", "../../f",
])
def test_ensure_inside_refuses_what_leaves_the_root(out_dirs, escape):
    out = str(out_dirs / "out")
    with pytest.raises(PermissionError, match="outside"):
        safe_io.ensure_inside(os.path.join(out, escape), [out])
    with pytest.raises(PermissionError):
        safe_io.ensure_inside(os.path.abspath(os.path.join(out, escape)), [out])


def test_ensure_inside_refuses_a_sibling_with_the_same_prefix(out_dirs):
    with pytest.raises(PermissionError):
        safe_io.ensure_inside(str(out_dirs / "out2" / "f"), [str(out_dirs / "out")])
    with pytest.raises(PermissionError):
        safe_io.ensure_inside(str(out_dirs / "out2"), [str(out_dirs / "out")])


def test_ensure_inside_follows_links_out(out_dirs):
    out = out_dirs / "out"
    os.symlink(out_dirs / "other", out / "link_dir")
    os.symlink(out_dirs / "other" / "target.bin", out / "link_file")  # dangling: still a way out
    for path in (out / "link_dir", out / "link_dir" / "f", out / "link_file"):
        with pytest.raises(PermissionError):
            safe_io.ensure_inside(str(path), [str(out)])
    os.symlink(out / "real", out / "inner_link")  # a link that stays inside is fine
    assert safe_io.ensure_inside(str(out / "inner_link" / "f"), [str(out)])


def test_ensure_inside_accepts_a_linked_root(out_dirs):
    os.symlink(out_dirs / "out", out_dirs / "alias")  # e.g. models/loras linked to another disk
    assert safe_io.ensure_inside(str(out_dirs / "out" / "f"), [str(out_dirs / "alias")])
    assert safe_io.ensure_inside(str(out_dirs / "alias" / "f"), [str(out_dirs / "out")])


def test_is_inside_refuses_a_sibling_with_the_same_prefix(out_dirs):
    """path_policy's check for the server's folders: /out2 is not inside /out."""
    out = os.path.realpath(out_dirs / "out")
    assert path_policy.is_inside(out, [out]) and path_policy.is_inside(os.path.join(out, "f"), [out])
    assert path_policy.is_inside(os.path.join(out, "f"), [out + os.sep])
    for outside in (out_dirs / "out2", out_dirs / "out2" / "f", out_dirs / "outer.png"):
        assert not path_policy.is_inside(str(outside), [out])


def test_each_test_gets_its_own_host_folders_whatever_comfyui_dir_says(monkeypatch, tmp_path_factory):
    """conftest's autouse fixture: nothing a test writes through the host lands in a ComfyUI checkout."""
    checkout = str(tmp_path_factory.mktemp("ComfyUI"))
    monkeypatch.setenv("COMFYUI_DIR", checkout)
    base = str(tmp_path_factory.getbasetemp())
    for h in (host, sys.modules[f"{load_pack().__name__}.trainers.core.host"]):
        for path in (h.output_dir(), h.temp_dir(), h.input_dir(), *h.model_roots(), *h.writable_roots()):
            assert path.startswith(base + os.sep) and not path.startswith(checkout), path


# ---- train() with a hostile output name ------------------------------------------------

@pytest.fixture
def nest(tmp_path):
    """models/ and output/ three folders below tmp_path, so a name climbing out with '../' still lands
    in tmp_path, where the test sees it."""
    root = tmp_path / "a" / "b" / "c"
    host.configure(models_dir=str(root / "models"), output_dir=str(root / "output"))
    photos = make_photos(str(tmp_path / "photos"), count=2, size=64)
    return {"root": tmp_path, "photos": photos, "loras": root / "models" / "loras",
            "runs": root / "output" / "personalize" / "runs"}


def tree(folder) -> list[str]:
    return sorted(os.path.join(d, f) for d, dirs, files in os.walk(folder) for f in files + dirs)


def outside_expected(nest, run_dir) -> list[str]:
    """Everything under tmp_path that is not the photos, a LoRA file or the run's folder."""
    allowed = (str(nest["photos"]), str(nest["loras"]), run_dir)
    parents = {str(p) for p in [*nest["loras"].parents, *nest["runs"].parents]}
    return [p for p in tree(nest["root"])
            if p not in parents and p != str(nest["runs"]) and not any(p == a or p.startswith(a + os.sep)
                                                                        for a in allowed)]


@pytest.mark.parametrize("hostile,saved", [
    ("../../evil", "evil"), ("/abs/evil", "abs_evil"), ("..\\..\\evil", "evil"), ("CON", "CON_"),
])
def test_hostile_output_name_saves_inside_models_loras(nest, toy_sd1, hostile, saved):
    beside = sorted(os.listdir(nest["root"].parent))  # pytest's folder of this session's tmp folders
    in_cwd = set(os.listdir(os.getcwd()))
    result = train(cfg_for(nest, output_name=hostile, steps=1), components=copy.deepcopy(toy_sd1))
    assert os.listdir(nest["loras"]) == [saved + ".safetensors"]
    assert result.lora_path == str(nest["loras"] / (saved + ".safetensors"))
    assert os.path.dirname(result.run_dir) == str(nest["runs"])
    assert_safe_name(os.path.basename(result.run_dir))
    assert outside_expected(nest, result.run_dir) == []
    assert sorted(os.listdir(nest["root"].parent)) == beside  # nothing written beside tmp_path
    made_here = set(os.listdir(os.getcwd())) - in_cwd  # others may work in the checkout: only our names count
    assert not {n for n in made_here if n.split(".")[0] in ("evil", "abs", "CON", "CON_", "models", "output")}
    assert not os.path.lexists(os.path.join(os.sep, "abs", "evil"))


class _NoNameRules:
    """safe_io as methods/lora.py sees it, with sanitize_name letting every name through."""

    def __getattr__(self, name):
        return getattr(safe_io, name)

    @staticmethod
    def sanitize_name(name, default="untitled", max_bytes=120):
        return name


def test_export_refuses_to_write_outside_the_writable_roots(nest, toy_sd1, monkeypatch):
    """The second line of defence: were the name rules to let '../' through, the LoRA export still
    writes nothing outside the host's writable folders (models/loras, output, temp)."""
    monkeypatch.setattr(method_base, "safe_io", _NoNameRules())  # where every export saves
    escaped = nest["loras"].parent.parent / "escaped.safetensors"
    assert not any(os.path.realpath(escaped).startswith(r + os.sep) for r in host.writable_roots())
    with pytest.raises(PermissionError, match="outside"):
        train(cfg_for(nest, output_name="../../escaped", steps=1), components=copy.deepcopy(toy_sd1))
    assert not escaped.exists()
    assert os.listdir(nest["loras"]) == []  # its temp file is gone too
    runs = os.listdir(nest["runs"])
    assert outside_expected(nest, str(nest["runs"] / runs[0])) == []


# ---- the trigger word ------------------------------------------------------------------

# (caption with the trigger as a word, the same caption with the trigger glued to a word on its left, trigger)
TRIGGER_CASES = {
    "plain": ("sks dog", "mysks dog", "sks"),
    "case": ("SKS dog", "mySKS dog", "sks"),
    "comma": ("sks, dog", "xsks, dog", "sks"),
    "parentheses": ("(sks) dog", "(xsks) dog", "sks"),
    "after a dot": ("dog.sks", "dog.xsks", "sks"),
    "at the end": ("a photo of sks", "a photo of mysks", "sks"),
    "unicode word": ("café sks", "cafésks", "sks"),
    "regex characters": ("a s+k dog", "as+k dog", "s+k"),
    "multi-word": ("photo of ohwx man", "photo of xohwx man", "ohwx man"),
    "padded trigger": ("sks dog", "mysks dog", "  sks "),
}


@pytest.mark.parametrize("present,glued,trigger", TRIGGER_CASES.values(), ids=TRIGGER_CASES.keys())
def test_trigger_counts_only_as_a_whole_word(present, glued, trigger):
    word = trigger.strip()
    assert with_trigger(present, trigger) == present
    assert with_trigger(glued, trigger) == f"{word}, {glued}"  # glued on the left: not the trigger
    assert with_trigger(f"  {present}  ", trigger) == present


def test_trigger_glued_on_the_right_or_matched_as_a_pattern_is_not_present():
    assert with_trigger("sksdog", "sks") == "sks, sksdog"
    assert with_trigger("a ssk dog", "s+k") == "s+k, a ssk dog"  # '+' is a character, not a repeat
    assert with_trigger("a sk dog", "s?k") == "s?k, a sk dog"
    assert with_trigger("mysks", "sks") == "sks, mysks"


@pytest.mark.parametrize("caption", ["", "   ", None])
def test_empty_caption_is_just_the_trigger(caption):
    assert with_trigger(caption, " sks ") == "sks"
    assert with_trigger("my" + (caption or "").strip() + "sks", "sks") == "sks, mysks"  # and still a word


@pytest.mark.parametrize("trigger", ["", "   ", None])
def test_empty_trigger_leaves_the_caption(trigger):
    assert with_trigger("  a dog  ", trigger) == "a dog"
    assert with_trigger("mysks dog", trigger) == "mysks dog"
    assert with_trigger("mysks dog", "sks") == "sks, mysks dog"  # the same caption gets a real trigger
