"""The Python API end to end: inputs of every kind, results, provenance, save/load."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import fanlens
from fanlens import FanlensError
from fanlens.data import SAMPLE_NAMES, resolve_images, data_config
from fanlens.results import CSV_COLUMNS

from conftest import TINY, write_images


def _pixels(n, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_spectrum_on_a_tensor(tiny_vit):
    r = fanlens.spectrum(tiny_vit, _pixels(4), progress=False)
    assert r.n_images == 4
    assert r.block_names == ["blocks.0", "blocks.1", "blocks.2"]
    assert r.count_mean.shape == (3, len(fanlens.spectral.RULES))
    assert r.blocks[0].layout.grid == (4, 4) and r.blocks[0].layout.num_prefix_tokens == 1
    c = r.count("rel_threshold")
    assert ((c >= 1) & (c <= 16)).all()
    # eigenvalue spectrum: top one normalised to 1, descending, NaN past the 16 tokens
    assert np.allclose(r.eig_mean[:, 0], 1.0)
    assert np.isnan(r.eig_mean[:, 16:]).all()
    assert (np.diff(r.eig_mean[:, :16], axis=1) <= 1e-6).all()


def test_spectrum_counts_match_per_image_computation(tiny_vit):
    x = _pixels(3, seed=4)
    r = fanlens.spectrum(tiny_vit, x, rules=("rel_threshold", "effective_rank"), batch_size=2, progress=False)
    cfg = data_config(tiny_vit)
    per_image = []
    with torch.no_grad(), fanlens.TokenCapture(tiny_vit) as cap:
        for i in range(3):
            cap.clear()
            cap.run(cfg.normalize(x[i : i + 1]))
            row = []
            for bt in cap.block_tokens():
                spec = fanlens.spectral.spectrum(fanlens.spectral.affinity(bt.tokens))
                row.append([fanlens.spectral.count_significant(spec, rr).item() for rr in r.rules])
            per_image.append(row)
    per_image = np.array(per_image)
    np.testing.assert_allclose(r.count_mean, per_image.mean(0), rtol=1e-5)
    np.testing.assert_allclose(r.count_std, per_image.std(0, ddof=1), rtol=1e-4, atol=1e-9)


def test_inputs_folder_files_dataloader_give_equal_results(tiny_vit, tmp_path):
    paths = write_images(tmp_path / "imgs", 3, size=(64, 64))
    cfg = data_config(tiny_vit)
    tensor = next(resolve_images(tmp_path / "imgs", cfg).batches(3))[0]
    assert tensor.shape == (3, 3, 64, 64) and 0 <= tensor.min() and tensor.max() <= 1
    r_dir = fanlens.spectrum(tiny_vit, tmp_path / "imgs", progress=False)
    r_files = fanlens.spectrum(tiny_vit, [str(p) for p in paths], progress=False)
    r_tensor = fanlens.spectrum(tiny_vit, tensor, progress=False)
    loader = DataLoader(TensorDataset(tensor, torch.zeros(3)), batch_size=2)
    r_loader = fanlens.spectrum(tiny_vit, loader, progress=False)
    for r in (r_files, r_tensor, r_loader):
        np.testing.assert_allclose(r.count_mean, r_dir.count_mean)
    assert r_dir.provenance.images == [str(p) for p in paths]


def test_samples_ship_with_dependencies():
    cfg = fanlens.data.DataConfig((32, 48), (0.5,) * 3, (0.5,) * 3)
    s = resolve_images("samples", cfg)
    assert len(s) == len(SAMPLE_NAMES) == 6
    x, idx = next(s.batches(6))
    assert x.shape == (6, 3, 32, 48) and idx == list(range(6))
    assert x.dtype == torch.float32 and 0.0 <= x.min() and x.max() <= 1.0 and x.std() > 0.1


def test_group_tokens_shapes_and_determinism(tiny_vit):
    x = _pixels(2)
    g1 = fanlens.group_tokens(tiny_vit, x, n_clusters=3, progress=False)
    g2 = fanlens.group_tokens(tiny_vit, x, n_clusters=3, progress=False)
    assert len(g1.labels) == 3 and g1.labels[0].shape == (2, 4, 4)
    assert g1.n_clusters.shape == (3, 2) and (g1.n_clusters == 3).all()
    for a, b in zip(g1.labels, g2.labels):
        assert np.array_equal(a, b)
    assert {int(v) for v in np.unique(g1.labels[0][0])} <= {0, 1, 2}
    assert g1.pixels.shape == (2, 64, 64, 3) and g1.pixels.dtype == np.uint8


def test_group_tokens_rejects_k_above_tokens(tiny_vit):
    with pytest.raises(FanlensError, match=r"block 'blocks.0' has 16 tokens"):
        fanlens.group_tokens(tiny_vit, _pixels(1), n_clusters=17, progress=False)


def test_token_budget_pools_large_grids():
    import timm

    m = timm.create_model("resnet18", num_classes=3).eval()
    r = fanlens.spectrum(m, _pixels(1, 128), token_budget=64, rules=("rel_threshold",), progress=False)
    assert r.blocks[0].layout.grid == (32, 32)
    assert r.blocks[0].analysed_grid == (8, 8)
    assert r.blocks[-1].analysed_grid == (4, 4)
    assert r.provenance.params["token_budget"] == 64


@pytest.mark.parametrize("which", ["spectrum", "probe", "groups"])
def test_save_load_roundtrip_and_tidy_csv(tiny_vit, tmp_path, which):
    x = _pixels(2)
    if which == "spectrum":
        r = fanlens.spectrum(tiny_vit, x, progress=False, seed=3)
    elif which == "probe":
        r = fanlens.noise_probe(tiny_vit, x, sigmas=(0.0, 0.1, 0.5), progress=False, seed=3)
    else:
        r = fanlens.group_tokens(tiny_vit, x, n_clusters=2, progress=False, seed=3)
    r.save(tmp_path / "out")
    back = fanlens.load(tmp_path / "out")
    assert type(back) is type(r)
    assert back.blocks == r.blocks and back.provenance == r.provenance
    man = json.loads((tmp_path / "out" / "manifest.json").read_text())
    prov = man["provenance"]
    assert prov["weights_sha256"] == fanlens.models.state_dict_sha256(tiny_vit)
    assert prov["weights"] == "user module" and prov["seed"] == 3
    assert set(prov["versions"]) >= {"fanlens", "torch", "timm"}
    assert prov["images"] == ["tensor[0]", "tensor[1]"]
    assert prov["params"]["analysis"] == which
    with open(tmp_path / "out" / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    if which == "spectrum":
        np.testing.assert_array_equal(back.count_mean, r.count_mean)
        mean_rows = [row for row in rows if row["statistic"] == "mean" and row["rule"] == "rel_threshold"]
        assert [float(row["value"]) for row in mean_rows] == pytest.approx(r.count("rel_threshold").tolist())
        assert len(rows) == 3 * len(r.rules) * 4
    elif which == "probe":
        np.testing.assert_array_equal(back.mean, r.mean)
        assert back.sigmas == (0.0, 0.1, 0.5)
        assert {row["sigma"] for row in rows} == {"0", "0.1", "0.5"}
        assert len(rows) == 3 * 3 * 4
    else:
        for a, b in zip(back.labels, r.labels):
            np.testing.assert_array_equal(a, b)
        assert len(rows) == 3 * 2


def test_random_init_provenance_and_reproducible_seeded_init():
    r1 = fanlens.noise_probe("resnet18", _pixels(1), sigmas=0.1, progress=False, seed=1, input_size=64)
    r2 = fanlens.noise_probe("resnet18", _pixels(1), sigmas=0.1, progress=False, seed=1, input_size=64)
    assert r1.provenance.weights_sha256 == "random init"
    assert r1.provenance.model == "resnet18"
    np.testing.assert_array_equal(r1.mean, r2.mean)
    assert r1.provenance.params["data_config"]["input_size"] == [64, 64]


def test_checkpoint_roundtrip(tmp_path, tiny_vit):
    from safetensors.torch import save_file

    import timm

    sd = {k: v.contiguous() for k, v in tiny_vit.state_dict().items()}
    save_file(sd, tmp_path / "w.safetensors")
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, tmp_path / "w.pth.tar")
    for f in ("w.safetensors", "w.pth.tar"):
        lm = fanlens.build_model(TINY, checkpoint=tmp_path / f, seed=99)
        for k, v in lm.model.state_dict().items():
            assert torch.equal(v, sd[k])
        assert lm.weights_sha256 == fanlens.models.file_sha256(tmp_path / f)
    torch.save({"x": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(FanlensError, match="missing keys"):
        fanlens.build_model(TINY, checkpoint=tmp_path / "bad.pth")


def test_a_checkpoint_filter_that_fails_leaves_the_decision_to_the_strict_load(tmp_path):
    """timm's checkpoint_filter_fn is written for a model's own releases: given another architecture's checkpoint
    (MetaFormer's looks up keys the checkpoint lacks: KeyError) the strict load names what does not fit, with the
    filter's failure; a checkpoint that fits as it is loads even when the filter fails on it."""
    import timm
    from safetensors.torch import save_file
    from timm.models.metaformer import MetaFormer

    from fanlens.models._loading import load_checkpoint

    other = {k: v.contiguous() for k, v in timm.create_model("resnet18", num_classes=3).state_dict().items()}
    save_file(other, tmp_path / "resnet.safetensors")
    meta = MetaFormer(depths=(1, 1, 1, 1), dims=(8, 12, 16, 20), num_classes=3)
    with pytest.raises(FanlensError, match=r"does not fit the model MetaFormer: \d+ missing keys .*"
                                           r"\(The model's checkpoint filter failed on it too: KeyError"):
        load_checkpoint(meta, tmp_path / "resnet.safetensors")
    own = {k: v.contiguous() + 1 for k, v in meta.state_dict().items()}
    save_file(own, tmp_path / "meta.safetensors")

    def failing(sd, model):
        raise RuntimeError("written for another release")

    load_checkpoint(meta, tmp_path / "meta.safetensors", filter_fn=failing)
    assert all(torch.equal(v, own[k]) for k, v in meta.state_dict().items())


def test_pickled_code_is_never_run(tmp_path):
    class Evil:
        def __reduce__(self):
            return (exec, ("raise SystemExit('pickled code ran')",))

    import pickle

    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(FanlensError, match="weights_only=True"):
        fanlens.models.load_state_dict_file(tmp_path / "evil.pth")


@pytest.mark.parametrize(
    "images, match",
    [
        ("does/not/exist", "does not exist"),
        (torch.rand(2, 1, 64, 64), r"shape \(B, 3, H, W\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "float pixels"),
        (42, "images must be"),
    ],
)
def test_bad_images(tiny_vit, images, match):
    with pytest.raises(FanlensError, match=match):
        fanlens.spectrum(tiny_vit, images, progress=False)


@pytest.mark.parametrize("mode, match", [("L", "mode 'L'"), ("RGBA", "mode 'RGBA'")])
def test_grayscale_and_rgba_are_rejected(tiny_vit, tmp_path, mode, match):
    write_images(tmp_path / "i", 1, mode=mode)
    with pytest.raises(FanlensError, match=match):
        fanlens.spectrum(tiny_vit, tmp_path / "i", progress=False)


def test_corrupt_and_empty_folders(tiny_vit, tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.png").write_bytes(b"not an image at all")
    with pytest.raises(FanlensError, match="cannot be read"):
        fanlens.spectrum(tiny_vit, tmp_path / "c", progress=False)
    (tmp_path / "e").mkdir()
    with pytest.raises(FanlensError, match="holds none"):
        fanlens.spectrum(tiny_vit, tmp_path / "e", progress=False)


def test_forward_failure_names_the_input_shape(tiny_vit):
    # pixels of another size than a strict patch embedding takes: refused before the forward, in one line
    with pytest.raises(FanlensError, match=r"input_size must be the 64x64 this model was built for\. Got 32x32"):
        fanlens.spectrum(tiny_vit, _pixels(1, 32), progress=False)
    # a forward that fails for the model's own reasons: one line naming the input shape
    with pytest.raises(FanlensError, match=r"forward pass failed on an input of shape \(1, 3, 32, 32\)"):
        fanlens.spectrum(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(7, 2)),
                         _pixels(1, 32), blocks="0,2", progress=False)


def test_analyze_equals_separate_spectrum_and_probe(tiny_vit):
    x = _pixels(5, seed=9)
    spec, probe = fanlens.analyze(tiny_vit, x, sigmas=(0.0, 0.2), batch_size=2, progress=False)
    spec2 = fanlens.spectrum(tiny_vit, x, batch_size=2, progress=False)
    probe2 = fanlens.noise_probe(tiny_vit, x, sigmas=(0.0, 0.2), batch_size=2, progress=False)
    np.testing.assert_allclose(spec.count_mean, spec2.count_mean, atol=1e-6)
    np.testing.assert_allclose(spec.eig_mean, spec2.eig_mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(probe.mean, probe2.mean, rtol=1e-5)
    assert probe.values(0.0).tolist() == [0.0] * 3
    assert spec.blocks == spec2.blocks and probe.blocks == probe2.blocks


def test_dimension_measures_reported_like_counts(tiny_vit):
    x = _pixels(3, seed=5)
    r = fanlens.spectrum(tiny_vit, x, rules=("twonn", "rel_threshold", "rankme"), batch_size=2, progress=False)
    assert r.rules == ("twonn", "rel_threshold", "rankme")
    cfg = data_config(tiny_vit)
    with torch.no_grad(), fanlens.TokenCapture(tiny_vit) as cap:
        cap.run(cfg.normalize(x))
        bts = list(cap.block_tokens())
    for li, bt in enumerate(bts):
        tw = fanlens.spectral.twonn(bt.tokens.double())
        rk = fanlens.spectral.rankme(bt.tokens.double())
        np.testing.assert_allclose(r.per_image[:, li, 0], tw.numpy(), rtol=1e-4)
        np.testing.assert_allclose(r.per_image[:, li, 2], rk.numpy(), rtol=1e-4)
        assert r.count("rankme")[li] == pytest.approx(rk.mean().item(), rel=1e-4)
    rows = [row for row in r.rows() if row["rule"] == "twonn" and row["statistic"] == "mean"]
    assert {row["metric"] for row in rows} == {"dimension"}
    assert len(rows) == len(bts) and float(rows[0]["value"]) == pytest.approx(r.count("twonn")[0], rel=1e-6)


def test_analyze_groups_the_tokens_of_its_own_pass(tiny_vit):
    x = _pixels(5, seed=6)
    seen = []
    h = tiny_vit.patch_embed.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        spec, probe, groups = fanlens.analyze(tiny_vit, x, sigmas=(0.1,), rules=("rel_threshold",), groups=2,
                                              batch_size=2, progress=False)
    finally:
        h.remove()
    assert seen == [4, 4, 2]  # clean + noisy per batch: nothing forwarded again for the groups
    alone = fanlens.group_tokens(tiny_vit, x, n_clusters=2, batch_size=2, progress=False)
    assert [b.name for b in groups.blocks] == [b.name for b in alone.blocks]
    for a, b in zip(groups.labels, alone.labels):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(groups.pixels, alone.pixels)
    assert groups.provenance.params["n_clusters"] == 2 and "analyze" in groups.provenance.params["computed_by"]
    spec2, probe2 = fanlens.analyze(tiny_vit, x, sigmas=(0.1,), rules=("rel_threshold",), batch_size=2,
                                    progress=False)
    np.testing.assert_array_equal(spec.count_mean, spec2.count_mean)
    auto = fanlens.analyze(tiny_vit, x, sigmas=(0.1,), rules=("rel_threshold",), groups="auto", progress=False)[2]
    assert auto.n_clusters.min() >= 1
    with pytest.raises(FanlensError, match="neither checkpointed"):
        fanlens.analyze(tiny_vit, x, groups=2, state_dir="somewhere", progress=False)
    with pytest.raises(FanlensError, match="groups must be"):
        fanlens.analyze(tiny_vit, x, groups=0, progress=False)


def test_token_capture_takes_a_loaded_model_and_hints_at_a_spec(tiny_vit):
    lm = fanlens.build_model(tiny_vit)
    with fanlens.TokenCapture(lm) as cap:
        cap.run(torch.rand(1, 3, 64, 64))
        assert len(list(cap.block_tokens())) == 3
    with pytest.raises(FanlensError, match=r"a fanlens LoadedModel. Got str instead \(a model spec string is built "
                                           r"by fanlens.build_model\(spec\)"):
        fanlens.TokenCapture("vit_tiny_patch16_224")


def test_a_torch_torchvision_mismatch_is_one_line_naming_both():
    from importlib import metadata

    from fanlens._deps import torchvision_mismatch

    msg = torchvision_mismatch(RuntimeError("operator torchvision::nms does not exist\nmore lines"))
    assert "\n" not in msg
    assert f"torchvision {metadata.version('torchvision')} does not match torch {metadata.version('torch')}" in msg
    minor = int(metadata.version("torch").split(".")[1])
    assert f"pip install 'torchvision==0.{minor + 15}.*'" in msg


def test_pretrained_offline_names_the_command_line_spelling(monkeypatch):
    import timm

    def offline(*a, **k):
        raise OSError("We couldn't connect to the hub")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(FanlensError, match=r"checkpoint=PATH \(on the command line: --checkpoint FILE\)"):
        fanlens.build_model("resnet18", pretrained=True)


def test_pretrained_without_network_fails_fast_without_the_hub_retries(monkeypatch):
    import socket

    import timm

    calls = []

    def no_route(addr, timeout=None):
        calls.append((addr, timeout))
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(socket, "create_connection", no_route)
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: pytest.fail("the download must not be tried"))
    with pytest.raises(FanlensError, match=r"huggingface.co did not answer within 3 s \(gaierror\).*--checkpoint FILE"):
        fanlens.build_model("resnet18", pretrained=True)
    assert calls == [(("huggingface.co", 443), 3.0)]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FanlensError, match="HF_HUB_OFFLINE is set"):
        fanlens.build_model("resnet18", pretrained=True)
