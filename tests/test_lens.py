"""fanlens.Lens: one capture of the clean tokens serves every later analysis."""

from __future__ import annotations

import dataclasses
import hashlib
import os

import numpy as np
import pytest
import torch

import fanlens
from fanlens import FanlensError, Lens
from fanlens._cache import TokenCache
from fanlens.capture import TokenCapture

from conftest import count_hooks
from tiny_models import tiny_vit


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return tiny_vit().eval()


@pytest.fixture
def images():
    return torch.rand(10, 3, 64, 64, generator=torch.Generator().manual_seed(1))


class Forwards:
    """Records every image given to the model (hash of its bytes) and the batch sizes."""

    def __init__(self, model):
        self.seen: list[str] = []
        self.sizes: list[int] = []
        self.handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, _mod, args):
        x = args[0]
        self.sizes.append(x.shape[0])
        self.seen += [hashlib.sha1(v.numpy().tobytes()).hexdigest() for v in x.detach().contiguous()]

    def clean_of(self, lens, pixels) -> int:
        """How many of the seen inputs are the clean (normalised) ``pixels``."""
        clean = {hashlib.sha1(v.numpy().tobytes()).hexdigest() for v in lens.setup.cfg.normalize(pixels)}
        return sum(1 for h in self.seen if h in clean)


def test_three_questions_cost_one_clean_forward_per_image(vit, images):
    fw = Forwards(vit)
    lens = Lens(vit, images, batch_size=4, progress=False)
    lens.spectrum(rules=("rel_threshold", "eigengap"))
    assert fw.sizes == [4, 4, 2]  # the clean images, once
    lens.probe(sigmas=(0.1, 0.2))
    assert fw.sizes[3:] == [8, 8, 4]  # only the two noisy copies of each image
    lens.groups(k=2)
    lens.colours(n_images=3)
    lens.tokens("blocks.1")
    assert len(fw.sizes) == 6  # groups, colours and tokens forward nothing
    assert fw.clean_of(lens, images) == 10 and len(fw.seen) == 30
    assert len(lens.cache) == 10 and lens.cache.images_forwarded == 10
    fw.handle.remove()
    assert count_hooks(vit) == 0


def test_lens_results_equal_the_module_functions(vit, images):
    lens = Lens(vit, images, batch_size=4, progress=False)
    spec = lens.spectrum()
    probe = lens.probe(sigmas=(0.05, 0.2))
    groups = lens.groups(k=3, n_images=4)
    kw = dict(batch_size=4, progress=False)
    spec2 = fanlens.spectrum(vit, images, **kw)
    probe2 = fanlens.noise_probe(vit, images, sigmas=(0.05, 0.2), **kw)
    groups2 = fanlens.group_tokens(vit, images, n_clusters=3, n_images=4, **kw)
    np.testing.assert_array_equal(spec.per_image, spec2.per_image)
    # the clean tokens come from a clean-only batch, the module function's from a joint one
    np.testing.assert_allclose(probe.per_image, probe2.per_image, rtol=1e-5, atol=1e-7)
    for a, b in zip(groups.labels, groups2.labels):
        np.testing.assert_array_equal(a, b)
    assert spec.provenance.params["lens_options"]["batch_size"] == 4
    assert "cache_bytes" not in spec.provenance.params["lens_options"]  # how, not what, is computed


def test_tokens_are_the_capture_of_each_block(vit, images):
    lens = Lens(vit, images, batch_size=3, progress=False)
    bt = lens.tokens(2)
    with torch.inference_mode(), TokenCapture(vit) as cap:
        cap.run(lens.setup.cfg.normalize(images))
        direct = list(cap.block_tokens())
    assert bt.tokens.shape == (10, 16, 192) and bt.label == direct[2].label
    torch.testing.assert_close(bt.tokens, direct[2].tokens, rtol=1e-5, atol=1e-5)
    assert lens.tokens(direct[0].label).tokens.shape == (10, 16, 192)
    with pytest.raises(FanlensError, match=r"block must be one of \['blocks.0'"):
        lens.tokens("head")
    with pytest.raises(FanlensError, match="block must be an index below 3"):
        lens.tokens(7)


def test_cache_spills_to_a_temporary_folder_and_removes_it(vit, images):
    fw = Forwards(vit)
    lens = Lens(vit, images, batch_size=4, progress=False, cache_bytes=1)  # every entry beyond the budget
    a = lens.tokens(1).tokens.clone()
    assert lens.cache.bytes_in_memory == 0 and lens.cache.bytes_on_disk > 0
    folder = lens.cache._dir
    assert folder is not None and len(os.listdir(folder)) == 3  # one file per batch
    lens.spectrum()
    assert len(fw.sizes) == 3  # read back from disk, nothing forwarded again
    ref = Lens(vit, images, batch_size=4, progress=False).tokens(1).tokens
    torch.testing.assert_close(a, ref, rtol=0, atol=0)
    lens.close()
    assert not os.path.exists(folder)


def test_cache_without_spill_recomputes_beyond_the_budget(vit, images):
    fw = Forwards(vit)
    lens = Lens(vit, images, batch_size=4, progress=False, cache_bytes=1, cache_spill=False)
    lens.spectrum()
    lens.spectrum()
    assert sum(fw.sizes) == 20 and lens.cache.dropped == 20  # each analysis forwards the images again
    with pytest.raises(FanlensError, match="do not fit cache_bytes=1 with cache_spill=False"):
        lens.tokens(0)


def test_cache_serves_other_batchings_by_image_index():
    from fanlens.capture import BlockTokens, TokenLayout

    cache = TokenCache(10**6)
    lay = TokenLayout("NLC", 0, (2, 2), 2)
    for idx in ([0, 1, 2], [3, 4]):
        t = torch.tensor(idx, dtype=torch.float32)[:, None, None].expand(len(idx), 4, 2).clone()
        cache.put(idx, [BlockTokens("b", 0, t, t[:, :0], lay)], None)
    got = cache.get([2, 3, 0])
    assert got.blocks[0].tokens[:, 0, 0].tolist() == [2.0, 3.0, 0.0]
    assert cache.get([1, 2]).blocks[0].tokens[:, 0, 0].tolist() == [1.0, 2.0]
    assert cache.get([4, 5]) is None  # image 5 was never captured
    assert cache.get([0], need_output=True) is None  # no output kept for these rows


def test_robustness_reads_the_cached_clean_outputs(vit, images):
    fw = Forwards(vit)
    labels = torch.arange(10) % 5
    lens = Lens(vit, images, batch_size=5, progress=False)
    lens.spectrum()
    n = len(fw.seen)
    rob = lens.robustness(corruptions="contrast", severities=(1, 2), labels=labels)
    assert len(fw.seen) - n == 20  # two corrupted copies per image; the clean predictions from the cache
    ref = fanlens.robustness(vit, images, corruptions="contrast", severities=(1, 2), labels=labels, batch_size=5,
                             progress=False)
    np.testing.assert_array_equal(rob.per_image, ref.per_image)


def test_options_are_validated_once_and_frozen(vit, images):
    with pytest.raises(FanlensError, match=r"Lens options must be among .* Got \['rules'\] instead"):
        Lens(vit, images, rules=("rel_threshold",))
    with pytest.raises(FanlensError, match="batch_size must be"):
        Lens(vit, images, batch_size=0)
    with pytest.raises(FanlensError, match="cache_bytes must be"):
        Lens(vit, images, cache_bytes=-1)
    with pytest.raises(FanlensError, match="progress must be True or False"):
        Lens(vit, images, progress="no")
    lens = Lens(vit, images, progress=False, input_size=64)
    assert lens.options.input_size == (64, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        lens.options.batch_size = 3
    with pytest.raises(FanlensError, match="analyze takes the spectrum's parameters"):
        lens.analyze(sigma=0.1)


def test_failing_analysis_leaves_no_hook_and_the_cache_usable(vit, images):
    lens = Lens(vit, images, batch_size=4, progress=False)
    with pytest.raises(FanlensError, match="n_clusters must be <= the token count"):
        lens.groups(k=99)
    assert count_hooks(vit) == 0
    assert lens.spectrum().n_images == 10


def test_state_dir_holds_one_checkpoint_folder_per_analysis(vit, images, tmp_path, monkeypatch):
    import fanlens.lens as lens_module

    folders = []
    real = lens_module.run_state

    def spy(folder, *args):
        folders.append(folder)
        return real(folder, *args)

    monkeypatch.setattr(lens_module, "run_state", spy)
    lens = Lens(vit, images, batch_size=4, progress=False, state_dir=tmp_path / "state", checkpoint_every=1)
    spec = lens.spectrum()
    lens.probe(sigmas=0.1)
    assert folders == [str(tmp_path / "state" / "spectrum"), str(tmp_path / "state" / "probe")]
    ref = fanlens.spectrum(vit, images, batch_size=4, progress=False, state_dir=tmp_path / "flat")
    assert folders[-1] == str(tmp_path / "flat")  # a module function's state_dir is the folder itself
    np.testing.assert_array_equal(spec.per_image, ref.per_image)


def test_results_show_a_table_and_a_figure_in_jupyter(vit, images):
    import matplotlib.pyplot as plt

    lens = Lens(vit, images, batch_size=5, progress=False)
    spec = lens.spectrum(rules=("rel_threshold", "eigengap"))
    html = spec._repr_html_()
    assert "<table>" in html and "data:image/png;base64," in html
    assert html.count("<tr>") == 1 + 3  # header + one row per block
    header, rows = spec.summary_table()
    assert header == ["", "rel_threshold", "eigengap"]
    assert rows[0][1] == f"{spec.count('rel_threshold')[0]:.4g}"
    assert plt.get_fignums() == []  # the figure is closed after rendering
    probe = lens.probe(sigmas=(0.1, 0.3))
    assert probe.summary_table()[0] == ["", "sigma=0.1", "sigma=0.3"]


def test_report_of_a_lens_names_the_model_and_its_analyses(vit, images, tmp_path):
    lens = Lens(vit, images, batch_size=5, progress=False)
    with pytest.raises(FanlensError, match="report needs at least one analysis"):
        lens.report(tmp_path / "r0")
    lens.spectrum()
    lens.probe()
    page = lens.report(tmp_path / "r")
    text = page.read_text()
    assert "VisionTransformer" in text.split("</h1>")[0]
    assert sorted(p.name for p in (tmp_path / "r").glob("*.png")) == ["probe.png", "spectrum.png"]
    with pytest.raises(FanlensError, match="overwrite"):
        lens.report(tmp_path / "r")


def test_pure_noise_lens_needs_no_images(vit):
    lens = Lens(vit, None, batch_size=4, progress=False)
    res = lens.probe(mode="pure", n_noise=6)
    assert res.n_images == 6 and res.mean.shape == (3, 1)
    with pytest.raises(FanlensError, match="spectrum needs images"):
        lens.spectrum()
