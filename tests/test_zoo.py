"""The embedded zoo: shipped weights, their cards, offline loading, and reproducible training."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import fanlens
from fanlens import FanlensError, cli, zoo
import fanlens.synthetic
from fanlens.zoo.training import EXTENSION_STEPS, STEPS, _render, evaluate, train

installed = pytest.mark.skipif(not set(zoo.ZOO_NAMES) <= set(zoo.available()), reason="zoo weights not installed")


@installed
@pytest.mark.parametrize("name", zoo.ALL_NAMES)
def test_card_and_reported_accuracy(name):
    if name not in zoo.available():
        pytest.skip(f"zoo:{name} is not trained yet")
    card = zoo.card(name)
    for key in ("architecture", "data", "training", "validation_accuracy", "wall_time_s", "num_params"):
        assert key in card
    assert card["data"]["data_seed"] == 0 and card["training"]["steps"] > 0
    lm = zoo.load(name)
    task = zoo.TASKS[zoo.DEFAULT_TASK]
    assert lm.name == f"zoo:{name}" and lm.weights_sha256 == fanlens.models.file_sha256(task["weights"] / f"{name}.safetensors")
    assert sum(p.numel() for p in lm.model.parameters()) == card["num_params"]
    assert card["data"]["task"] == zoo.DEFAULT_TASK and card["data"]["dataset"] == f"fanlens.synthetic.{task['dataset']}"
    # the reported validation accuracy is what the shipped (fp16) weights give on the validation split
    ds = fanlens.synthetic.TASKS[zoo.DEFAULT_TASK](card["data"]["val_size"], seed=card["data"]["data_seed"], split="val")
    xv, yv = _render(ds, False, "")
    assert evaluate(lm.model, xv, yv) == pytest.approx(card["validation_accuracy"], abs=0.01)
    assert card["validation_accuracy"] > 1.5 / task["num_classes"]  # well above chance


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
        cards.append(train("cnn", seed=5, steps=3, pool=64, val_size=32, out_dir=tmp_path / run, progress=False).card)
    a = load_file(str(tmp_path / "a" / "cnn@5.safetensors"))  # a network with seed K > 0 is named NAME@K
    b = load_file(str(tmp_path / "b" / "cnn@5.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    card = json.loads((tmp_path / "a" / "cnn@5.json").read_text())
    assert card["training"]["steps"] == 3 and card["training"]["seed"] == 5 and card["name"] == "cnn@5"
    assert cards[0]["validation_accuracy"] == cards[1]["validation_accuracy"]
    assert all(v.dtype in (torch.float16, torch.int64) for v in a.values())


@installed
def test_the_zoo_is_worth_testing_on():
    """Every shipped network of the default task is trained with one planned budget (the stop rule may end it
    early; the extension rule adds one cycle to every network the stop rule did not end, and to no other), the
    three architectures are of comparable size, and the heads variants differ in heads only."""
    names = [n for n in zoo.ALL_NAMES if n in zoo.available()]
    cards = {n: zoo.card(n) for n in names}
    every = {zoo.network_name(n, k): zoo.card(zoo.network_name(n, k)) for n in names for k in zoo.networks(n)}
    first = {n: (c.get("earlier_cycles") or [c])[0]["training"] for n, c in every.items()}
    budgets = {(t.get("planned_steps", t["steps"]), t["batch_size"]) for t in first.values()}
    assert len(budgets) == 1 and len(every) >= 3 * len(names)
    for n, c in every.items():
        cycles = (c.get("earlier_cycles") or []) + [c]
        assert len(cycles) == (2 if first[n].get("stopped_at_step") is None else 1), n
        if len(cycles) == 2:
            assert c["training"]["planned_steps"] == EXTENSION_STEPS and c["training"]["cycle"] == 1
            assert c["total_steps"] == first[n]["steps"] + c["training"]["steps"]
    sizes = [cards[n]["num_params"] for n in zoo.ZOO_NAMES]
    assert max(sizes) / min(sizes) < 1.25
    for n in ("vit", "fan"):
        assert cards[n]["architecture"]["depth"] >= 8
    # the heads variants differ from the ViT in their heads only
    heads = [n for n in zoo.HEADS if n in cards]
    arch = {n: {k: v for k, v in cards[n]["architecture"].items() if k != "num_heads"} for n in heads}
    assert all(a == arch["vit"] for a in arch.values())
    assert {n: cards[n]["architecture"]["num_heads"] for n in heads} == {n: zoo.HEADS[n] for n in heads}


def test_training_stops_at_the_first_check_that_reaches_the_target(monkeypatch, capsys, tmp_path):
    """stop_at: the run ends at the first validation check (every CHECK_EVERY steps after the warm-up)
    at or above the target; an unreachable target trains the planned steps; the card says which."""
    import fanlens.zoo.training as tr

    seen = []
    real = tr.evaluate

    def counting(model, xs, ys, batch_size=250):
        acc = real(model, xs, ys, batch_size)
        seen.append(acc)
        return acc

    monkeypatch.setattr(tr, "evaluate", counting)
    monkeypatch.setattr(tr, "CHECK_EVERY", 2)
    # warm-up 4: checks after steps 4, 6, 8; a target of 0 is met at the first one
    card = tr.train_model("cnn", seed=3, steps=12, pool=64, val_size=32, warmup=4, stop_at=1e-9, progress=False).card
    assert card["training"]["steps"] == 4 and card["training"]["stopped_at_step"] == 4
    assert 0 < card["cpu_time_s"] and 0 < card["wall_time_s"]  # CPU seconds of the process, recorded beside the wall
    assert card["training"]["planned_steps"] == 12 and ">= 1e-09" in card["training"]["stop_rule"]
    assert card["validation_accuracy"] == seen[0]  # the final evaluation is the weights the check saw
    seen.clear()
    card = tr.train_model("cnn", seed=3, steps=9, pool=64, val_size=32, warmup=4, stop_at=1.0, progress=False).card
    assert max(seen[:-1]) < 1.0  # 32 images after 8 steps: never all right
    assert card["training"]["steps"] == 9 and card["training"]["stopped_at_step"] is None
    assert len(seen) == 3 + 1  # checks after steps 4, 6, 8 and the final evaluation
    with pytest.raises(FanlensError, match=r"stop_at must be a validation accuracy in \(0, 1\]"):
        tr.train_model("cnn", steps=2, pool=16, val_size=8, stop_at=1.5, progress=False)
    with pytest.raises(FanlensError, match="stop_at and snapshots exclude each other"):
        tr.train_model("cnn", steps=2, pool=16, val_size=8, stop_at=0.9, snapshots=(0, 1), progress=False)
    assert zoo.TASKS["textures"]["stop_at"] == 0.92 and zoo.TASKS["shapes"]["stop_at"] is None
    from fanlens.cli import main

    for bad in ("1.5", "0", "abc", "nan"):
        assert main(["train-zoo", "cnn", "--stop-at", bad, "--steps", "1", "--out", str(tmp_path / "o")]) == 2
        assert f"--stop-at must be an accuracy in (0, 1] or 'none'. Got {bad!r}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before the output folder is made


def test_a_warm_start_continues_the_same_network_and_keeps_its_history(tmp_path, capsys):
    """A second cycle starts from the first cycle's stored weights (lr 0: the weights and the validation
    accuracy are the first cycle's to the bit), is reproducible, and its card keeps both cycles."""
    from safetensors.torch import load_file as load

    first = train("cnn", seed=4, steps=3, pool=64, val_size=32, out_dir=tmp_path / "c0", progress=False)
    src = tmp_path / "c0" / "cnn@4.safetensors"
    same = train("cnn", seed=4, steps=2, pool=64, val_size=32, lr=0.0, warm_start=src, out_dir=tmp_path / "lr0",
                 progress=False)
    a, b = load(str(src)), load(str(tmp_path / "lr0" / "cnn@4.safetensors"))
    # BatchNorm's running statistics move without a gradient; every learned weight stays
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)
    card = same.card
    assert card["training"]["cycle"] == 1 and card["training"]["warm_start"]["steps_before"] == 3
    assert card["training"]["warm_start"]["sha256"] == fanlens.models._loading.file_sha256(src)
    assert card["earlier_cycles"][0]["training"] == first.card["training"]
    assert card["earlier_cycles"][0]["validation_accuracy"] == first.card["validation_accuracy"]
    assert card["total_steps"] == 5 and card["total_cpu_time_s"] >= card["cpu_time_s"]
    # reproducible, and the second cycle's batches are not the first cycle's again
    runs = [train("cnn", seed=4, steps=2, pool=64, val_size=32, warm_start=src, out_dir=tmp_path / f"r{i}",
                  progress=False) for i in range(2)]
    w = [load(str(tmp_path / f"r{i}" / "cnn@4.safetensors")) for i in range(2)]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])
    assert runs[0].card["training"]["data_order_seed"] == "SeedSequence([4, 1])"
    third = train("cnn", seed=4, steps=1, pool=64, val_size=32, warm_start=tmp_path / "r0" / "cnn@4.safetensors",
                  progress=False).card
    assert third["training"]["cycle"] == 2 and third["total_steps"] == 6
    assert [c["training"]["steps"] for c in third["earlier_cycles"]] == [3, 2]
    # the wrong network, a missing card, something else than safetensors: one line each
    with pytest.raises(FanlensError, match=r"earlier cycle of the same network .*cnn@5.*Got \('cnn@4'"):
        train("cnn", seed=5, steps=1, pool=16, val_size=8, warm_start=src, progress=False)
    bad = tmp_path / "bad" / "cnn@4.safetensors"  # the card fits, the weights are not safetensors
    bad.parent.mkdir()
    bad.write_bytes(b"not safetensors")
    (bad.parent / "cnn@4.json").write_text((tmp_path / "c0" / "cnn@4.json").read_text())
    with pytest.raises(FanlensError, match=r"warm_start: checkpoint .* is not a readable safetensors file"):
        train("cnn", seed=4, steps=1, pool=16, val_size=8, warm_start=bad, progress=False)
    (tmp_path / "c0" / "cnn@4.json").rename(tmp_path / "c0" / "moved.json")
    with pytest.raises(FanlensError, match="needs the earlier cycle's card beside its weights"):
        train("cnn", seed=4, steps=1, pool=16, val_size=8, warm_start=src, progress=False)
    with pytest.raises(FanlensError, match="warm_start must be an existing .safetensors file"):
        train("cnn", seed=4, steps=1, pool=16, val_size=8, warm_start=tmp_path / "c0" / "moved.json", progress=False)
    assert cli.main(["train-zoo", "cnn", "vit", "--warm-start", str(src), "--out", str(tmp_path / "x")]) == 2
    assert "--warm-start continues one network; name one. Got 2 names" in capsys.readouterr().err
    assert zoo.training.EXTENSION_STEPS == 1000


def test_snapshots_keep_the_weights_along_training(tmp_path):
    trained = train("cnn", seed=1, steps=10, pool=64, val_size=32, snapshots=(0, 0.2, 1.0), out_dir=tmp_path / "o",
                    progress=False)
    snaps = trained.card["snapshots"]
    assert [s["step"] for s in snaps] == [0, 2, 10] and [s["fraction"] for s in snaps] == [0, 0.2, 1.0]
    first = load_file(str(tmp_path / "o" / snaps[0]["file"]))
    init = zoo.build("cnn", seed=1).state_dict()
    assert all(torch.equal(first[k], init[k].half()) for k in first if first[k].is_floating_point())
    last = load_file(str(tmp_path / "o" / snaps[-1]["file"]))
    final = load_file(str(tmp_path / "o" / "cnn@1.safetensors"))
    assert all(torch.equal(last[k], final[k]) for k in final)
    # a snapshot loads like any checkpoint of the architecture
    lm = fanlens.build_model("zoo:cnn", checkpoint=str(tmp_path / "o" / snaps[1]["file"]))
    assert lm.weights_sha256 != "random init"
    with pytest.raises(FanlensError, match="snapshots must be fractions"):
        train("cnn", steps=2, pool=32, val_size=16, snapshots=(0, 1.5), progress=False)


def test_train_a_module_of_your_own_within_a_budget():
    from timm.models.resnet import BasicBlock, ResNet

    classes = zoo.TASKS[zoo.DEFAULT_TASK]["num_classes"]
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=classes, channels=(8, 16, 32, 64))
    before = model.fc.weight.detach().clone()
    trained = fanlens.zoo.train(model, budget_s=3.0, pool=64, val_size=32, progress=False)
    assert trained.model is model and not model.training and not torch.equal(model.fc.weight, before)
    card = trained.card
    # the step count comes from the budget (the first 10 steps are timed), not from the default recipe
    assert 10 <= card["training"]["steps"] < STEPS and "budget_s=3" in card["training"]["budget"]
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    with pytest.raises(FanlensError, match=f"{classes} logits per image"):
        fanlens.zoo.train(ResNet(BasicBlock, [1, 1, 1, 1], num_classes=5, channels=(8, 16, 32, 64)), steps=1,
                          pool=16, val_size=8, progress=False)
    with pytest.raises(FanlensError, match="steps and budget_s exclude each other"):
        fanlens.zoo.train(model, steps=2, budget_s=1.0, progress=False)
    with pytest.raises(FanlensError, match="budget_s must be a positive"):
        fanlens.zoo.train(model, budget_s=0, progress=False)


def test_network_names_seeds_and_tasks():
    assert zoo.parse_network("vit") == (zoo.DEFAULT_TASK, "vit", 0)
    assert zoo.parse_network("vit@2") == (zoo.DEFAULT_TASK, "vit", 2)
    assert zoo.parse_network("textures/vit-h8@1") == ("textures", "vit-h8", 1)
    assert zoo.network_name("cnn", 0) == "cnn" and zoo.network_name("cnn", 3) == "cnn@3"
    for bad, msg in (("vit@x", "seed must be a non-negative integer"), ("vit@-1", "seed must be"),
                     ("imagenet/vit", "task must be one of"), ("resnet@1", "zoo model must be one of")):
        with pytest.raises(FanlensError, match=msg):
            zoo.parse_network(bad)
    with pytest.raises(FanlensError, match=r"run `fanlens train-zoo vit --seed 7`"):
        zoo.load("textures/vit@7")  # the default task needs no --task
    with pytest.raises(FanlensError, match=r"run `fanlens train-zoo vit --task shapes --seed 7`"):
        zoo.load("shapes/vit@7")
    # the random-init twin of a network is its own initial weights (its training seed)
    a = zoo.load("vit@3", random_init=True).model.state_dict()
    b = zoo.build("vit", seed=3).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_textures_cnn_has_sixteen_tokens_and_no_identity_blocks():
    cnn = zoo.build("cnn", task="textures")
    assert cnn.fc.out_features == 10 and zoo.architecture("cnn", "textures")[1]["zero_init_last"] is False
    x = torch.rand(2, 3, 64, 64)
    assert tuple(cnn.layer4(cnn.layer3(cnn.layer2(cnn.layer1(cnn.maxpool(cnn.act1(cnn.bn1(cnn.conv1(x))))))))
                 .shape[-2:]) == (4, 4)  # 16 tokens in the last stage (max-pool dropped)
    # no zero-initialised residual branch: a random-init block changes its input
    for name in ("cnn",):
        for task in zoo.TASKS:
            m = zoo.build(name, task=task)
            blk = m.layer2[1]
            h = torch.randn(2, 48, 8, 8).relu()
            with torch.no_grad():
                assert float((blk(h) - h.relu()).abs().mean()) > 1e-3
                assert float(blk.bn2.weight.abs().min()) > 0
    assert tuple(zoo.build("cnn", task="shapes").forward_features(x).shape[-2:]) == (2, 2)


def test_the_shipped_weights_fit_the_budget_and_every_textures_network_is_calibrated():
    """All shipped weights together <= 64 MB; each network of the textures task (as many as are trained so
    far) is between 85 % and 97 % on 512 held-out images, except the ones listed below with the accuracies
    they have, and records its seed and where it trained."""
    from fanlens.synthetic import SyntheticTextures
    from fanlens.zoo.training import evaluate

    assert sum(p.stat().st_size for p in zoo.WEIGHTS_DIR.rglob("*.safetensors")) <= 64 * 1024**2
    # below the band and shipped anyway would be listed here with their validation and held-out accuracy
    # (replacing a seed because of its accuracy would select the networks by their outcome). None is since the
    # ViTs' second cycle (the extension rule): the 1-head networks were at 82.4 % and 83.2 % after their first.
    below: dict[str, tuple[float, float]] = {}
    x = y = None
    for name in zoo.ALL_NAMES:
        for k in zoo.networks(name, task="textures"):
            net = f"textures/{zoo.network_name(name, k)}"
            card = zoo.card(net)
            assert card["training"]["seed"] == k and card["data"]["task"] == "textures"
            assert card["machine"]["device"] and card["wall_time_s"] > 0
            if x is None:
                x, y, _ = SyntheticTextures(512, seed=0, split="test").batch(range(512))
                x = (x * 255).round().to(torch.uint8)
            acc = evaluate(zoo.load(net).model, x, y)
            if net in below:
                assert (card["validation_accuracy"], round(acc, 3)) == pytest.approx(below[net], abs=0.002), net
                continue
            assert 0.85 <= card["validation_accuracy"] <= 0.97, (net, card["validation_accuracy"])
            assert 0.85 <= acc <= 0.97, (net, acc)


@installed
def test_the_default_task_needs_grouping_that_training_brings():
    """The trained zoo networks' 2-cluster groups follow the object masks; their random-init twins' do not
    (on the shapes task a random-init CNN beat every trained model by brightness alone)."""
    import numpy as np

    from fanlens.grouping import mask_scores

    x, _y, m = fanlens.synthetic.TASKS[zoo.DEFAULT_TASK](16, seed=0, split="test").batch(range(16))
    for name in zoo.ZOO_NAMES:
        ari = [float(np.asarray(mask_scores(fanlens.group_tokens(lm.model, x, n_clusters=2, progress=False),
                                            np.asarray(m)).ari).mean())
               for lm in (zoo.load(name), zoo.load(name, random_init=True))]
        assert ari[0] > 0.25 and ari[1] < 0.2 and ari[0] > 2 * ari[1], (name, ari)


def test_reproduces_batches_of_the_zoo_go_through_the_model_whole():
    """reproduce forwards each image with all its copies at once (the grid's noise levels in both spaces, the
    pure-noise input, the probe corruptions: counted here from a run on 2 images); at its batch of 32 every zoo
    architecture's captured tokens stay under runner.MAX_FORWARD_TOKEN_BYTES, so the zoo's numbers come from
    whole batches (a larger model's batches go through in parts)."""
    from fanlens import pipeline, runner
    from fanlens.capture import TokenCapture

    x, masks, _names, labels = pipeline._zoo_images(2, 0)
    lm = zoo.load("vit")
    seen: list[int] = []
    handle = lm.model.register_forward_pre_hook(lambda m, a: seen.append(int(a[0].shape[0])))
    try:
        pipeline._run_one(lm, lm.name, "vit", True, x, masks, pipeline.DEFAULT_SIGMAS, 0, "cpu", 2, False, labels)
    finally:
        handle.remove()
    inputs_per_image = max(seen) // 2
    # clean, 5 pixel-space and 5 normalised-space sigmas, the pure-noise input, the 15 probe corruptions (the
    # further networks, without figures, forward 12)
    assert inputs_per_image == 1 + 5 + 5 + 1 + 15
    for name in zoo.ZOO_NAMES:
        s = runner.setup(zoo.load(name), None, pretrained=False, checkpoint=None, input_size=None, device="cpu",
                         blocks=None, num_prefix_tokens=None, layout=None, grid=None, need_images=False)
        with TokenCapture(s.lm.model, **s.capture_kwargs) as cap:
            per_input = runner._token_bytes_per_input(cap, s)
        assert runner._images_per_forward(32, inputs_per_image, per_input) == 32, (name, per_input)
