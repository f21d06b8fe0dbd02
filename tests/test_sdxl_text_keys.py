"""SDXL text encoders: open_clip / single-file names <-> transformers, checked against an open_clip-style forward."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from trainers.families import sdxl_text_keys as sk

VOCAB, CTX, WIDTH, LAYERS, HEADS, PROJ, MLP = 1000, 77, 64, 2, 2, 32, 256
UNET_KEY, VAE_KEY = "model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.decoder.conv_in.weight"
L_POS_IDS = sk.CLIP_L_PREFIX + "text_model.embeddings.position_ids"
G_LOGIT = sk.CLIP_G_PREFIX + "logit_scale"


def _open_clip_g(seed=0, dtype=torch.float32, logit_scale=True):
    """Random open_clip-named bigG-style tensors (no prefix), every tensor away from its init value."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=0.2, shift=0.0):
        return (torch.randn(*shape, generator=g) * scale + shift).to(dtype)

    sd = {"token_embedding.weight": rnd(VOCAB, WIDTH, scale=0.5), "positional_embedding": rnd(CTX, WIDTH, scale=0.1),
          "ln_final.weight": rnd(WIDTH, shift=1.0), "ln_final.bias": rnd(WIDTH),
          "text_projection": rnd(WIDTH, PROJ, scale=WIDTH ** -0.5)}
    for i in range(LAYERS):
        b = f"transformer.resblocks.{i}."
        sd.update({b + "ln_1.weight": rnd(WIDTH, shift=1.0), b + "ln_1.bias": rnd(WIDTH),
                   b + "attn.in_proj_weight": rnd(3 * WIDTH, WIDTH, scale=WIDTH ** -0.5),
                   b + "attn.in_proj_bias": rnd(3 * WIDTH),
                   b + "attn.out_proj.weight": rnd(WIDTH, WIDTH, scale=WIDTH ** -0.5),
                   b + "attn.out_proj.bias": rnd(WIDTH),
                   b + "ln_2.weight": rnd(WIDTH, shift=1.0), b + "ln_2.bias": rnd(WIDTH),
                   b + "mlp.c_fc.weight": rnd(MLP, WIDTH, scale=WIDTH ** -0.5), b + "mlp.c_fc.bias": rnd(MLP),
                   b + "mlp.c_proj.weight": rnd(WIDTH, MLP, scale=MLP ** -0.5), b + "mlp.c_proj.bias": rnd(WIDTH)})
    if logit_scale:
        sd["logit_scale"] = torch.tensor(4.6052).to(dtype)  # ln(100), as open_clip and ComfyUI files carry it
    return sd


def _randomize(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # layer-norm gains near 1, the rest small and non-zero
            gain = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + gain)
    return model.eval()


def _hf_g(seed=1):
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, max_position_embeddings=CTX, projection_dim=PROJ,
                            hidden_act="gelu", bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
    return _randomize(CLIPTextModelWithProjection(config), seed)


def _hf_l(seed=2):
    config = CLIPTextConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                            num_attention_heads=2, max_position_embeddings=CTX, projection_dim=32,
                            bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
    return _randomize(CLIPTextModel(config), seed)


def _load(model_cls, config_kwargs, state):
    model = model_cls(CLIPTextConfig(**config_kwargs)).eval()
    model.load_state_dict(sk.match_text_layout(state, model.state_dict().keys()), strict=True)
    return model


def _ids(batch=3, length=CTX, seed=3):
    """Token ids below the EOS, one EOS (the vocabulary's last id) per row at varied places, EOS padding after."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB - 2, (batch, length), generator=g)
    for row, end in enumerate((5, length - 1, 17)[:batch]):
        ids[row, end:] = VOCAB - 1
    return ids


def _reference_g(sd, ids, heads=HEADS):
    """open_clip's TextTransformer, written out: packed in_proj attention, causal mask, argmax-of-ids pooling.

    Returns (pooled @ text_projection, penultimate hidden state): what SDXL takes from CLIP-G.
    """
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    n, length, width = x.shape
    mask = torch.full((length, length), float("-inf")).triu(1)
    states = [x]
    for i in range(LAYERS):
        b = f"transformer.resblocks.{i}."
        h = F.layer_norm(x, (width,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"], eps=1e-5)
        q, k, v = (h @ sd[b + "attn.in_proj_weight"].T + sd[b + "attn.in_proj_bias"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width // heads) + mask, dim=-1) @ v
        attn = attn.transpose(1, 2).reshape(n, length, width)
        x = x + attn @ sd[b + "attn.out_proj.weight"].T + sd[b + "attn.out_proj.bias"]
        h = F.layer_norm(x, (width,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"], eps=1e-5)
        h = F.gelu(h @ sd[b + "mlp.c_fc.weight"].T + sd[b + "mlp.c_fc.bias"])
        x = x + h @ sd[b + "mlp.c_proj.weight"].T + sd[b + "mlp.c_proj.bias"]
        states.append(x)
    x = F.layer_norm(x, (width,), sd["ln_final.weight"], sd["ln_final.bias"], eps=1e-5)
    pooled = x[torch.arange(n), ids.argmax(dim=-1)]
    return pooled @ sd["text_projection"], states[-2]


def _assert_identical(a: dict, b: dict):
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _fake_file(dtype=torch.float32):
    """A whole SDXL single-file state dict: UNet/VAE stand-ins, CLIP-L as files have it, open_clip CLIP-G."""
    clip_l = {k: v.to(dtype) for k, v in _hf_l().state_dict().items()}
    sd = {UNET_KEY: torch.ones(4, 4, 3, 3), VAE_KEY: torch.ones(4, 4, 3, 3), "denoiser.sigmas": torch.ones(10)}
    sd.update({sk.CLIP_L_PREFIX + sk.TEXT_MODEL + k.removeprefix(sk.TEXT_MODEL): v for k, v in clip_l.items()})
    sd[L_POS_IDS] = torch.arange(CTX).expand(1, -1)  # ComfyUI and Stability's files carry it
    sd.update({sk.CLIP_G_PREFIX + k: v for k, v in _open_clip_g(dtype=dtype).items()})
    return sd


# ---------------------------------------------------------------- (a) round trips
def test_hf_open_clip_hf_round_trip_is_bit_identical():
    model = _hf_g()
    state = model.state_dict()
    open_clip = sk.hf_to_clip_g(state)
    assert "logit_scale" not in open_clip and open_clip["text_projection"].shape == (WIDTH, PROJ)
    back = sk.clip_g_to_hf(open_clip)
    _assert_identical(back, sk.match_text_layout(state, back.keys()))
    config = sk.clip_g_config(open_clip, heads=HEADS)
    fresh = _load(CLIPTextModelWithProjection, config, back)
    _assert_identical(fresh.state_dict(), state)


def test_open_clip_hf_open_clip_round_trip_is_bit_identical():
    sd = _open_clip_g(dtype=torch.bfloat16, logit_scale=False)
    _assert_identical(sk.hf_to_clip_g(sk.clip_g_to_hf(sd)), sd)


def test_unprefixed_hf_layout_is_accepted():
    """transformers >= 5.6 spells CLIPTextModel keys without `text_model.`: both layouts convert alike."""
    state = _hf_g().state_dict()
    bare = {k.removeprefix(sk.TEXT_MODEL): v for k, v in state.items()}
    _assert_identical(sk.hf_to_clip_g(bare), sk.hf_to_clip_g(state))
    with_ids = dict(state, **{"text_model.embeddings.position_ids": torch.arange(CTX)[None]})  # transformers 4.x
    _assert_identical(sk.hf_to_clip_g(with_ids), sk.hf_to_clip_g(state))


def test_split_tensors_own_their_memory():
    """safetensors refuses tensors that share storage: q/k/v must not be views into in_proj."""
    hf = sk.clip_g_to_hf(_open_clip_g())
    ptrs = [t.untyped_storage().data_ptr() for k, t in hf.items() if "_proj." in k]
    assert len(ptrs) == len(set(ptrs))


# ---------------------------------------------------------------- (b) numerics against open_clip
def test_matches_open_clip_forward():
    sd = _open_clip_g()
    config = sk.clip_g_config(sd, heads=HEADS)
    model = _load(CLIPTextModelWithProjection, config, sk.clip_g_to_hf(sd))
    ids = _ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
        pooled, penultimate = _reference_g(sd, ids)
    torch.testing.assert_close(out.text_embeds, pooled, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden_states[-2], penultimate, atol=1e-5, rtol=0)
    assert pooled.abs().max() > 0.1 and penultimate.std() > 0.1  # not trivially equal


def test_config_inference():
    sd = _open_clip_g()
    config = sk.clip_g_config(sd)
    assert config == {"vocab_size": VOCAB, "hidden_size": WIDTH, "intermediate_size": MLP, "num_hidden_layers": LAYERS,
                      "num_attention_heads": WIDTH // 64, "max_position_embeddings": CTX, "projection_dim": PROJ,
                      "hidden_act": "gelu", "layer_norm_eps": 1e-5,
                      "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1}
    assert sk.clip_g_config(sd, heads=4)["num_attention_heads"] == 4
    with pytest.raises(sk.SDXLKeyError, match="heads"):
        sk.clip_g_config(sd, heads=3)


def test_full_size_bigg_on_meta():
    """The real ViT-bigG shapes give SDXL's text_encoder_2 config and load strictly (meta tensors: no memory)."""
    width, layers = 1280, 32
    e = dict(device="meta")
    sd = {"token_embedding.weight": torch.empty(49408, width, **e), "positional_embedding": torch.empty(77, width, **e),
          "ln_final.weight": torch.empty(width, **e), "ln_final.bias": torch.empty(width, **e),
          "text_projection": torch.empty(width, width, **e), "logit_scale": torch.empty((), **e)}
    shapes = {"ln_1.weight": (width,), "ln_1.bias": (width,), "ln_2.weight": (width,), "ln_2.bias": (width,),
              "attn.in_proj_weight": (3 * width, width), "attn.in_proj_bias": (3 * width,),
              "attn.out_proj.weight": (width, width), "attn.out_proj.bias": (width,),
              "mlp.c_fc.weight": (4 * width, width), "mlp.c_fc.bias": (4 * width,),
              "mlp.c_proj.weight": (width, 4 * width), "mlp.c_proj.bias": (width,)}
    for i in range(layers):
        sd.update({f"transformer.resblocks.{i}.{k}": torch.empty(s, **e) for k, s in shapes.items()})
    config = sk.clip_g_config(sd)
    assert (config["hidden_size"], config["num_attention_heads"], config["num_hidden_layers"]) == (1280, 20, 32)
    assert (config["intermediate_size"], config["projection_dim"], config["eos_token_id"]) == (5120, 1280, 49407)
    with torch.device("meta"):
        model = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    hf = sk.clip_g_to_hf(sd)
    model.load_state_dict(sk.match_text_layout(hf, model.state_dict().keys()), strict=True, assign=True)
    assert hf["text_model.encoder.layers.31.self_attn.v_proj.weight"].shape == (width, width)


# ---------------------------------------------------------------- (c) whole files
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_and_back_round_trip(dtype):
    sd = _fake_file(dtype)
    clip_l, clip_g = sk.split_sdxl_text(sd)
    assert all(k.startswith(sk.TEXT_MODEL) for k in clip_l)
    assert not any("position_ids" in k or "logit_scale" in k for k in (*clip_l, *clip_g))
    back = sk.sdxl_text_to_ldm(clip_l, clip_g)
    expected = {k: v for k, v in sd.items() if k.startswith((sk.CLIP_L_PREFIX, sk.CLIP_G_PREFIX))}
    del expected[L_POS_IDS], expected[G_LOGIT]  # never written
    _assert_identical(back, expected)


def test_split_parts_load_strictly_and_run():
    sd = _fake_file()
    clip_l, clip_g = sk.split_sdxl_text(sd)
    text_l = _hf_l()
    loaded_l = CLIPTextModel(text_l.config).eval()
    loaded_l.load_state_dict(sk.match_text_layout(clip_l, loaded_l.state_dict().keys()), strict=True)
    loaded_g = _load(CLIPTextModelWithProjection,
                     sk.clip_g_config({k.removeprefix(sk.CLIP_G_PREFIX): v for k, v in sd.items()
                                       if k.startswith(sk.CLIP_G_PREFIX)}, heads=HEADS), clip_g)
    ids = _ids()
    with torch.no_grad():
        torch.testing.assert_close(loaded_l(ids).last_hidden_state, text_l(ids).last_hidden_state, atol=0, rtol=0)
        pooled, _ = _reference_g(_open_clip_g(), ids)
        torch.testing.assert_close(loaded_g(ids).text_embeds, pooled, atol=1e-5, rtol=0)


def test_models_state_dicts_write_like_the_file():
    """Writing straight from model.state_dict() (CLIP-L unprefixed in transformers 5) gives the file's keys."""
    sd = _fake_file()
    text_l = _hf_l()
    text_g = _load(CLIPTextModelWithProjection, sk.clip_g_config(_open_clip_g(), heads=HEADS),
                   sk.clip_g_to_hf(_open_clip_g()))
    back = sk.sdxl_text_to_ldm(text_l.state_dict(), text_g.state_dict())
    expected = {k: v for k, v in sd.items() if k.startswith((sk.CLIP_L_PREFIX, sk.CLIP_G_PREFIX))}
    del expected[L_POS_IDS], expected[G_LOGIT]
    _assert_identical(back, expected)


def test_unprefixed_clip_l_in_file_is_read():
    sd = {k.replace(sk.CLIP_L_PREFIX + sk.TEXT_MODEL, sk.CLIP_L_PREFIX): v for k, v in _fake_file().items()}
    clip_l, _ = sk.split_sdxl_text(sd)
    _assert_identical(clip_l, sk.split_sdxl_text(_fake_file())[0])


# ---------------------------------------------------------------- (d) errors name the keys
def test_missing_and_unknown_open_clip_keys_are_named():
    sd = _open_clip_g()
    del sd["transformer.resblocks.1.attn.in_proj_bias"]
    with pytest.raises(sk.SDXLKeyError, match=r"missing 1: 'transformer\.resblocks\.1\.attn\.in_proj_bias'"):
        sk.clip_g_to_hf(sd)
    sd = dict(_open_clip_g(), **{"transformer.resblocks.0.attn.extra": torch.ones(1)})
    with pytest.raises(sk.SDXLKeyError, match=r"unknown 1: 'transformer\.resblocks\.0\.attn\.extra'"):
        sk.clip_g_to_hf(sd)
    sd = _open_clip_g()
    sd["transformer.resblocks.0.attn.in_proj_weight"] = sd["transformer.resblocks.0.attn.in_proj_weight"][:WIDTH]
    with pytest.raises(sk.SDXLKeyError, match="in_proj_weight"):
        sk.clip_g_to_hf(sd)


def test_missing_and_unknown_hf_keys_are_named():
    state = _hf_g().state_dict()
    del state["text_model.encoder.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(sk.SDXLKeyError, match=r"'text_model\.encoder\.layers\.0\.self_attn\.k_proj\.weight'"):
        sk.hf_to_clip_g(state)
    state = _hf_g().state_dict()
    del state["text_projection.weight"]
    with pytest.raises(sk.SDXLKeyError, match=r"missing 1: 'text_projection\.weight'"):
        sk.hf_to_clip_g(state)
    state = _hf_g().state_dict()
    state["encoder.final_layer_norm.weight"] = state["text_model.final_layer_norm.weight"]
    with pytest.raises(sk.SDXLKeyError, match="encoder.final_layer_norm.weight"):
        sk.hf_to_clip_g(state)
    state = _hf_g().state_dict()
    state["final_layer_norm.bias"] = state["text_model.final_layer_norm.bias"]
    with pytest.raises(sk.SDXLKeyError, match="both with and without"):
        sk.hf_to_clip_g(state)


def test_file_errors_name_the_file_keys():
    sd = _fake_file()
    del sd[sk.CLIP_L_PREFIX + "text_model.encoder.layers.1.mlp.fc2.bias"]
    with pytest.raises(sk.SDXLKeyError, match=r"'conditioner\.embedders\.0\.transformer\.text_model\.encoder"
                                              r"\.layers\.1\.mlp\.fc2\.bias'"):
        sk.split_sdxl_text(sd)
    sd = dict(_fake_file(), **{sk.CLIP_G_PREFIX + "attn_mask": torch.ones(CTX, CTX)})
    with pytest.raises(sk.SDXLKeyError, match=r"unknown 1: 'conditioner\.embedders\.1\.model\.attn_mask'"):
        sk.split_sdxl_text(sd)
    sd = {k.replace(sk.CLIP_G_PREFIX, "conditioner.embedders.0.model."): v for k, v in _fake_file().items()
          if not k.startswith(sk.CLIP_L_PREFIX)}
    with pytest.raises(sk.SDXLKeyError, match="refiner"):
        sk.split_sdxl_text(sd)
    with pytest.raises(ValueError, match="No SDXL text-encoder keys"):  # SDXLKeyError is a ValueError
        sk.split_sdxl_text({UNET_KEY: torch.ones(1)})


# ---------------------------------------------------------------- (e) logit_scale
def test_logit_scale_is_dropped_and_never_written():
    sd = _open_clip_g()
    assert "logit_scale" in sd
    hf = sk.clip_g_to_hf(sd)
    assert not any("logit_scale" in k for k in hf)
    _assert_identical(hf, sk.clip_g_to_hf({k: v for k, v in sd.items() if k != "logit_scale"}))
    assert "logit_scale" not in sk.hf_to_clip_g(hf)
    clip_l, clip_g = sk.split_sdxl_text(_fake_file())
    assert G_LOGIT not in sk.sdxl_text_to_ldm(clip_l, clip_g)


def test_comfyui_style_extras_in_clip_l_are_dropped():
    """ComfyUI's own CLIP-L carries logit_scale and an identity text_projection; neither belongs in the file."""
    clip_l, clip_g = sk.split_sdxl_text(_fake_file())
    extra = dict(clip_l, logit_scale=torch.tensor(4.6), **{"text_projection.weight": torch.eye(32)})
    _assert_identical(sk.sdxl_text_to_ldm(extra, clip_g), sk.sdxl_text_to_ldm(clip_l, clip_g))


def test_linear_style_text_projection_is_read_untransposed():
    """Some files carry `text_projection.weight` (Linear layout); ComfyUI takes it as is."""
    sd = _open_clip_g()
    linear = {k: v for k, v in sd.items() if k != "text_projection"}
    linear["text_projection.weight"] = sd["text_projection"].t().contiguous()
    _assert_identical(sk.clip_g_to_hf(linear), sk.clip_g_to_hf(sd))
    assert sk.clip_g_config(linear) == sk.clip_g_config(sd)
    with pytest.raises(sk.SDXLKeyError, match="unknown"):
        sk.clip_g_to_hf(dict(sd, **{"text_projection.weight": linear["text_projection.weight"]}))
