"""Model registry: each ResNeXt gets a 7-class head; ImageNet weights fail clearly offline."""

from __future__ import annotations

import pytest
import torch

from skinml.core.config import ModelConfig
from skinml.models import ARCHITECTURES, ModelError, SmallResNeXt, build_model


def test_small_resnext_predicts_seven_classes_at_small_sizes():
    model = build_model(ModelConfig(arch="resnext_small", image_size=32)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert any(getattr(m, "groups", 1) > 1 for m in model.modules())  # grouped convolutions


@pytest.mark.parametrize("arch", ["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d"])
def test_torchvision_resnexts_get_a_seven_class_head(arch):
    model = build_model(ModelConfig(arch=arch, drop_rate=0.2))
    assert model.fc[-1].out_features == 7
    assert model.layer1[0].conv2.groups in (32, 64)


def test_small_is_much_smaller_than_resnext50():
    small = sum(p.numel() for p in SmallResNeXt().parameters())
    big = sum(p.numel() for p in build_model(ModelConfig(arch="resnext50_32x4d")).parameters())
    assert small * 10 < big


def test_registry_lists_the_architectures():
    assert sorted(ARCHITECTURES) == ["resnext101_32x8d", "resnext101_64x4d", "resnext50_32x4d",
                                     "resnext_small"]


def test_pretrained_weights_offline_fail_with_instructions(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    for proxy in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, "http://127.0.0.1:9")  # nothing listens: fails at once
    with pytest.raises(ModelError) as raised:
        build_model(ModelConfig(arch="resnext50_32x4d", pretrained=True))
    message = str(raised.value)
    assert "model.pretrained=false" in message
    assert str(tmp_path / "hub" / "checkpoints") in message
    assert "resnext50_32x4d-1a0047aa.pth" in message


def test_pretrained_weights_load_from_the_torch_hub_folder(tmp_path, monkeypatch):
    from torchvision.models import ResNeXt50_32X4D_Weights, resnext50_32x4d

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    reference = resnext50_32x4d()
    filename = ResNeXt50_32X4D_Weights.IMAGENET1K_V2.url.rsplit("/", 1)[-1]
    torch.save(reference.state_dict(), checkpoints / filename)
    model = build_model(ModelConfig(arch="resnext50_32x4d", pretrained=True))
    assert torch.equal(model.conv1.weight, reference.conv1.weight)
    assert model.fc.out_features == 7


def test_small_resnext_has_no_pretrained_weights():
    with pytest.raises(ModelError, match="model.pretrained=false"):
        build_model(ModelConfig(arch="resnext_small", pretrained=True))
