"""The engine alone: a tiny model on the CPU, synthetic colour-coded images, no MLflow."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from skinml.checkpoint import CHECKPOINT_FORMAT
from skinml.config import AugmentConfig, BalanceConfig, ModelConfig, OptimConfig
from skinml.data.loader import CachedBatches
from skinml.data.preprocess import Preprocess
from skinml.device import precision_for, seed_everything
from skinml.engine import CheckpointFile, EpochResult, fit, train_one_epoch
from skinml.model import build_model
from skinml.recipe import TrainSettings, build_step_tools

STILL = AugmentConfig(scale_min=1.0, scale_max=1.0, ratio_min=1.0, ratio_max=1.0, hflip=False,
                      vflip=False, rotation=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
                      hue=0.0)
SETTINGS = TrainSettings(
    optim=OptimConfig(lr=3e-3, epochs=3, warmup_epochs=0.0, batch_size=14, label_smoothing=0.0),
    balance=BalanceConfig(strategy="none"), augment=STILL, preprocess=Preprocess(16, 1.0),
    seed=0)
CPU = torch.device("cpu")


def colour_coded(per_class: int, seed: int) -> CachedBatches:
    """7 classes, each a colour plus noise: learnable in a few steps by any convnet."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(7), per_class)
    colours = rng.integers(0, 256, (7, 3))
    noise = rng.normal(0, 20, (len(labels), 16, 16, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return CachedBatches(images, np.arange(len(labels)), labels, 14, CPU)


def run(tmp_path, settings: TrainSettings = SETTINGS, **kwargs):
    seed_everything(0)
    model = build_model(ModelConfig(arch="resnext_small", image_size=16))
    epochs: list[EpochResult] = []
    result = fit(model, colour_coded(8, 0), colour_coded(3, 1), settings,
                 CheckpointFile(tmp_path / "last.pt", {"marker": "the resolved config"}),
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


def test_with_ema_the_averaged_weights_are_scored_and_kept(tmp_path):
    settings = dataclasses.replace(SETTINGS, optim=dataclasses.replace(SETTINGS.optim, epochs=1,
                                                                        ema_decay=0.9))
    result, _ = run(tmp_path, settings)
    payload = torch.load(tmp_path / "last.pt", weights_only=True)
    weight = "fc.weight"
    assert torch.equal(result.best_weights[weight], payload["ema"][f"module.{weight}"])
    assert not torch.equal(result.best_weights[weight], payload["model"][weight])


class Killed(Exception):
    pass


def test_a_run_killed_after_an_epoch_resumes_to_the_uninterrupted_result(tmp_path):
    whole, _ = run(tmp_path / "whole")

    def die_in_epoch_2(result: EpochResult) -> None:
        if result.epoch == 2:  # before epoch 2's checkpoint: epoch 1's is the last on disk
            raise Killed

    with pytest.raises(Killed):
        run(tmp_path / "killed", on_epoch_end=die_in_epoch_2)
    resumed, epochs = run(tmp_path / "killed", resume=True)
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
    model = build_model(ModelConfig(arch="resnext_small", image_size=16))
    settings = dataclasses.replace(SETTINGS, amp="bf16", channels_last=True)
    model.to(CPU, memory_format=settings.memory_format)
    tools = build_step_tools(model, np.arange(7), settings, CPU, steps_per_epoch=4)
    before = model.fc.weight.detach().clone()
    stats = train_one_epoch(model, [next(iter(colour_coded(2, 0).epoch()))], tools)
    assert np.isfinite(stats.loss) and stats.images == 14
    assert not torch.equal(model.fc.weight, before)  # one bf16 step, through the scaler


def test_fp16_steps_go_through_an_enabled_grad_scaler_on_the_cpu():
    settings = dataclasses.replace(SETTINGS, amp="fp16")
    model = build_model(ModelConfig(arch="resnext_small", image_size=16))
    tools = build_step_tools(model, np.arange(7), settings, CPU, steps_per_epoch=4)
    assert tools.precision.scaler.is_enabled() and tools.precision.name == "fp16"
    with tools.precision.autocast():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float16
    before = model.fc.weight.detach().clone()
    batch = next(iter(colour_coded(2, 0).epoch()))
    losses = [train_one_epoch(model, [batch], tools).loss for _ in range(3)]
    assert all(np.isfinite(losses)) and tools.precision.scaler.get_scale() > 0
    assert not torch.equal(model.fc.weight, before)
