"""FAN: registration, official state-dict layout, parity with the official code, weights, capture."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

import fanlens
from fanlens import FanlensError, TokenCapture, cli
from fanlens.models import FAN_MODEL_NAMES
from fanlens.models.fan import FAN, checkpoint_filter_fn, hybrid_backbone

# The official code's reference data (provenance: fixtures/fan_reference/README.md) ships with the
# tests, so the parity claim is checked on a fresh clone; FANLENS_FAN_REFERENCE points elsewhere.
REF = Path(os.environ.get("FANLENS_FAN_REFERENCE", Path(__file__).resolve().parent / "fixtures" / "fan_reference"))
needs_ref = pytest.mark.skipif(
    not (REF / "manifest.json").is_file(),
    reason=f"FAN reference fixtures not found at {REF} (set FANLENS_FAN_REFERENCE to their folder)",
)
CASES = ("vit_tiny", "vit_se_tiny", "hybrid_tiny", "vit_downsample_tiny")
PARITY_TOL = 1e-5


def manifest():
    return json.loads((REF / "manifest.json").read_text())


def tiny_fan(**kw):
    args = dict(depth=2, embed_dim=64, num_heads=4, num_classes=10)
    args.update(kw)
    return timm.create_model("fan_tiny_12_p16_224", **args).eval()


# --------------------------------------------------------------------------- registry
@needs_ref
def test_registry_lists_every_official_name():
    assert list(FAN_MODEL_NAMES) == manifest()["registered_models"]
    assert len(FAN_MODEL_NAMES) == 14
    for name in FAN_MODEL_NAMES:
        assert timm.is_model(name)


@needs_ref
@pytest.mark.parametrize("name", [
    "fan_tiny_12_p16_224", "fan_small_12_p16_224_se_attn", "fan_small_12_p16_224", "fan_base_18_p16_224",
    "fan_large_24_p16_224", "fan_tiny_8_p4_hybrid", "fan_small_12_p4_hybrid", "fan_base_16_p4_hybrid",
    "fan_large_16_p4_hybrid", "fan_Xlarge_16_p4_hybrid", "fan_swin_tiny_patch4_window7_224",
    "fan_swin_small_patch4_window7_224", "fan_swin_base_patch4_window7_224", "fan_swin_large_patch4_window7_224",
])
def test_state_dict_matches_official_layout(name):
    entry = manifest()["models"][name]
    with torch.device("meta"):  # same constructor, no memory for the weights
        model = timm.create_model(name)
    got = [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()]
    assert got == entry["state_dict"]  # keys, order, shapes, dtypes
    assert sum(p.numel() for p in model.parameters()) == entry["num_params"]
    assert sum(b.numel() for b in model.buffers()) == entry["num_buffer_elements"]


@needs_ref
@pytest.mark.parametrize("name", [
    "fan_tiny_12_p16_224", "fan_small_12_p16_224_se_attn", "fan_tiny_8_p4_hybrid", "fan_Xlarge_16_p4_hybrid",
    "fan_swin_tiny_patch4_window7_224",
])
def test_forward_shapes_at_224_match_official(name):
    entry = manifest()["models"][name]["forward_224"]
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad(), TokenCapture(model) as cap:
        logits = cap.run(x)
        bts = list(cap.block_tokens())
    assert list(logits.shape) == entry["logits_shape"] and torch.isfinite(logits).all()
    if "block_out_grid_hw" in entry:  # ViT and hybrid
        assert [list(b.layout.grid) for b in bts] == entry["block_out_grid_hw"]
        assert [[1, *b.tokens.shape[1:]] for b in bts] == entry["block_out_shapes"]
    else:  # Swin
        assert {b.name: [1, *b.tokens.shape[1:]] for b in bts} == entry["block_out_shapes"]


# --------------------------------------------------------------------------- parity
def _load_case(case):
    from safetensors.torch import load_file

    meta = json.loads((REF / f"case_{case}.json").read_text())
    tensors = load_file(str(REF / f"case_{case}.safetensors"))
    return meta, tensors


def _run_case(model, x):
    outs = {}
    with torch.no_grad():
        tok, h, w = model.forward_tokens(x)
        outs["patch_embed_out"] = tok
        for i, blk in enumerate(model.blocks):
            tok, h, w = blk(tok, h, w)
            outs[f"block_out.{i}"] = tok
        z = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), tok), dim=1)
        for j, blk in enumerate(model.cls_attn_blocks):
            z = blk(z)
            outs[f"cls_block_out.{j}"] = z
        outs["logits"] = model(x)
    return outs


@needs_ref
@pytest.mark.parametrize("case", CASES)
def test_parity_with_official_implementation(case):
    meta, t = _load_case(case)
    kwargs = dict(meta["constructor_kwargs"])
    if "backbone_builder_kwargs" in meta:
        kwargs["backbone"] = hybrid_backbone(**meta["backbone_builder_kwargs"])
    model = FAN(**kwargs).eval()
    sd = {k[len("state_dict."):]: v for k, v in t.items() if k.startswith("state_dict.")}
    model.load_state_dict(sd, strict=True)
    assert sum(p.numel() for p in model.parameters()) == meta["num_params"]
    outs = _run_case(model, t["input"])
    expected = [k for k in t if k == "patch_embed_out" or k == "logits" or k.startswith(("block_out.", "cls_block_out."))]
    assert sorted(outs) == sorted(expected)
    errs = {k: (outs[k] - t[k]).abs().max().item() for k in expected}
    assert max(errs.values()) <= PARITY_TOL, errs
    # the grid after each block, including the downsample of the Xlarge path
    with TokenCapture(model) as cap:
        cap.run(t["input"])
        assert [list(b.layout.grid) for b in cap.block_tokens()] == meta["block_out_grid_hw"]


# --------------------------------------------------------------------------- weights
def _official_style(sd):
    """A checkpoint as the release files store it: fused class-attention qkv, old PE name, DDP prefix."""
    out = {}
    keys = list(sd)
    for k in keys:
        if ".attn.q." in k and k.startswith("cls_attn_blocks."):
            stem = k.replace(".attn.q.", ".attn.qkv.")
            out["module." + stem] = torch.cat([sd[k], sd[k.replace(".q.", ".k.")], sd[k.replace(".q.", ".v.")]])
        elif k.startswith("cls_attn_blocks.") and (".attn.k." in k or ".attn.v." in k):
            continue
        else:
            out["module." + k.replace("pos_embed.", "pos_embeder.")] = sd[k]
    return out


@pytest.mark.parametrize("fmt", ["pth_bare", "pth_tar_state_dict", "pth_model", "pth_ema", "safetensors", "official"])
def test_pretrained_from_local_file(tmp_path, fmt):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    src = tiny_fan()
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file(sd, str(path))
    else:
        path = tmp_path / ("w.pth.tar" if "tar" in fmt else "w.pth")
        payload = {
            "pth_bare": sd,
            "pth_tar_state_dict": {"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 3},
            "pth_model": {"model": sd},
            "pth_ema": {"state_dict_ema": sd, "state_dict": {k: torch.zeros_like(v) for k, v in sd.items()}},
            "official": {"model": _official_style(sd)},
        }[fmt]
        torch.save(payload, path)
    model = timm.create_model("fan_tiny_12_p16_224", depth=2, embed_dim=64, num_heads=4, num_classes=10,
                              pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=0, atol=0)


def test_checkpoint_that_does_not_fit_names_keys(tmp_path):
    sd = tiny_fan().state_dict()
    sd.pop("head.weight")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(FanlensError, match=r"1 missing keys \['head.weight'\]; 1 unexpected keys \['extra.weight'\]"):
        timm.create_model("fan_tiny_12_p16_224", depth=2, embed_dim=64, num_heads=4, num_classes=10,
                          pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "bad.pth")))
    with pytest.raises(FanlensError, match="shape mismatches"):
        timm.create_model("fan_tiny_12_p16_224", depth=2, embed_dim=64, num_heads=4, num_classes=7,
                          pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "bad.pth")))


def test_release_urls_and_unreleased_variants():
    released = {
        "fan_tiny_12_p16_224": "fan_vit_tiny.pth.tar", "fan_small_12_p16_224": "fan_vit_small.pth.tar",
        "fan_base_18_p16_224": "fan_vit_base.pth.tar", "fan_tiny_8_p4_hybrid": "fan_hybrid_tiny.pth.tar",
        "fan_small_12_p4_hybrid": "fan_hybrid_small.pth.tar", "fan_base_16_p4_hybrid": "fan_hybrid_base.pth.tar",
        "fan_large_16_p4_hybrid": "fan_hybrid_large_in22k_1k.pth.tar",
    }
    for name in FAN_MODEL_NAMES:
        cfg = timm.models.get_pretrained_cfg(name)
        if name in released:
            assert cfg.url.startswith("https://github.com/") and cfg.url.endswith("/" + released[name])
        else:
            assert not cfg.url
    with pytest.raises(FanlensError, match="no released checkpoint"):
        timm.create_model("fan_swin_tiny_patch4_window7_224", pretrained=True)


def test_cli_checkpoint_and_fan_model_names(tmp_path, image_dir, capsys):
    torch.manual_seed(0)
    full = timm.create_model("fan_tiny_12_p16_224").eval()
    torch.save({"state_dict": full.state_dict()}, tmp_path / "fan_tiny.pth.tar")
    code = cli.main(["probe", "--model", "fan_tiny_12_p16_224", "--checkpoint", str(tmp_path / "fan_tiny.pth.tar"),
                     "--images", str(image_dir), "--out", str(tmp_path / "o"), "--no-progress", "--no-figure",
                     "--sigmas", "0,0.1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    man = json.loads((tmp_path / "o" / "manifest.json").read_text())["provenance"]
    assert man["weights_sha256"] == fanlens.models.file_sha256(tmp_path / "fan_tiny.pth.tar")
    res = fanlens.load(tmp_path / "o")
    assert len(res.blocks) == 12 and res.blocks[0].layout.num_prefix_tokens == 0
    assert res.blocks[0].layout.grid == (14, 14)
    np.testing.assert_array_equal(res.values(0.0), 0.0)
    for cmd, extra in (("spectrum", []), ("groups", ["--n-clusters", "3"])):
        code = cli.main([cmd, "--model", "fan_tiny_12_p16_224", "--images", str(image_dir), "--out",
                         str(tmp_path / cmd), "--no-progress", "--no-figure", *extra])
        assert code == 0, capsys.readouterr().err
    assert fanlens.load(tmp_path / "groups").labels[0].shape == (3, 14, 14)


# --------------------------------------------------------------------------- capture and attention
def test_capture_non_square_and_class_attention_blocks():
    model = tiny_fan()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad(), TokenCapture(model) as cap:
        cap.run(x)
        bts = list(cap.block_tokens())
    assert [b.name for b in bts] == ["blocks.0", "blocks.1"]
    assert bts[0].layout.grid == (4, 6) and bts[0].layout.num_prefix_tokens == 0
    with torch.no_grad(), TokenCapture(model, blocks="blocks.*,cls_attn_blocks.*") as cap:
        cap.run(x)
        bts = list(cap.block_tokens())
    assert [b.name for b in bts] == ["blocks.0", "blocks.1", "cls_attn_blocks.0", "cls_attn_blocks.1"]
    cls = bts[2]
    assert cls.layout.num_prefix_tokens == 1 and cls.prefix.shape == (2, 1, 64) and cls.tokens.shape == (2, 24, 64)


def test_downsample_changes_the_grid():
    model = FAN(img_size=(64, 96), embed_dim=32, channel_dims=[32, 32, 48], depth=3, num_heads=[2, 2, 3],
                num_classes=10).eval()
    r = fanlens.noise_probe(model, torch.rand(2, 3, 64, 96), sigmas=0.1, progress=False)
    assert [b.layout.grid for b in r.blocks] == [(4, 6), (2, 3), (2, 3)]
    assert [b.layout.channels for b in r.blocks] == [32, 48, 48]


def test_attention_maps_match_recomputation_from_q_and_kv():
    torch.manual_seed(1)
    model = tiny_fan(depth=3)
    x = torch.randn(2, 3, 64, 80)
    maps = model.attention_maps(x, indices=[0, 2])
    assert sorted(maps) == [0, 2]
    with torch.no_grad():
        t, h, w = model.forward_tokens(x)
        t, h, w = model.blocks[0](t, h, w)
        t, h, w = model.blocks[1](t, h, w)
        blk = model.blocks[2]
        z = blk.norm1(t)
        c, heads = z.shape[-1], blk.attn.num_heads
        d = c // heads
        q = z @ blk.attn.q.weight.T + blk.attn.q.bias
        kv = z @ blk.attn.kv.weight.T + blk.attn.kv.bias
        k = kv[..., :c]  # rows [0:C] of kv are k
        q = q.reshape(2, -1, heads, d).transpose(1, 2)
        k = k.reshape(2, -1, heads, d).transpose(1, 2)
        ref = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    assert maps[2].shape == (2, heads, 20, 20)
    torch.testing.assert_close(maps[2], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps[2].sum(-1), torch.ones(2, heads, 20))
    with pytest.raises(FanlensError, match="indices must be block indices"):
        model.attention_maps(x, indices=[5])


def test_se_variant_runs_and_channel_gate_is_sigmoid_times_temperature():
    model = tiny_fan(se_mlp=True)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
    cp = tiny_fan().blocks[0].mlp
    with torch.no_grad():
        cp.temperature.fill_(2.5)
        g = cp.gate(torch.randn(3, 16, 64))
    assert g.shape == (3, 4, 16, 1)
    assert float(g.min()) > 0.0 and float(g.max()) < 2.5  # sigmoid in (0, 1), scaled by the temperature


def test_filter_splits_fused_qkv_in_order():
    sd = {"cls_attn_blocks.0.attn.qkv.weight": torch.arange(6.0)[:, None].repeat(1, 2),
          "pos_embeder.token_projection.bias": torch.ones(2)}
    out = checkpoint_filter_fn(sd, None)
    assert out["cls_attn_blocks.0.attn.q.weight"][:, 0].tolist() == [0.0, 1.0]
    assert out["cls_attn_blocks.0.attn.k.weight"][:, 0].tolist() == [2.0, 3.0]
    assert out["cls_attn_blocks.0.attn.v.weight"][:, 0].tolist() == [4.0, 5.0]
    assert "pos_embed.token_projection.bias" in out
