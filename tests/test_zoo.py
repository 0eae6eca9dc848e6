"""The embedded zoo: shipped weights, their cards, offline loading, and reproducible training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fanlens
from fanlens import FanlensError, cli, zoo
from fanlens.synthetic import SyntheticShapes
from fanlens.zoo.train import _render, evaluate, train

installed = pytest.mark.skipif(zoo.available() != list(zoo.ZOO_NAMES), reason="zoo weights not installed")


@installed
def test_weights_fit_the_size_budget():
    total = sum(p.stat().st_size for p in zoo.WEIGHTS_DIR.glob("*.safetensors"))
    assert total <= 25 * 1024**2


@installed
@pytest.mark.parametrize("name", zoo.ZOO_NAMES)
def test_card_and_reported_accuracy(name):
    card = zoo.card(name)
    for key in ("architecture", "data", "training", "validation_accuracy", "wall_time_s", "num_params"):
        assert key in card
    assert card["data"]["data_seed"] == 0 and card["training"]["steps"] > 0
    lm = zoo.load(name)
    assert lm.name == f"zoo:{name}" and lm.weights_sha256 == fanlens.models.file_sha256(zoo.WEIGHTS_DIR / f"{name}.safetensors")
    assert sum(p.numel() for p in lm.model.parameters()) == card["num_params"]
    # the reported validation accuracy is what the shipped (fp16) weights give on the validation split
    xv, yv = _render(SyntheticShapes(card["data"]["val_size"], seed=card["data"]["data_seed"], split="val"), False, "")
    assert evaluate(lm.model, xv, yv) == pytest.approx(card["validation_accuracy"], abs=0.01)
    assert card["validation_accuracy"] > 1.5 / 8  # well above chance


@installed
def test_random_init_twin_and_cli_spec(tmp_path, capsys):
    trained, twin = zoo.load("fan"), zoo.load("fan", random_init=True)
    assert twin.weights_sha256 == "random init"
    assert not torch.equal(trained.model.head.weight, twin.model.head.weight)
    code = cli.main(["probe", "--model", "zoo:fan", "--images", "samples", "--out", str(tmp_path), "--no-progress",
                     "--no-figure"])
    assert code == 0, capsys.readouterr().err
    res = fanlens.load(tmp_path)
    assert res.provenance.model == "zoo:fan" and res.blocks[0].layout.grid == (8, 8)


def test_unknown_zoo_name():
    with pytest.raises(FanlensError, match="zoo model must be one of"):
        zoo.load("resnet")


def test_training_is_reproducible_from_the_seed(tmp_path):
    cards = []
    for run in ("a", "b"):
        cards.append(train("cnn", seed=5, steps=3, pool=64, val_size=32, out_dir=tmp_path / run, progress=False))
    a = load_file(str(tmp_path / "a" / "cnn.safetensors"))
    b = load_file(str(tmp_path / "b" / "cnn.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((tmp_path / "a" / "cnn.json").read_text())
    assert card["training"]["steps"] == 3 and card["training"]["seed"] == 5
    assert cards[0]["validation_accuracy"] == cards[1]["validation_accuracy"]
    assert all(v.dtype in (torch.float16, torch.int64) for v in a.values())
