"""The two segmentation models and a name -> class table to build them from the config."""

from torch import nn

from dist_seg.errors import UserError
from dist_seg.models.resnet34_unet import ResNet34Encoder, ResNet34UNet
from dist_seg.models.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet, "resnet34_unet": ResNet34UNet}
ALIASES = {"resnet34": "resnet34_unet"}  # the seed's command-line spelling

__all__ = ["MODELS", "ResNet34Encoder", "ResNet34UNet", "UNet", "build_model", "count_parameters"]


def build_model(name: str, **kwargs) -> nn.Module:
    """``MODELS[name](**kwargs)``; ``name`` may also be an alias such as ``"resnet34"``."""
    cls = MODELS.get(ALIASES.get(name, name))
    if cls is None:
        valid = ", ".join([*MODELS, *(f"{a} (= {t})" for a, t in ALIASES.items())])
        raise UserError(f"unknown model {name!r}; valid names: {valid}")
    return cls(**kwargs)


def count_parameters(model: nn.Module) -> int:
    """The number of parameter elements in ``model``, trainable or not (buffers excluded)."""
    return sum(p.numel() for p in model.parameters())
