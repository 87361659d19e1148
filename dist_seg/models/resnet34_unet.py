"""ResNet34-UNet as the seed writes it: a from-scratch ResNet34 encoder and a UNet-like decoder."""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_seg.models.layers import NormLayer, scale_channels


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs; a 1x1 conv + norm shortcut when the shape changes."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(
            in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False
        )
        self.bn1 = norm_layer(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = norm_layer(out_channels)
        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                norm_layer(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        identity = self.downsample(x)
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = out + identity
        return self.relu(out)


def _make_layer(
    in_channels: int, out_channels: int, blocks: int, stride: int, norm_layer: NormLayer
) -> nn.Sequential:
    layers = [BasicBlock(in_channels, out_channels, stride, norm_layer)]
    layers += [BasicBlock(out_channels, out_channels, 1, norm_layer) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNet34Encoder(nn.Module):
    """ResNet34 without its classifier: 7x7 stride-2 stem, BasicBlocks [3, 4, 6, 3].

    ``forward(x)`` with ``x`` of shape [B, in_channels, H, W] returns a list of five feature
    maps, shallow to deep; feature ``i`` has ``channels[i]`` channels and spatial size
    ``ceil(H / strides[i]) x ceil(W / strides[i])``:

    ====  ==========================  ========================  ====================
    i     produced by                 channels (times width)    stride: default / stem_pool
    ====  ==========================  ========================  ====================
    0     stem: 7x7 conv, norm, ReLU  64                        2 / 2
    1     (max-pool), layer1          64                        2 / 4
    2     layer2                      128                       4 / 8
    3     layer3                      256                       8 / 16
    4     layer4                      512                       16 / 32
    ====  ==========================  ========================  ====================

    ``stem_pool=False`` (the default) skips the stem's 3x3 stride-2 max-pool, as the seed's
    forward does; ``stem_pool=True`` gives the standard ResNet strides. The attributes
    ``channels`` and ``strides`` hold the two columns for the built encoder. Module names
    follow torchvision's ``resnet34`` (``conv1``, ``bn1``, ``layer1``..``layer4``).
    """

    def __init__(
        self,
        in_channels: int = 3,
        width: float = 1.0,
        stem_pool: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        c0, c1, c2, c3, c4 = (scale_channels(c, width) for c in (64, 64, 128, 256, 512))
        self.channels: tuple[int, ...] = (c0, c1, c2, c3, c4)
        self.strides: tuple[int, ...] = (2, 4, 8, 16, 32) if stem_pool else (2, 2, 4, 8, 16)
        self.conv1 = nn.Conv2d(in_channels, c0, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(c0)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool: nn.Module = nn.Identity()
        if stem_pool:
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = _make_layer(c0, c1, 3, 1, norm_layer)
        self.layer2 = _make_layer(c1, c2, 4, 2, norm_layer)
        self.layer3 = _make_layer(c2, c3, 6, 2, norm_layer)
        self.layer4 = _make_layer(c3, c4, 3, 2, norm_layer)

    def forward(self, x: Tensor) -> list[Tensor]:
        y = self.conv1(x)
        y = self.bn1(y)
        f0 = self.relu(y)  # [B, c0, H/2, W/2]
        y = self.maxpool(f0)  # [B, c0, H/s1, W/s1]
        f1 = self.layer1(y)  # [B, c1, H/s1, W/s1]
        f2 = self.layer2(f1)  # [B, c2, H/s2, W/s2]
        f3 = self.layer3(f2)  # [B, c3, H/s3, W/s3]
        f4 = self.layer4(f3)  # [B, c4, H/s4, W/s4]
        return [f0, f1, f2, f3, f4]


class DecoderBlock(nn.Module):
    """2x2 transposed conv up, bilinear resize to the skip's size, concat, 3x3 conv (with
    bias), norm, ReLU."""

    def __init__(
        self,
        in_channels: int,
        skip_channels: int,
        out_channels: int,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(in_channels, out_channels, kernel_size=2, stride=2)
        self.conv = nn.Sequential(
            nn.Conv2d(out_channels + skip_channels, out_channels, kernel_size=3, padding=1),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = self.up(x)  # [B, out, 2h, 2w]
        if x.shape[-2:] != skip.shape[-2:]:  # the resize is the identity when sizes match
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=True)
        x = torch.cat([x, skip], dim=1)  # [B, out + skip, *skip size]
        return self.conv(x)


class ResNet34UNet(nn.Module):
    """ResNet34 encoder, four decoder blocks back up to feature 0's size (H/2), a 1x1 conv
    head, and a bilinear resize of the logits to H x W.

    Any H and W work (multiples of 16, or of 32 with ``stem_pool``, avoid resizes inside the
    decoder). 23,613,313 parameters at width 1, with or without ``stem_pool``.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        width: float = 1.0,
        stem_pool: bool = False,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        self.encoder = ResNet34Encoder(in_channels, width, stem_pool, norm_layer)
        c0, c1, c2, c3, c4 = self.encoder.channels
        self.up4 = DecoderBlock(c4, c3, c3, norm_layer)
        self.up3 = DecoderBlock(c3, c2, c2, norm_layer)
        self.up2 = DecoderBlock(c2, c1, c1, norm_layer)
        self.up1 = DecoderBlock(c1, c0, c0, norm_layer)
        self.head = nn.Conv2d(c0, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        f0, f1, f2, f3, f4 = self.encoder(x)  # feature i: [B, c_i, H/s_i, W/s_i]
        y = self.up4(f4, f3)  # [B, c3, H/s3, W/s3]
        y = self.up3(y, f2)  # [B, c2, H/s2, W/s2]
        y = self.up2(y, f1)  # [B, c1, H/s1, W/s1]
        y = self.up1(y, f0)  # [B, c0, H/2, W/2]
        y = self.head(y)  # [B, out_channels, H/2, W/2]
        y = F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=True)
        return y  # [B, out_channels, H, W] logits
