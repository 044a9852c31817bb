"""The model factory (timm by name, local pretrained weights only) behaves as the config says."""
from __future__ import annotations

import pytest
import torch

from ddp_train.config import ConfigError, ModelConfig
from ddp_train.models import build_model


def test_model_from_local_pretrained_file_adapts_classifier(tmp_path):
    import timm

    src = timm.create_model("test_resnet", num_classes=5)
    path = tmp_path / "weights.pth"
    torch.save(src.state_dict(), path)
    model = build_model(ModelConfig(name="test_resnet", pretrained=str(path)), num_classes=3)
    assert model.get_classifier().out_features == 3
    key = next(k for k in src.state_dict() if "conv" in k)
    assert torch.equal(model.state_dict()[key], src.state_dict()[key])  # backbone copied


@pytest.mark.parametrize("cfg, match", [
    (ModelConfig(name="not_a_model"), "model.name"),
    (ModelConfig(name="test_resnet", pretrained="/nonexistent.pth"), "model.pretrained"),
    (ModelConfig(name="test_resnet", num_classes=4), "model.num_classes"),
])
def test_model_errors_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        build_model(cfg, num_classes=3)
