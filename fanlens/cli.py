"""``fanlens`` command line: parse, call the analysis, save. No computation lives here.

Bad input ends with a one-line ``fanlens: error: ...`` on stderr and exit code 2 (option
errors from argparse included). Every run writes through :class:`fanlens.runner.OutputFolder`:
the output folder (default ``fanlens_out/<command>``) is checked before any work, must be new
or empty unless ``--overwrite`` is given, and receives the run's files as one unit once the
analysis has finished, so a failing or interrupted run leaves earlier results intact.
``spectrum`` and ``probe`` checkpoint their accumulators (every ``--checkpoint-every``
batches and on Ctrl-C/SIGTERM); ``--resume`` continues an interrupted run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Sequence

from ._validation import FanlensError

__all__ = ["main", "build_parser"]

EXIT_USAGE = 2
DEFAULT_OUT = "fanlens_out"


class _Parser(argparse.ArgumentParser):
    """argparse with fanlens' one-line error format (``fanlens: error: ...``, exit 2)."""

    def error(self, message: str):  # noqa: D102 - argparse API
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        hint = f" (see fanlens {sub} --help)" if sub else " (see fanlens --help)"
        print(f"fanlens: error: {' '.join(message.split())}{hint}", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _add_zoo_run_options(p: argparse.ArgumentParser) -> None:
    """The options of the main job and of training-dynamics (held-out zoo images, sigmas, run)."""
    from .pipeline import DEFAULT_N_IMAGES, DEFAULT_SIGMAS

    p.add_argument("--n-images", type=int, default=None,
                   help=f"the zoo's held-out images (default {DEFAULT_N_IMAGES}); with --model, the first N of "
                        f"--images (default: all)")
    p.add_argument("--sigmas", default=",".join(f"{s:g}" for s in DEFAULT_SIGMAS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-progress", action="store_true")


def _add_output(p: argparse.ArgumentParser, command: str, *, resumable: bool = False) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None,
                   help=f"output folder, new or empty unless --overwrite (default: {DEFAULT_OUT}/{command})")
    o.add_argument("--overwrite", action="store_true",
                   help="replace the files of an earlier run in --out (other files there are kept)")
    if resumable:
        from .analysis import DEFAULT_CHECKPOINT_EVERY

        o.add_argument("--resume", action="store_true",
                       help="continue the interrupted run whose checkpoint is in --out (same options and images)")
        o.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY, metavar="N",
                       help=f"checkpoint every N batches (default: {DEFAULT_CHECKPOINT_EVERY}; also on Ctrl-C/SIGTERM)")


def _add_common(p: argparse.ArgumentParser) -> None:
    from .data import DEFAULT_BATCH_SIZE

    g = p.add_argument_group("model")
    g.add_argument("--model", required=True,
                   help="timm name (e.g. vit_small_patch16_224), 'path/file.py:factory' or 'package.module:factory'")
    g.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs a download)")
    g.add_argument("--checkpoint", metavar="FILE", help="local weights: .safetensors, .pth, .pth.tar")
    g.add_argument("--blocks", metavar="PATTERN",
                   help="module names or glob patterns, comma-separated (default: the model family's blocks)")
    g.add_argument("--num-prefix-tokens", type=int, default=None, help="override the prefix-token count")
    g.add_argument("--layout", choices=("NLC", "NCHW", "NHWC"), default=None, help="override the output layout")
    g.add_argument("--input-size", type=int, nargs="+", metavar="N",
                   help="input size: one number, or H W (default: the model's data config)")
    d = p.add_argument_group("data and run")
    d.add_argument("--images", nargs="+", default=["samples"],
                   help="a folder, image files, or 'samples' (photos shipped with scikit-image / scikit-learn)")
    d.add_argument("--n-images", type=int, default=None, metavar="N",
                   help="only the first N images of --images, in order (default: all)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.add_argument("--no-figure", action="store_true", help="do not write the PNG figure")


def _add_spectral(p: argparse.ArgumentParser) -> None:
    from .analysis import DEFAULT_TOKEN_BUDGET
    from .spectral import AFFINITIES, DEFAULT_AFFINITY, DEFAULT_KNN

    s = p.add_argument_group("spectral")
    s.add_argument("--affinity", choices=AFFINITIES, default=DEFAULT_AFFINITY)
    s.add_argument("--no-center", action="store_true", help="do not subtract each image's mean token")
    s.add_argument("--knn", type=int, default=DEFAULT_KNN, help="neighbours for --affinity knn")
    s.add_argument("--token-budget", type=int, default=DEFAULT_TOKEN_BUDGET,
                   help="blocks with more tokens are average-pooled to fit")


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__
    from .analysis import DEFAULT_N_EIG
    from .attribution import DEFAULT_IG_STEPS
    from .spectral import DIMENSION_RULES, RULES

    parser = _Parser(prog="fanlens", description="Look inside vision models the way the FAN paper does.")
    parser.add_argument("--version", action="version", version=f"fanlens {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sp = sub.add_parser("spectrum", help="significant-eigenvalue counts of the token affinity per block")
    _add_common(sp)
    _add_spectral(sp)
    sp.add_argument("--rules", default=",".join(RULES),
                    help=f"comma-separated, first is the headline: counting rules ({', '.join(RULES)}) and "
                         f"dimension measures ({', '.join(DIMENSION_RULES)})")
    sp.add_argument("--threshold", action="append", default=[], metavar="RULE=TAU",
                    help="threshold of a threshold rule, e.g. rel_threshold=0.05")
    sp.add_argument("--include-prefix", action="store_true", help="include CLS/register tokens")
    sp.add_argument("--n-eig", type=int, default=DEFAULT_N_EIG, metavar="K",
                    help=f"top eigenvalues kept as the mean spectrum (default {DEFAULT_N_EIG}); 0 keeps none, and "
                         "threshold rules are then counted from LDL^T inertia, without eigenvalues (the same "
                         "counts)")
    _add_output(sp, "spectrum", resumable=True)

    pp = sub.add_parser("probe", help="relative feature change under N(0,1) noise per block")
    _add_common(pp)
    pp.add_argument("--sigmas", default="0.1", help="comma-separated noise levels, e.g. 0,0.1,0.5")
    pp.add_argument("--mode", choices=("additive", "pure", "pure_vs_clean"), default="additive",
                    help="additive: ||f(x+sigma eps)-f(x)||/||f(x)||; pure: ||f(eps)|| / block 0's; pure_vs_clean: "
                         "||f(eps_i)|| / ||f(x_i)|| at the same block (the paper's N(0,1) input)")
    pp.add_argument("--token-norm", action="store_true",
                    help="a per-token LayerNorm (no affine) before the additive measure")
    pp.add_argument("--space", choices=("pixel", "normalized"), default="pixel",
                    help="add the noise to pixels in [0,1] or to the normalised input")
    pp.add_argument("--n-noise", type=int, default=16, help="noise samples in --mode pure")
    pp.add_argument("--corruption", default=None, metavar="NAMES",
                    help="probe with ImageNet-C corruptions instead of Gaussian noise: names, comma-separated "
                         "(see fanlens.corruptions.NAMES), or NAME@SEVERITY labels")
    pp.add_argument("--severity", default="3", help="severities for --corruption, comma-separated (default 3)")
    from .attribution import DEFAULT_FLIP_MAX_SIGMA, DEFAULT_FLIP_STEP

    fl = pp.add_argument_group("prediction flips (captum MinParamPerturbation)")
    fl.add_argument("--flip", action="store_true",
                    help="also find, per image, the smallest sigma of the same noise that changes the prediction "
                         "(writes flip/ and probe_flip.png)")
    fl.add_argument("--flip-max-sigma", type=float, default=DEFAULT_FLIP_MAX_SIGMA, help="largest sigma tried")
    fl.add_argument("--flip-step", type=float, default=DEFAULT_FLIP_STEP, help="sigma grid step (the resolution)")
    _add_output(pp, "probe", resumable=True)

    gp = sub.add_parser("groups", help="spectral clusters of the tokens of each block, per image")
    _add_common(gp)
    _add_spectral(gp)
    gp.add_argument("--n-clusters", default="4", help="clusters per block, or 'auto' (eigengap)")
    at = gp.add_argument_group("attributions (captum)")
    at.add_argument("--attribution", choices=("ig", "gradcam"), default=None,
                    help="also attribute the predicted class (Integrated Gradients or Grad-CAM on a block) and "
                         "report per block the share of the mass in the best group (writes attribution/, "
                         "attribution_share.csv and groups_attribution.png)")
    at.add_argument("--attribution-block", default=None, metavar="NAME",
                    help="Grad-CAM block (default: the last block)")
    at.add_argument("--ig-steps", type=int, default=DEFAULT_IG_STEPS, help="Integrated Gradients steps")
    gp.add_argument("--colour", choices=("spectral",), default=None,
                    help="also colour every token continuously by the top-3 non-trivial eigenvectors of the "
                         "joint token graph of all images, aligned from block to block (colours.png, "
                         "colours.npz)")
    gp.add_argument("--attention", action="store_true",
                    help="also read the attention of every block (timm ViT/DeiT, fused attention left on) and "
                         "draw the CLS attention above the groups of the first image (attention.png, "
                         "attention_cls.csv)")
    _add_output(gp, "groups")

    rb = sub.add_parser("robustness", help="top-1 error (or flip rate) under ImageNet-C corruptions, CE and mCE")
    g = rb.add_argument_group("model")
    g.add_argument("--model", required=True, help="as for spectrum (timm name, file.py:factory, zoo:NAME)")
    g.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights (needs a download)")
    g.add_argument("--checkpoint", metavar="FILE", help="local weights: .safetensors, .pth, .pth.tar")
    g.add_argument("--input-size", type=int, nargs="+", metavar="N", help="input size: one number, or H W")
    d = rb.add_argument_group("data, corruptions and run")
    d.add_argument("--images", nargs="+", default=["samples"],
                   help="a folder, image files, 'samples', or 'synthetic' (held-out images of the zoo's procedural task, with labels)")
    d.add_argument("--n-images", type=int, default=512, help="images with --images synthetic (default 512)")
    d.add_argument("--labels", default=None,
                   help="'folders' (one sub-folder per class) or a CSV of file,label; without: the flip rate")
    d.add_argument("--class-index", default=None, metavar="JSON", help="class name -> model class index")
    from .corruptions import BENCHMARK

    d.add_argument("--corruptions", default=None,
                   help=f"comma-separated (default: the {len(BENCHMARK)} benchmark corruptions; 'all' for 19)")
    d.add_argument("--severities", default="1,2,3,4,5", help="comma-separated, 1..5 (default: all)")
    d.add_argument("--baseline", default=None,
                   help="'alexnet' (ImageNet-1k models) or the folder of an earlier robustness run, for CE/mCE")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--device", default="cpu")
    d.add_argument("--batch-size", type=int, default=32)
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.add_argument("--no-figure", action="store_true", help="do not write the PNG figure")
    _add_output(rb, "robustness", resumable=True)

    rp = sub.add_parser(
        "reproduce",
        help="the main job: Figure 3 and Figure 4 analyses; offline on the embedded zoo by default",
        description="With no --model: the embedded zoo (ViT, FAN, CNN and the heads variants, up to three networks each, "
        "trained on procedural textured objects) on held-out generated images with masks, offline. With --model (repeatable): real models on --images.",
    )
    rp.add_argument("--model", action="append", default=None, help="model spec, repeatable (default: the zoo)")
    rp.add_argument("--pretrained", action="store_true", help="load each model's pretrained weights (download)")
    rp.add_argument("--checkpoint", action="append", default=None, metavar="FILE",
                    help="local weights, once per --model in the same order ('-' for none)")
    rp.add_argument("--images", nargs="+", default=None, help="images for real models (default: samples)")
    from .pipeline import SKIPPABLE

    rp.add_argument("--skip", default="", metavar="PARTS",
                    help=f"leave parts out, comma-separated: {', '.join(SKIPPABLE)} (groups: Figure 4, mask "
                         f"agreement and colours; robustness: the corruption grid and what reads it)")
    _add_output(rp, "reproduce")
    _add_zoo_run_options(rp)

    dp = sub.add_parser(
        "training-dynamics",
        help="how grouping and robustness emerge during training: analyse train-zoo snapshots",
        description="Per snapshot written by `fanlens train-zoo NAME --snapshots 0,5,20,50,100 --out DIR`: count, "
        "perturbation, mask agreement, clean and corrupted accuracy on the held-out zoo images; claim C3 across "
        "training; one figure per architecture.",
    )
    dp.add_argument("snapshots", help="the folder train-zoo wrote (cards NAME.json and NAME-snapshots/)")
    _add_output(dp, "training-dynamics")
    _add_zoo_run_options(dp)

    rr = sub.add_parser("report", help="one self-contained report.html from a fanlens output folder",
                        description="Figures, per-block tables, claims, provenance and a block-by-block viewer of "
                        "the groups and spectral colours, embedded in one HTML file that opens offline.")
    rr.add_argument("folder", help="a folder written by fanlens (spectrum, probe, groups, robustness, reproduce)")
    rr.add_argument("--out", default=None, metavar="FILE", help="the file to write (default: FOLDER/report.html)")
    rr.add_argument("--overwrite", action="store_true", help="replace an existing report")
    rr.add_argument("--max-images", type=int, default=8, help="images per model in the block viewer (default 8)")

    tp = sub.add_parser("train-zoo", help="train the embedded zoo models (reproducible from the seed)")
    from .zoo import ALL_NAMES

    tp.add_argument("names", nargs="+", choices=ALL_NAMES)
    tp.add_argument("--seed", type=int, default=0,
                    help="training seed: initialisation and data order (default 0); a network with seed K > 0 is "
                         "named NAME@K (zoo:vit@1)")
    tp.add_argument("--data-seed", type=int, default=0)
    from .zoo import DEFAULT_TASK, TASKS

    tp.add_argument("--task", default=DEFAULT_TASK, choices=tuple(TASKS),
                    help=f"the procedural task (default: {DEFAULT_TASK}; see fanlens.synthetic)")
    from .zoo.training import DEFAULT_POOL, DEFAULT_VAL, STEPS

    tp.add_argument("--steps", type=int, default=None, help=f"optimisation steps (default: {STEPS}, every model)")
    tp.add_argument("--stop-at", default=None, metavar="ACC",
                    help="end training at the first validation check (every 50 steps) at or above this accuracy, "
                         "or 'none' (default: the task's rule, "
                         + ", ".join(f"{t} {'none' if v['stop_at'] is None else v['stop_at']}" for t, v in TASKS.items())
                         + "; none with --snapshots)")
    tp.add_argument("--snapshots", default=None, metavar="PCTS",
                    help="also keep the weights at these percentages of the steps, e.g. 0,5,20,50,100 "
                         "(written to NAME-snapshots/; analysed by `fanlens training-dynamics`)")

    tp.add_argument("--warm-start", default=None, metavar="FILE",
                    help="continue an earlier cycle of the same network (one NAME): its .safetensors, with its card "
                         "NAME.json beside it; a fresh optimiser and schedule of --steps steps, a data order of its own "
                         "(the zoo's extension rule: --steps 1000 for a network the stop rule did not end)")
    tp.add_argument("--pool", type=int, default=DEFAULT_POOL, help=f"rendered training images (default: {DEFAULT_POOL})")
    tp.add_argument("--val-size", type=int, default=DEFAULT_VAL, help=f"validation images (default: {DEFAULT_VAL})")
    _add_output(tp, "train-zoo")
    tp.add_argument("--into-package", action="store_true",
                    help="maintainers only: replace the weights shipped inside the installed package "
                         "(the embedded default); excludes --out")
    tp.add_argument("--no-progress", action="store_true")
    from .execution import ENV_THREADS

    for command in sub.choices.values():
        command.add_argument("--threads", default=None, metavar="N",
                             help=f"threads for torch, BLAS and OpenMP (default: ${ENV_THREADS}, else 'auto': the "
                                  f"cores this process may use that other processes leave free; see "
                                  f"fanlens.execution)")
    return parser


def _thresholds(items: Sequence[str]) -> dict[str, float]:
    out = {}
    for it in items:
        k, sep, v = it.partition("=")
        if not sep:
            raise FanlensError(f"--threshold must be RULE=TAU. Got {it!r} instead.")
        try:
            out[k.strip()] = float(v)
        except ValueError:
            raise FanlensError(f"--threshold must be RULE=TAU with a number TAU. Got {it!r} instead.") from None
    return out


def _images_arg(images: Sequence[str]):
    return images[0] if len(images) == 1 else list(images)


def _out_path(args: argparse.Namespace) -> str:
    if args.out is not None and not args.out.strip():
        raise FanlensError(f"--out must name a folder. Got {args.out!r} instead.")
    return args.out if args.out is not None else f"{DEFAULT_OUT}/{args.command}"


def _check_images_outside(images: Sequence[str], out: Path, param: str = "images") -> None:
    """A run never reads its own output folder as input."""
    o = out.resolve()
    for im in images:
        if im == "samples":
            continue
        p = Path(im).resolve()
        if p == o or o in p.parents:
            raise FanlensError(f"{param} must lie outside the output folder {str(out)!r}. Got {im!r} instead.")


def _run_reproduce(args: argparse.Namespace) -> list[Path]:
    from .pipeline import reproduce

    images = None if args.images is None else _images_arg(args.images)
    if args.images:
        _check_images_outside(args.images, Path(_out_path(args)))
    res = reproduce(
        args.model, pretrained=args.pretrained, checkpoints=args.checkpoint, images=images, out=_out_path(args),
        overwrite=args.overwrite, n_images=args.n_images, sigmas=args.sigmas, seed=args.seed, device=args.device,
        batch_size=args.batch_size, progress=not args.no_progress,
        log=lambda m: print(f"fanlens: {m}", file=sys.stderr, flush=True), skip=args.skip,
    )
    if res.grid is not None:
        print(res.grid.to_markdown())
    elif res.claims is not None:
        print(res.claims.to_markdown())
    print(f"reproduce finished in {res.seconds:.1f} s")
    return res.written


def _run_training_dynamics(args: argparse.Namespace) -> list[Path]:
    from ._validation import check_seed
    from .pipeline import DEFAULT_N_IMAGES, training_dynamics
    from .runner import check_device

    check_device(args.device)
    check_seed(args.seed, "--seed")
    _check_images_outside([args.snapshots], Path(_out_path(args)), "snapshots")
    n = args.n_images if args.n_images is not None else DEFAULT_N_IMAGES
    res = training_dynamics(args.snapshots, out=_out_path(args), overwrite=args.overwrite, n_images=n,
                            sigmas=args.sigmas, seed=args.seed, device=args.device, batch_size=args.batch_size,
                            progress=not args.no_progress,
                            log=lambda m: print(f"fanlens: {m}", file=sys.stderr, flush=True))
    print(res.claims.to_markdown())
    print(f"training-dynamics finished in {res.seconds:.1f} s")
    return res.written


def _run_train(args: argparse.Namespace) -> list[Path]:
    from .zoo.training import output_folder, parse_snapshots, train_model, write_trained

    from ._validation import check_seed

    if args.into_package and args.out is not None:
        raise FanlensError(f"--into-package and --out exclude each other. Got --out {args.out!r} instead.")
    check_seed(args.seed, "--seed")
    check_seed(args.data_seed, "--data-seed")
    snapshots = parse_snapshots(args.snapshots, "--snapshots")
    if snapshots and args.into_package:
        raise FanlensError("--snapshots goes with --out: snapshot weights are not shipped inside the package.")
    stop_at = _stop_at(args.stop_at, args.task, snapshots)
    if args.warm_start is not None and len(args.names) != 1:
        raise FanlensError(f"--warm-start continues one network; name one. Got {len(args.names)} names "
                           f"({' '.join(args.names)}) instead.")
    out = output_folder(None if args.into_package else _out_path(args), overwrite=args.overwrite,
                         into_package=args.into_package, task=args.task)
    trained = []
    for name in args.names:
        m = train_model(name, seed=args.seed, data_seed=args.data_seed, task=args.task, steps=args.steps,
                        pool=args.pool, val_size=args.val_size, snapshots=snapshots, stop_at=stop_at,
                        warm_start=args.warm_start, progress=not args.no_progress)
        print(f"{m.name}: validation accuracy {m.card['validation_accuracy']:.3f}, {m.card['wall_time_s']:.0f} s")
        trained.append(m)
    return write_trained(out, trained)


def _stop_at(value: str | None, task: str, snapshots) -> float | None:
    """``--stop-at``: an accuracy, 'none', or (absent) the task's rule (none when snapshots are kept)."""
    from .zoo import TASKS

    if value is None:
        return None if snapshots else TASKS[task]["stop_at"]
    if value.strip().lower() == "none":
        return None
    try:
        acc = float(value)
    except ValueError:
        raise FanlensError(f"--stop-at must be an accuracy in (0, 1] or 'none'. Got {value!r} instead.") from None
    if not 0 < acc <= 1:
        raise FanlensError(f"--stop-at must be an accuracy in (0, 1] or 'none'. Got {value!r} instead.")
    return acc


def _model_options(args: argparse.Namespace) -> tuple[tuple[int, int] | None, bool]:
    """Checks of the model options every analysis command shares, then joins a torchrun process
    group where one is launched; returns (input size, distributed)."""
    from ._validation import check_seed
    from .data import parse_input_size
    from .distributed import init_from_env
    from .runner import check_device

    if args.pretrained and args.checkpoint:
        raise FanlensError("--pretrained and --checkpoint exclude each other; pass one.")
    input_size = parse_input_size(args.input_size, "--input-size") if args.input_size else None
    check_device(args.device)
    check_seed(args.seed, "--seed")
    return input_size, init_from_env(args.device)


def _output_folder(args: argparse.Namespace, out: Path, *, resumable: bool):
    """The output folder, checked (and created) before any work; rank 0 writes it, other ranks get None."""
    from .distributed import is_main
    from .runner import OutputFolder

    if not is_main():
        return None
    return OutputFolder(out, overwrite=args.overwrite, resume=resumable and args.resume, command=args.command)


@contextlib.contextmanager
def _abandon_on_error(folder):
    """A failing run removes the output folder it created (when still empty)."""
    try:
        yield
    except BaseException:
        if folder is not None:
            folder.abandon()
        raise


def _run_robustness(args: argparse.Namespace) -> list[Path]:
    from .distributed import is_main
    from .models import build_model
    from .robustness import robustness
    from .runner import state_dir

    input_size, _ = _model_options(args)
    out = Path(_out_path(args))
    synthetic = args.images == ["synthetic"]
    if not synthetic:
        _check_images_outside(args.images, out)
    folder = _output_folder(args, out, resumable=True)
    with _abandon_on_error(folder):
        lm = build_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, seed=args.seed)
        res = robustness(
            lm, "synthetic" if synthetic else _images_arg(args.images), corruptions=args.corruptions,
            severities=args.severities, labels=args.labels, class_index=args.class_index, baseline=args.baseline,
            n_images=args.n_images, batch_size=args.batch_size, device=args.device, seed=args.seed,
            input_size=input_size, progress=not args.no_progress and is_main(),
            state_dir=state_dir(out, "robustness"), checkpoint_every=args.checkpoint_every, resume=args.resume,
        )
    if not is_main():
        return []
    what = "top-1 error" if res.metric == "top1_error" else "flip rate"
    print(f"{res.model}: {what} over {res.n_images} images; clean {res.clean[0]:.3f}")
    for ci, c in enumerate(res.corruptions):
        ce = f"   CE {res.ce[ci]:.3f}" if res.baseline else ""
        print(f"  {c:<18} " + " ".join(f"{v:.3f}" for v in res.mean[ci]) + ce)
    if res.metric == "top1_error":
        print(f"robust accuracy {res.robust_accuracy:.3f}" + (f"; mCE {res.mce:.3f}, relative mCE "
                                                               f"{res.relative_mce:.3f} vs {res.baseline}"
                                                               if res.baseline else ""))
    with folder.staging() as tmp:
        res.write_files(tmp)
        if not args.no_figure:
            import matplotlib

            matplotlib.use("Agg")
            from .plotting import plot_robustness
            from .results import save_png

            save_png(plot_robustness(res).figure, tmp / "robustness.png")
    return folder.written


def _run(args: argparse.Namespace) -> list[Path]:
    from . import analysis
    from .models import build_model

    if args.command == "reproduce":
        return _run_reproduce(args)
    if args.command == "train-zoo":
        return _run_train(args)
    if args.command == "training-dynamics":
        return _run_training_dynamics(args)
    if args.command == "robustness":
        return _run_robustness(args)
    if args.command == "report":
        from .reporting import report

        path = report(args.folder, out=args.out, overwrite=args.overwrite, max_images=args.max_images)
        print(f"report: {path.stat().st_size / 1e6:.1f} MB")
        return [path]

    from .distributed import is_main

    input_size, distributed = _model_options(args)
    if distributed and args.command == "groups":
        raise FanlensError("groups runs in one process; launch it without torchrun.")
    if args.command == "probe" and args.corruption is not None:
        if args.flip:
            raise FanlensError("--flip scales Gaussian noise; it does not go with --corruption.")
        analysis.parse_corruptions(args.corruption, args.severity)  # checked before any work
    if args.command == "probe" and args.flip and args.mode != "additive":
        raise FanlensError("--flip goes with --mode additive (the noise it scales is the additive noise).")
    if args.command == "groups" and args.attribution != "gradcam" and args.attribution_block is not None:
        raise FanlensError("--attribution-block goes with --attribution gradcam.")
    resumable = args.command in ("spectrum", "probe")
    out = Path(_out_path(args))
    _check_images_outside(args.images, out)
    folder = _output_folder(args, out, resumable=resumable)
    with _abandon_on_error(folder):
        res, extra, fig_name, draw = _analyse(args, analysis, build_model, input_size, out)
    if not is_main():  # every rank holds the merged statistics; rank 0 writes them
        return []
    with folder.staging() as tmp:
        res.write_files(tmp)
        _save_extras(args, res, extra, tmp)
        if not args.no_figure:
            import matplotlib

            matplotlib.use("Agg")
            from . import plotting
            from .results import save_png

            obj = getattr(plotting, draw)(res)
            save_png(obj if hasattr(obj, "savefig") else obj.figure, tmp / fig_name)
    return folder.written


def _analyse(args: argparse.Namespace, analysis, build_model, input_size, out: Path):
    """Build the model and run the command's analysis (and its captum extras)."""
    lm = build_model(args.model, pretrained=args.pretrained, checkpoint=args.checkpoint, seed=args.seed)
    if args.command == "groups" and args.attribution == "gradcam":  # check the block before any analysis
        from .attribution import gradcam_block

        gradcam_block(lm.model, args.attribution_block, layout=args.layout, num_prefix_tokens=args.num_prefix_tokens)
    from .distributed import is_main
    from .runner import state_dir

    common = dict(
        blocks=args.blocks,
        num_prefix_tokens=args.num_prefix_tokens,
        layout=args.layout,
        input_size=input_size,
        device=args.device,
        batch_size=args.batch_size,
        seed=args.seed,
        progress=not args.no_progress and is_main(),
    )
    if args.command in ("spectrum", "probe"):
        common.update(state_dir=state_dir(out, args.command), checkpoint_every=args.checkpoint_every,
                      resume=args.resume)
    images = _images_arg(args.images)
    if args.n_images is not None:  # the first N, resolved with the model's preprocessing
        from ._validation import check_positive_int
        from .data import data_config, resolve_images

        check_positive_int("n_images", args.n_images)
        images = resolve_images(images, data_config(lm.model, input_size=input_size)).first(args.n_images)
    if args.command == "spectrum":
        rules = tuple(r.strip() for r in args.rules.split(",") if r.strip())
        res = analysis.spectrum(
            lm, images, rules=rules, thresholds=_thresholds(args.threshold), affinity=args.affinity,
            center=not args.no_center, knn=args.knn, token_budget=args.token_budget,
            include_prefix=args.include_prefix, n_eig=args.n_eig, **common,
        )
        # several rules: all of them on one axis (counts and dimension measures together)
        fig_name, draw = "spectrum.png", "plot_rules" if len(res.rules) > 1 else "plot_spectrum"
    elif args.command == "probe":
        res = analysis.noise_probe(
            lm, images, sigmas=args.sigmas, mode=args.mode, space=args.space, n_noise=args.n_noise,
            corruption=args.corruption, severity=args.severity, token_norm=args.token_norm, **common,
        )
        fig_name, draw = "probe.png", "plot_probe"
    else:
        k = None if args.n_clusters.strip().lower() == "auto" else _int_arg("--n-clusters", args.n_clusters)
        res = analysis.group_tokens(
            lm, images, n_clusters=k, affinity=args.affinity, center=not args.no_center, knn=args.knn,
            token_budget=args.token_budget, **common,
        )
        fig_name, draw = "groups.png", "plot_groups"
    extra = _extras(args, lm, images, common, res) if is_main() else {}
    return res, extra, fig_name, draw


def _extras(args: argparse.Namespace, lm, images, common: dict, res) -> dict:
    """The captum analyses that go with a probe (--flip) or groups (--attribution)."""
    from . import attribution

    if args.command == "probe" and args.flip:
        flip = attribution.min_flip_sigma(
            lm, images, max_sigma=args.flip_max_sigma, step=args.flip_step, space=args.space,
            input_size=common["input_size"], device=args.device, seed=args.seed, progress=common["progress"],
        )
        print(f"smallest sigma flipping the prediction: median {flip.median:.4g} "
              f"({flip.n_flipped}/{len(flip.images)} images flipped up to {flip.max_sigma:g})")
        return {"flip": flip}
    if args.command == "groups" and args.attribution is not None:
        attr = attribution.attribute(
            lm, images, method=args.attribution, block=args.attribution_block, n_steps=args.ig_steps,
            input_size=common["input_size"], num_prefix_tokens=args.num_prefix_tokens, layout=args.layout,
            device=args.device, seed=args.seed, progress=common["progress"],
        )
        share = attribution.attribution_share(res, attr)
        s = share.summary("attribution_share")
        a = share.summary("attribution_group_area")
        print(f"share of the {args.attribution} attribution mass in the best group (mean over {s['n']} images):")
        for li, b in enumerate(share.blocks):
            print(f"  {b.name:<24} share {s['mean'][li]:.3f}   area of that group {a['mean'][li]:.3f}")
        out = {"attribution": attr, "share": share}
    else:
        out = {}
    if args.command == "groups" and args.colour == "spectral":
        from .colouring import spectral_colouring

        out["colours"] = spectral_colouring(
            lm, images, blocks=args.blocks, affinity=args.affinity, center=not args.no_center, knn=args.knn,
            token_budget=args.token_budget, batch_size=args.batch_size, input_size=common["input_size"],
            num_prefix_tokens=args.num_prefix_tokens, layout=args.layout, device=args.device, seed=args.seed,
            progress=common["progress"],
        )
    if args.command == "groups" and args.attention:
        from .attention import attention_maps

        out["attention"] = attention_maps(
            lm, images, blocks=args.blocks, batch_size=args.batch_size, input_size=common["input_size"], num_prefix_tokens=args.num_prefix_tokens,
            device=args.device, seed=args.seed, progress=common["progress"],
        )
    return out


def _save_extras(args: argparse.Namespace, res, extra: dict, out: Path) -> None:
    """Files of the captum extras, into ``out`` (the run's staging folder)."""
    from .results import rows_to_csv, save_png, write_atomic

    if "flip" in extra:
        extra["flip"].write_files(out / "flip")
    if "attribution" in extra:
        extra["attribution"].write_files(out / "attribution")
        write_atomic(out / "attribution_share.csv", rows_to_csv(extra["share"].rows()).encode())
    if "attention" in extra:
        write_atomic(out / "attention_cls.csv", _attention_rows(extra["attention"]).encode())
    if "colours" in extra:
        extra["colours"].save_npz(out / "colours.npz")
    if extra and not args.no_figure:
        import matplotlib

        matplotlib.use("Agg")
        from . import plotting

        if "flip" in extra:
            save_png(plotting.plot_probe_flip(res, extra["flip"]), out / "probe_flip.png")
        if "attribution" in extra:
            save_png(plotting.plot_attribution_groups(res, extra["attribution"]), out / "groups_attribution.png")
        if "attention" in extra:
            save_png(plotting.plot_attention_maps(extra["attention"], groups=res), out / "attention.png")
        if "colours" in extra:
            save_png(plotting.plot_spectral_colours(extra["colours"]), out / "colours.png")


def _attention_rows(maps) -> str:
    """Tidy CSV of the head-averaged attention each patch gets from the CLS token (or, without
    one, from all patches on average): image, block, row, col, value."""
    import csv
    import io

    heat, _what = maps.overview()
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "block", "row", "col", "value"])
    for i, name in enumerate(maps.images):
        for li, block in enumerate(maps.blocks):
            for r in range(maps.grid[0]):
                for c in range(maps.grid[1]):
                    w.writerow([name, block, r, c, f"{heat[i, li, r, c]:.6g}"])
    return buf.getvalue()


def _int_arg(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FanlensError(f"{name} must be an integer or 'auto'. Got {value!r} instead.") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fanlens`` console script; returns the exit code."""
    from .runner import Interrupted

    for stream in (sys.stdout, sys.stderr):  # a terminal that cannot print sigma or an accented file name
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="fanlens: %(message)s")
    try:
        from .execution import policy

        with policy(args.threads, param="--threads"):  # one execution policy for the whole command
            written = _run(args)
        for p in sorted(written):
            print(f"wrote {p}")
        sys.stdout.flush()
    except FanlensError as e:
        _fail(e)
        return EXIT_USAGE
    except BrokenPipeError:  # `fanlens ... | head`: the reader left; the conventional exit, no trace
        _leave_process_group()
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    except OSError as e:  # the machine refused (permission, missing file, full disk): one line
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        _fail(FanlensError(f"{where}{e.strerror or e}"))
        return EXIT_USAGE
    except Interrupted as e:
        _leave_process_group()
        print(f"fanlens: {e.message}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        _leave_process_group()
        print("fanlens: interrupted", file=sys.stderr)
        return 130
    _leave_process_group()
    return 0


def _fail(e: FanlensError) -> None:
    """Print the one-line error; under torchrun, publish it so that every rank stops with it."""
    from .distributed import PeerError, rank_and_world, report_error

    msg = " ".join(str(e).split())
    rank, world = rank_and_world()
    if world > 1 and not isinstance(e, PeerError):
        msg = f"rank {rank}: {msg}"
        report_error(msg)
    print(f"fanlens: error: {msg}", file=sys.stderr)
    _leave_process_group()


def _leave_process_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
