"""fanlens.corruptions: the 19 ImageNet-C corruptions on batched tensors.

Part 1 needs nothing but fanlens: interface, errors, determinism by (seed, image index), sizes.
Part 2 compares with the reference implementation (``imagecorruptions-imaug``, a test-only
dependency that ``.ci/run`` installs; skipped with the reason where it is missing)."""

from __future__ import annotations

import pytest
import torch

from fanlens import FanlensError
from fanlens import corruptions as C

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "speckle_noise", "glass_blur", "motion_blur", "snow",
          "frost", "fog", "elastic_transform", "spatter")
DETERMINISTIC = tuple(n for n in C.NAMES if n not in RANDOM)


def _pixels(b=4, h=40, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, h, w, generator=g)


# --------------------------------------------------------------------------- interface
def test_names_follow_imagenet_c():
    assert len(C.NAMES) == 19 and len(C.BENCHMARK) == 15 and len(C.HELD_OUT) == 4
    assert C.NAMES[:3] == ("gaussian_noise", "shot_noise", "impulse_noise")
    assert C.BENCHMARK[-1] == "jpeg_compression" and C.HELD_OUT == ("speckle_noise", "gaussian_blur", "spatter",
                                                                     "saturate")
    assert sorted(n for f in C.FAMILIES.values() for n in f) == sorted(C.BENCHMARK)


@pytest.mark.parametrize("name", C.NAMES)
def test_every_corruption_keeps_shape_range_dtype_at_any_size(name):
    for h, w in ((64, 64), (40, 72), (23, 31)):
        x = _pixels(2, h, w)
        for dtype in (torch.float32, torch.float64):
            y = C.corrupt(x.to(dtype), name, 3)
            assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
            assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
            assert torch.isfinite(y).all()
            assert not torch.equal(y, x.to(dtype)) or name == "pixelate" and min(h, w) < 4


@pytest.mark.parametrize("name", C.NAMES)
def test_output_is_a_function_of_seed_and_image_index(name):
    x = _pixels(5)
    whole = C.corrupt(x, name, 4, seed=3, indices=[10, 11, 12, 13, 14])
    for i in range(5):  # one image alone, anywhere in a batch: the same pixels
        alone = C.corrupt(x[i : i + 1], name, 4, seed=3, indices=[10 + i])
        torch.testing.assert_close(alone[0], whole[i], rtol=0, atol=0)  # bit for bit: no batched filter
    reordered = C.corrupt(x.flip(0), name, 4, seed=3, indices=[14, 13, 12, 11, 10])
    torch.testing.assert_close(reordered.flip(0), whole, rtol=0, atol=0)
    other_seed = C.corrupt(x, name, 4, seed=4, indices=[10, 11, 12, 13, 14])
    if name in RANDOM:
        assert not torch.allclose(other_seed, whole)
    else:
        torch.testing.assert_close(other_seed, whole, rtol=0, atol=0)


def test_severity_grows_the_change():
    x = _pixels(4, 64, 64)
    for name in ("gaussian_noise", "gaussian_blur", "contrast", "shot_noise", "impulse_noise"):
        d = [float((C.corrupt(x, name, s) - x).abs().mean()) for s in C.SEVERITIES]
        assert all(b > a for a, b in zip(d, d[1:])), (name, d)


@pytest.mark.parametrize("kwargs, match", [
    (dict(name="fogg", severity=1), "name must be one of"),
    (dict(name="fog", severity=0), "severity must be an int in 1..5. Got 0"),
    (dict(name="fog", severity=2.0), "severity must be an int in 1..5"),
    (dict(name="fog", severity=1, seed=-1), "seed must be an int"),
    (dict(name="fog", severity=1, indices=[0]), "indices must hold one index per image"),
    (dict(name="fog", severity=1, indices=[0, -1, 2, 3]), "indices must be non-negative"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(FanlensError, match=match):
        C.corrupt(_pixels(), **kwargs)


def test_bad_images():
    with pytest.raises(FanlensError, match=r"images must be a tensor of shape \(B, 3, H, W\). Got \(3, 8, 8\)"):
        C.corrupt(torch.rand(3, 8, 8), "fog", 1)
    with pytest.raises(FanlensError, match="pixel values in \\[0, 1\\]"):
        C.corrupt(torch.rand(1, 3, 8, 8) * 255, "fog", 1)
    with pytest.raises(FanlensError, match="float pixels"):
        C.corrupt(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), "fog", 1)


def test_known_values():
    x = torch.full((1, 3, 8, 8), 0.5)
    x[0, 0, :4] = 0.9
    # contrast: (x - mean) * c + mean per channel
    m = x.mean(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(C.corrupt(x, "contrast", 1), (x - m) * 0.4 + m)
    # brightness of a grey pixel: V + c, no hue or saturation
    g = torch.full((1, 3, 4, 4), 0.5)
    torch.testing.assert_close(C.corrupt(g, "brightness", 3), torch.full_like(g, 0.8))
    # saturate at severity 2 scales the saturation by 0.1: a pure red (S=1) becomes (1, 0.9, 0.9)
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 1
    torch.testing.assert_close(C.corrupt(red, "saturate", 2)[0, :, 0, 0], torch.tensor([1.0, 0.9, 0.9]))
    # gaussian blur of a constant image is the image
    torch.testing.assert_close(C.corrupt(g, "gaussian_blur", 5), g)


def _glass_loop(off, delta):
    """Glass blur's pass the slow way: visit the inner pixels bottom-right to top-left, each
    taking its source's current value (here: the source's index)."""
    b, h, w = off.shape[:3]
    idx = torch.arange(h * w).reshape(h, w).repeat(b, 1, 1)
    for bi in range(b):
        for y in range(h - delta, delta, -1):
            for x in range(w - delta, delta, -1):
                dx, dy = int(off[bi, y, x, 0]), int(off[bi, y, x, 1])
                idx[bi, y, x] = idx[bi, y + dy, x + dx].clone()
    return idx.reshape(b, h * w)


@pytest.mark.parametrize("delta", [1, 2, 3, 4])
def test_glass_blur_sources_equal_the_sequential_loop(delta):
    g = torch.Generator().manual_seed(delta)
    for h, w in ((13, 17), (2 * delta + 3, 2 * delta + 2), (24, 9)):
        off = torch.randint(-delta, delta, (3, h, w, 2), generator=g)
        assert torch.equal(C._glass_sources(off, delta), _glass_loop(off, delta))
    # a chain: every inner pixel copies its right neighbour, which was visited just before it,
    # so a whole inner row takes the value right of the visited area
    off = torch.zeros(1, 9, 9, 2, dtype=torch.long)
    off[..., 0] = 1
    src = C._glass_sources(off, 2).reshape(9, 9)
    assert src[4, 3:8].tolist() == [4 * 9 + 8] * 5 and src[1, 3].item() == 1 * 9 + 3


def test_hsv_corruptions_equal_the_hsv_round_trip():
    skimage = pytest.importorskip("skimage.color")
    x = _pixels(2, 16, 16, seed=5).double()  # corrupt works in float32: equal to 1e-6
    x[0, :, :3, :3] = 0.4  # grey: no hue
    x[0, :, 3:5, :3] = 0.0  # black
    x[1, 0, :2] = 1.0
    hsv = torch.from_numpy(skimage.rgb2hsv(x.permute(0, 2, 3, 1).numpy(), channel_axis=-1))
    for s, c in enumerate([0.1, 0.2, 0.3, 0.4, 0.5], 1):
        v = hsv.clone()
        v[..., 2] = (v[..., 2] + c).clip(0, 1)
        ref = torch.from_numpy(skimage.hsv2rgb(v.numpy(), channel_axis=-1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(C.corrupt(x, "brightness", s), ref.clamp(0, 1), rtol=0, atol=1e-6)
    for s, (c0, c1) in enumerate([(0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2)], 1):
        v = hsv.clone()
        v[..., 1] = (v[..., 1] * c0 + c1).clip(0, 1)
        ref = torch.from_numpy(skimage.hsv2rgb(v.numpy(), channel_axis=-1)).permute(0, 3, 1, 2)
        torch.testing.assert_close(C.corrupt(x, "saturate", s), ref.clamp(0, 1), rtol=0, atol=1e-6)


def test_gaussian_filter_equals_scipy_short_and_long_kernels():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = _pixels(2, 30, 41, seed=2).double()
    for sigma in (0.7, 1.5, 3.0, 6.0):  # 7 to 49 taps: shifted sums, then FFT
        for mode in ("nearest", "reflect"):
            ref = ndimage.gaussian_filter(x.numpy(), (0, 0, sigma, sigma), mode=mode)
            out = C._gaussian_filter(x.float(), sigma, mode=mode)
            assert float((out.double() - torch.from_numpy(ref)).abs().max()) < 1e-6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_matches_cpu():  # pragma: no cover - needs a GPU
    x = _pixels(3, 64, 64)
    for name in C.NAMES:
        cpu = C.corrupt(x, name, 3, seed=1)
        gpu = C.corrupt(x.cuda(), name, 3, seed=1)
        assert gpu.device.type == "cuda"
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=2e-3 if name == "jpeg_compression" else 1e-4)


def test_split_over_worker_threads_changes_at_most_rounding():
    """corrupt() hands the images of a batch to the caller's cores (fanlens._threads.for_chunks):
    the same pixels on 1 and 2 threads, bit for bit (motion blur sums each image's copies on its own)."""
    x = torch.nn.functional.interpolate(torch.rand(5, 3, 12, 12, generator=torch.Generator().manual_seed(0)),
                                        size=72, mode="bilinear").clamp(0, 1)
    before = torch.get_num_threads()
    worst = {}
    try:
        for name in C.NAMES:
            for s in (1, 5):
                torch.set_num_threads(1)
                a = C.corrupt(x, name, s, seed=3, indices=[4, 9, 1, 7, 2])
                torch.set_num_threads(2)
                b = C.corrupt(x, name, s, seed=3, indices=[4, 9, 1, 7, 2])
                worst[name] = max(worst.get(name, 0.0), float((a - b).abs().max()))
    finally:
        torch.set_num_threads(before)
    assert all(v == 0.0 for v in worst.values()), {k: v for k, v in worst.items() if v}


@pytest.mark.parametrize("mode", ["inference", "no_grad"])
def test_worker_threads_take_the_callers_autograd_mode(mode):
    """The output is written by worker threads; autograd's modes are thread-local, so the workers
    must run in the caller's: under inference mode, a batch on 2 threads gives an inference tensor
    with the pixels of 1 thread (it used to fail: an in-place write to an inference tensor)."""
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    before = torch.get_num_threads()
    ctx = torch.inference_mode if mode == "inference" else torch.no_grad
    try:
        torch.set_num_threads(1)
        ref = C.corrupt(x, "impulse_noise", 3, seed=2)
        torch.set_num_threads(2)
        with ctx():
            y = C.corrupt(x, "impulse_noise", 3, seed=2)
    finally:
        torch.set_num_threads(before)
    assert y.is_inference() == (mode == "inference")
    assert torch.equal(y, ref)


def test_impulse_noise_salts_and_peppers_with_the_references_probabilities():
    """Severity s flips each value with probability c_s (0.03 ... 0.27), half to 1 (salt), half to 0
    (pepper), the rest untouched, evenly over channels and rows: counted on 3 x 200 x 200 values of a
    grey image (the positions are drawn as the gaps of a Bernoulli process)."""
    x = torch.full((1, 3, 200, 200), 0.5)
    n = x.numel()
    for s, c in zip(C.SEVERITIES, (0.03, 0.06, 0.09, 0.17, 0.27)):
        y = C.corrupt(x, "impulse_noise", s, seed=5)
        salt, pepper = int((y == 1).sum()), int((y == 0).sum())
        assert salt + pepper + int((y == 0.5).sum()) == n
        sd = (n * c / 2 * (1 - c / 2)) ** 0.5  # binomial standard deviation of each count
        assert abs(salt - n * c / 2) < 5 * sd and abs(pepper - n * c / 2) < 5 * sd, (s, salt, pepper)
        # spread evenly: each channel and each band of rows is flipped at the rate c
        flipped = (y != 0.5)[0]
        for part in [flipped[ch] for ch in range(3)] + list(flipped.reshape(3, 4, 50, 200).transpose(0, 1)):
            k, m = int(part.sum()), part.numel()
            assert abs(k - m * c) < 5 * (m * c * (1 - c)) ** 0.5, (s, k, m)


@pytest.mark.parametrize("name", C.NAMES)
def test_channels_last_input_gives_the_same_pixels_and_the_output_is_new_memory(name):
    """Images converted from (H, W, C) arrays arrive channels-last: the same pixels as contiguous ones,
    bit for bit; the output never shares memory with the caller's images (a corruption that changes
    nothing, e.g. pixelate on a 3-pixel side, still hands back a copy)."""
    x = _pixels(3, 24, 20)
    cl = x.contiguous(memory_format=torch.channels_last)
    assert not cl.is_contiguous()
    for sev in (1, 2, 3) if name in ("pixelate", "jpeg_compression") else (2,):  # these two read channels-last as is
        a, b = C.corrupt(x, name, sev, seed=1), C.corrupt(cl, name, sev, seed=1)
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    for src in (x, x[:, :, :3, :3].contiguous()):
        y = C.corrupt(src, name, 1, seed=1)
        assert y.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()
        before = src.clone()
        y.add_(0.5)
        assert torch.equal(src, before)


def test_defocus_box_sums_equal_the_kernel_they_replace():
    """Severities 1-3 correlate with the defocus disk as shifted horizontal box sums and the kernel's
    separable blur (no FFT); that is the blurred-disk kernel itself, to float32 rounding, at any size
    (the image padded the same way). Severities 4-5 keep the kernel (the reference's mirrored blur of
    the kernel folds mass back at its edges: no box form)."""
    assert [C._disk_as_boxes(r, a) is not None for r, a in [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)]] == [
        True, True, True, False, False]
    kernel, d, n, g = C._disk_parts(3, 0.1)
    assert n == 29 and abs(kernel.sum() - 1) < 1e-12  # 29 lattice points within radius 3
    gen = torch.Generator().manual_seed(0)
    for h, w in ((64, 64), (40, 72), (23, 31), (9, 9), (3, 17), (2, 2)):
        x = torch.rand(2, 3, h, w, generator=gen)
        for s, (radius, alias) in enumerate([(3, 0.1), (4, 0.5), (6, 0.5)], start=1):
            direct = C._conv2d_same(x, C._disk(radius, alias), "mirror")
            assert float((C._defocus_blur(x, s, None) - direct).abs().max()) < 1e-6, (h, w, s)


def test_the_chamfer_scans_three_ways_give_the_same_bits(monkeypatch):
    """On the CPU the scan runs in numpy; in torch (other devices) few rows reduce over a window view,
    many take elementwise minimums: min is exact and each candidate is the same float sum, so all
    three give identical distances (spatter's pixels do not depend on the device's path or the batch
    size). A hand-computed case pins the values: one edge pixel, distances 1, 1.4 and 2.1969 to its
    edge, diagonal and knight's-move neighbours, 2 two steps along a row, capped at 3."""
    gen = torch.Generator().manual_seed(0)
    for b, h, w in ((1, 64, 64), (3, 40, 57), (2, 5, 5), (1, 2, 2), (1, 1, 9), (2, 33, 1)):
        edges = torch.rand(b, 1, h, w, generator=gen) < 0.03
        in_numpy = C._chamfer_distance(edges, 20.0)
        monkeypatch.setattr(C, "_CHAMFER_IN_NUMPY", False)
        monkeypatch.setattr(C, "_CHAMFER_VIEW_MAX", 0)
        chain = C._chamfer_distance(edges, 20.0)
        monkeypatch.setattr(C, "_CHAMFER_VIEW_MAX", 10**9)
        assert torch.equal(C._chamfer_distance(edges, 20.0), chain)
        assert torch.equal(in_numpy, chain)
        monkeypatch.setattr(C, "_CHAMFER_IN_NUMPY", True)
    assert float(chain.max()) <= 20.0
    one = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    one[0, 0, 3, 3] = True
    d = C._chamfer_distance(one, 3.0)[0, 0]
    assert float(d[3, 3]) == 0.0 and float(d[3, 4]) == 1.0 and float(d[2, 3]) == 1.0
    assert abs(float(d[2, 2]) - 1.4) < 1e-6 and abs(float(d[1, 2]) - 2.1969) < 1e-6 and abs(float(d[4, 5]) - 2.1969) < 1e-6
    assert abs(float(d[3, 5]) - 2.0) < 1e-6 and float(d[0, 0]) == 3.0  # 3 x 1.4 = 4.2 is capped at 3


def test_canny_hysteresis_keeps_weak_chains_touching_a_strong_edge_only():
    """A hand-made level image: a bar of level 30 (its steps have Sobel magnitude 4 x 30 = 120, between
    the thresholds 50 and 150: weak) that turns to 255 in its lower half (magnitude 1020: strong), and
    a second step to 30, eight columns away, that touches nothing strong. The bar's weak upper edges
    survive through their 8-connection to the strong lower ones; the isolated weak step is dropped."""
    level = torch.zeros(1, 1, 24, 32)
    level[..., :, 6:14] = 30.0
    level[..., 12:, 6:14] = 255.0
    level[..., :, 22:] = 30.0
    edge = C._canny(level, 50, 150)[0, 0]
    assert bool(edge[12:, 5:7].any()) and bool(edge[:10, 5:7].any())  # strong below, weak above: kept
    assert bool(edge[:10, 13:15].any())
    assert not bool(edge[:, 18:].any())  # the isolated weak step
    assert not bool(C._canny(level, 50, 2040)[0, 0].any())  # L1 magnitudes <= 2 x 1020: none strong, nothing
    assert bool(C._canny(level, 50, 100)[0, 0, :, 21:23].any())  # 120 > 100: the second step is strong

def test_jpeg_silences_torchvisions_deprecation_without_leaking_filters(monkeypatch):
    """torchvision 0.29 warns on every call of its JPEG wrappers; corrupt() calls the operators behind them
    directly, or (where those are missing) the wrappers with that one message ignored in the calling thread
    (catch_warnings inside worker threads raced: filters leaked). Either way no warning reaches the caller,
    the process's filters stay as they were, and both ways give the same pixels."""
    import warnings

    before = torch.get_num_threads()
    x = _pixels(4, 32, 32)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)
            filters = list(warnings.filters)
            outs = []
            for codec in (C._jpeg_operators(), C._jpeg_wrappers()):
                monkeypatch.setattr(C, "_jpeg_codec", lambda codec=codec: codec)
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    outs.append(C.corrupt(x, "jpeg_compression", 3))
                    assert outs[-1].shape == (4, 3, 32, 32)
            assert warnings.filters == filters
        assert all(torch.equal(o, outs[0]) for o in outs)
    finally:
        torch.set_num_threads(before)


def test_pixelate_output_in_range_without_a_clamp_and_clamped_after_an_admitted_overshoot():
    """Pixelate averages and copies the input's values, so it skips the clamp when the input is in [0, 1]:
    a constant image comes back exactly (0.25 and 1.0 at every severity), extreme pixels stay in [0, 1]; an
    input that check_pixels admits with its 1e-3 overshoot (1.0005) is clamped to 1, as every corruption's."""
    for v in (0.25, 1.0):
        x = torch.full((2, 3, 40, 36), v)
        for s in C.SEVERITIES:
            assert torch.equal(C.corrupt(x, "pixelate", s), x)
    x = (torch.rand(3, 3, 50, 50, generator=torch.Generator().manual_seed(0)) > 0.5).float()  # 0s and 1s
    for s in C.SEVERITIES:
        y = C.corrupt(x, "pixelate", s)
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    over = torch.full((1, 3, 40, 40), 1.0005)
    for s in C.SEVERITIES:
        assert torch.equal(C.corrupt(over, "pixelate", s), torch.ones_like(over))


def test_pixelate_channels_last_equals_contiguous_where_windows_share_or_skip_a_pixel():
    """Sides whose BOX windows leave a pixel out (17 -> 6 at severity 3) or share one (21 -> 10 at severity 2): the
    channels-last path (rows summed on (B, H, W * 3) memory, columns on a (B, 3, W, oh) copy) gives the
    contiguous path's pixels bit for bit, and each output block is its window's mean."""
    for h, w in ((17, 21), (21, 17), (127, 57)):
        x = _pixels(2, h, w)
        cl = x.contiguous(memory_format=torch.channels_last)
        for sev in C.SEVERITIES:
            a, b = C.corrupt(x, "pixelate", sev), C.corrupt(cl, "pixelate", sev)
            assert torch.equal(a, b), (h, w, sev)
            c = [0.6, 0.5, 0.4, 0.3, 0.25][sev - 1]
            oh, ow = max(int(h * c), 1), max(int(w * c), 1)
            iy, cy = C._box_windows_cpu(h, oh)
            ix, cx = C._box_windows_cpu(w, ow)
            my, mx = C._nearest_map(h, oh), C._nearest_map(w, ow)
            for yy, xx in ((0, 0), (h - 1, w - 1), (h // 2, w // 3)):
                rows, cols = iy[my[yy], : int(cy[my[yy]])], ix[mx[xx], : int(cx[mx[xx]])]
                want = x[:, :, rows][:, :, :, cols].double().mean((-2, -1))
                assert float((a[:, :, yy, xx].double() - want).abs().max()) < 1e-6, (h, w, sev, yy, xx)


@pytest.mark.parametrize("n_in, n_out", [(128, 76), (97, 58), (130, 38), (64, 32), (50, 49), (17, 6), (21, 10),
                                         (127, 76), (57, 34)])
def test_pixelate_box_sums_by_slices_and_by_window_adds_give_the_same_bits(monkeypatch, n_in, n_out):
    """The BOX window sums have two implementations, strided slices per phase of the windows' period and
    each row added into its window (``index_add_``; :data:`fanlens.corruptions._SLICE_MAX_PERIOD` and
    ``_INDEX_ADD_MAX_NUMEL`` pick by the period and the size); both add each window's pixels in order, so the sums agree bit for bit, along rows and
    columns, and both equal the windows summed one by one. (17, 6) and (127, 76) have a pixel in no window
    (a centre on a boundary, rounded out of both), (21, 10) and (57, 34) a pixel in two."""
    idx, count = C._box_windows_cpu(n_in, n_out)
    gap, shared = int(count.sum()) < n_in, int(count.sum()) > n_in
    assert (gap, shared) == {(17, 6): (True, False), (127, 76): (True, False), (21, 10): (False, True),
                             (57, 34): (False, True)}.get((n_in, n_out), (False, False))
    t = torch.rand(2, 3, n_in, n_in, generator=torch.Generator().manual_seed(n_out))
    idx, count = C._box_windows_cpu(n_in, n_out)
    by = {}
    for period in (0, 10**6):  # every period by window adds, every period by slices (at any size)
        monkeypatch.setattr(C, "_SLICE_MAX_PERIOD", period)
        monkeypatch.setattr(C, "_INDEX_ADD_MAX_NUMEL", 10**9 if period == 0 else 0)
        by[period] = (C._box_sums(t, -2, n_out), C._box_sums(t, -1, n_out))
    assert torch.equal(by[0][0], by[10**6][0]) and torch.equal(by[0][1], by[10**6][1])
    for i in range(n_out):
        rows = idx[i, : int(count[i])].tolist()
        want = t[:, :, rows[0]].clone()
        for r in rows[1:]:
            want += t[:, :, r]
        assert torch.equal(by[0][0][:, :, i], want)
