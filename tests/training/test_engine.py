"""The engine: a tiny model on the CPU, synthetic colour-coded images, no MLflow. The model
and its step tools come from the training recipe, as in a run."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from skinml.core.clinical import SITES
from skinml.core.config import Config, load_config
from skinml.data.clinical import encode_clinical
from skinml.data.loader import CachedBatches
from skinml.training.balance import STRATEGIES
from skinml.training.checkpoint import CHECKPOINT_FORMAT, Checkpoint
from skinml.training.device import precision_for, seed_everything
from skinml.training.engine import EpochResult, fit, train_one_epoch
from skinml.training.recipe import LoopSettings
from skinml.workflows.train import build_recipe

STILL = ["augment.scale_min=1.0", "augment.scale_max=1.0", "augment.ratio_min=1.0",
         "augment.ratio_max=1.0", "augment.hflip=false", "augment.vflip=false",
         "augment.rotation=0", "augment.brightness=0", "augment.contrast=0",
         "augment.saturation=0", "augment.hue=0"]
TINY = ["model.arch=resnext_small", "model.image_size=16", "model.crop_pct=1.0",
        "data.cache_size=16", "optim.lr=3e-3", "optim.epochs=3", "optim.warmup_epochs=0",
        "optim.batch_size=14", "optim.label_smoothing=0", "balance.strategy=none",
        "runtime.seed=0", "runtime.channels_last=false", "runtime.amp=off",
        "runtime.progress=false", *STILL]
CPU = torch.device("cpu")
FOUR_STEPS = np.arange(56) % 7  # train labels: 4 steps of 14 an epoch


def config(*extra: str) -> Config:
    return load_config(None, [*TINY, *extra])


def colour_coded(per_class: int, seed: int, clinical: bool = False,
                 shared_colours: bool = False) -> CachedBatches:
    """7 classes, each a colour plus noise: learnable in a few steps by any convnet. With
    `clinical`, each class also has its own body site and age (some rows unrecorded); with
    `shared_colours`, classes 0-1, 2-3 and 4-5 share a colour, so only the metadata tells
    the two of a pair apart."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(7), per_class)
    colours = np.random.default_rng(0).integers(0, 256, (7, 3))  # every seed: the same
    shown = labels // 2 * 2 if shared_colours else labels
    noise = rng.normal(0, 20, (len(labels), 16, 16, 3))
    images = np.clip(colours[shown][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    vectors = encode_clinical(pd.DataFrame({
        "age": np.where(np.arange(len(labels)) % 5 == 0, np.nan, 15.0 + 10 * labels),
        "sex": np.where(labels % 2, "male", "female"),
        "localization": [SITES[label] for label in labels]})) if clinical else None
    return CachedBatches(images, np.arange(len(labels)), labels, 14, CPU, clinical=vectors)


def run(tmp_path, cfg: Config | None = None, resume: bool = False, **kwargs):
    cfg = cfg or config()
    fusion = cfg.model.metadata != "none"
    shared = kwargs.pop("shared_colours", False)
    seed_everything(0)
    train = colour_coded(8, 0, fusion, shared)
    recipe = build_recipe(cfg, train.labels, CPU)
    checkpoint = Checkpoint(tmp_path / "last.pt", {"marker": "the resolved config"})
    state = checkpoint.restore(recipe.model, recipe.tools) if resume else None
    epochs: list[EpochResult] = []
    result = fit(recipe.model, recipe.tools, train, colour_coded(3, 1, fusion, shared),
                 LoopSettings.from_config(cfg), checkpoint, state=state,
                 on_epoch_end=kwargs.pop("on_epoch_end", epochs.append), **kwargs)
    return result, epochs


def test_loss_falls_and_the_best_epoch_and_its_weights_are_kept(tmp_path):
    result, epochs = run(tmp_path)
    assert [e.epoch for e in epochs] == [1, 2, 3]
    assert epochs[-1].train_loss < epochs[0].train_loss
    scores = [e.val["balanced_accuracy"] for e in epochs]
    assert result.best_epoch == 1 + int(np.argmax(scores)) and result.best_score == max(scores)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert payload["format"] == CHECKPOINT_FORMAT
    assert payload["config"] == {"marker": "the resolved config"}  # what --resume reruns
    assert payload["state"]["epoch"] == 3 and payload["scaler"] is None  # fp32: no scaler state
    best = payload["state"]["best_weights"]
    assert all(torch.equal(best[k], v) for k, v in result.best_weights.items())


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_each_balancing_strategy_trains(tmp_path, strategy):
    """Each strategy's epoch order and loss, through the recipe, as a run builds them (an
    in-process MLflow run costs 4 s more a strategy, mostly its figures)."""
    _, (epoch,) = run(tmp_path, config("optim.epochs=1", f"balance.strategy={strategy}"))
    assert np.isfinite(epoch.train_loss)


def test_with_ema_the_averaged_weights_are_scored_and_kept(tmp_path):
    result, _ = run(tmp_path, config("optim.epochs=1", "optim.ema_decay=0.9"))
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    weight = "fc.weight"
    assert torch.equal(result.best_weights[weight], payload["ema"][f"module.{weight}"])
    assert not torch.equal(result.best_weights[weight], payload["model"][weight])


class Killed(Exception):
    pass


@pytest.mark.parametrize("metadata", ["none", "concat", "film"])
def test_a_run_killed_after_an_epoch_resumes_to_the_uninterrupted_result(tmp_path, metadata):
    """Image-only and fusion models alike (a fusion model's metadata dropout draws from the
    seeded generator too)."""
    cfg = config(f"model.metadata={metadata}")
    whole, _ = run(tmp_path / "whole", cfg)

    def die_in_epoch_2(result: EpochResult) -> None:
        if result.epoch == 2:  # before epoch 2's checkpoint: epoch 1's is the last on disk
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "killed", cfg, on_epoch_end=die_in_epoch_2)
    resumed, epochs = run(tmp_path / "killed", cfg, resume=True)
    assert [e.epoch for e in epochs] == [2, 3]
    assert (resumed.best_epoch, resumed.best_score) == (whole.best_epoch, whole.best_score)
    for key, value in whole.best_weights.items():
        assert torch.equal(resumed.best_weights[key], value), key


def test_one_step_path_for_every_precision_on_the_cpu():
    fp32, bf16 = precision_for(CPU, "off"), precision_for(CPU, "bf16")
    assert not fp32.scaler.is_enabled() and fp32.name == "off"
    assert precision_for(CPU, "auto").name == "off"  # AMP is for CUDA unless asked for
    with bf16.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16
    recipe = build_recipe(config("runtime.amp=bf16", "runtime.channels_last=true"),
                          FOUR_STEPS, CPU)
    model, tools = recipe.model, recipe.tools
    assert tools.memory_format == torch.channels_last
    before = model.fc.weight.detach().clone()
    stats = train_one_epoch(model, [next(iter(colour_coded(2, 0).epoch()))], tools)
    assert np.isfinite(stats.loss) and stats.images == 14
    assert not torch.equal(model.fc.weight, before)  # one bf16 step, through the scaler


def test_fp16_steps_go_through_an_enabled_grad_scaler_on_the_cpu():
    recipe = build_recipe(config("runtime.amp=fp16"), FOUR_STEPS, CPU)
    model, tools = recipe.model, recipe.tools
    assert tools.precision.scaler.is_enabled() and tools.precision.name == "fp16"
    with tools.precision.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float16
    before = model.fc.weight.detach().clone()
    batch = next(iter(colour_coded(2, 0).epoch()))
    losses = [train_one_epoch(model, [batch], tools).loss for _ in range(3)]
    assert all(np.isfinite(losses)) and tools.precision.scaler.get_scale() > 0
    assert not torch.equal(model.fc.weight, before)


def test_a_fusion_model_tells_apart_classes_that_only_the_metadata_separates(tmp_path):
    """Classes 0-1, 2-3 and 4-5 share a colour, and each class has its own body site and
    age: image-only stays near 4/7, both fusions learn the pairs apart."""
    settings = ["optim.epochs=8", "optim.lr=1e-2"]
    best = {metadata: run(tmp_path / metadata, config(f"model.metadata={metadata}", *settings),
                          shared_colours=True)[0].best_score
            for metadata in ("none", "concat", "film")}
    assert best["none"] <= 0.7, best
    assert best["concat"] >= 0.9 and best["film"] >= 0.9, best


def test_a_fusion_step_runs_in_bf16_and_fusion_weights_average_in_ema(tmp_path):
    recipe = build_recipe(config("model.metadata=film", "runtime.amp=bf16"), FOUR_STEPS, CPU)
    before = recipe.model.film.weight.detach().clone()
    batch = next(iter(colour_coded(2, 0, clinical=True).epoch()))
    assert np.isfinite(train_one_epoch(recipe.model, [batch], recipe.tools).loss)
    assert not torch.equal(recipe.model.film.weight, before)  # the metadata path trained
    result, _ = run(tmp_path, config("model.metadata=film", "optim.epochs=1",
                                     "optim.ema_decay=0.9"))
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    assert torch.equal(result.best_weights["film.weight"], payload["ema"]["module.film.weight"])
