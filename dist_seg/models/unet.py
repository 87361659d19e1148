"""UNet (Ronneberger et al., 2015) as the seed writes it, with batch norm and padded convs."""

import torch
from torch import Tensor, nn

from dist_seg.models.layers import NormLayer, scale_channels


class DoubleConv(nn.Sequential):
    """(3x3 conv without bias, norm, ReLU) twice; keeps the spatial size."""

    def __init__(
        self, in_channels: int, out_channels: int, norm_layer: NormLayer = nn.BatchNorm2d
    ) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            norm_layer(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """Encoder widths 64-128-256-512-1024 (times ``width``), 2x2 max-pool down, 2x2
    transposed-conv up, skip concatenation, 1x1 conv head.

    Input height and width must be multiples of 16. 31,037,633 parameters at width 1.
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 1,
        width: float = 1.0,
        norm_layer: NormLayer = nn.BatchNorm2d,
    ) -> None:
        super().__init__()
        c1, c2, c3, c4, c5 = (scale_channels(c, width) for c in (64, 128, 256, 512, 1024))
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.down1 = DoubleConv(in_channels, c1, norm_layer)
        self.down2 = DoubleConv(c1, c2, norm_layer)
        self.down3 = DoubleConv(c2, c3, norm_layer)
        self.down4 = DoubleConv(c3, c4, norm_layer)
        self.bottom = DoubleConv(c4, c5, norm_layer)
        self.up4 = nn.ConvTranspose2d(c5, c4, kernel_size=2, stride=2)
        self.conv4 = DoubleConv(c4 + c4, c4, norm_layer)
        self.up3 = nn.ConvTranspose2d(c4, c3, kernel_size=2, stride=2)
        self.conv3 = DoubleConv(c3 + c3, c3, norm_layer)
        self.up2 = nn.ConvTranspose2d(c3, c2, kernel_size=2, stride=2)
        self.conv2 = DoubleConv(c2 + c2, c2, norm_layer)
        self.up1 = nn.ConvTranspose2d(c2, c1, kernel_size=2, stride=2)
        self.conv1 = DoubleConv(c1 + c1, c1, norm_layer)
        self.head = nn.Conv2d(c1, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2] % 16 or x.shape[-1] % 16:
            raise ValueError(f"UNet needs height and width divisible by 16, got {tuple(x.shape)}")
        # Encoder: skip s_k has c_k channels at stride 2**(k-1).
        s1 = self.down1(x)  # [B, c1, H, W]
        y = self.pool(s1)  # [B, c1, H/2, W/2]
        s2 = self.down2(y)  # [B, c2, H/2, W/2]
        y = self.pool(s2)  # [B, c2, H/4, W/4]
        s3 = self.down3(y)  # [B, c3, H/4, W/4]
        y = self.pool(s3)  # [B, c3, H/8, W/8]
        s4 = self.down4(y)  # [B, c4, H/8, W/8]
        y = self.pool(s4)  # [B, c4, H/16, W/16]
        y = self.bottom(y)  # [B, c5, H/16, W/16]
        # Decoder: up, concat the skip of the same size, DoubleConv.
        y = self.up4(y)  # [B, c4, H/8, W/8]
        y = torch.cat([y, s4], dim=1)  # [B, 2*c4, H/8, W/8]
        y = self.conv4(y)
        y = self.up3(y)  # [B, c3, H/4, W/4]
        y = torch.cat([y, s3], dim=1)  # [B, 2*c3, H/4, W/4]
        y = self.conv3(y)
        y = self.up2(y)  # [B, c2, H/2, W/2]
        y = torch.cat([y, s2], dim=1)  # [B, 2*c2, H/2, W/2]
        y = self.conv2(y)
        y = self.up1(y)  # [B, c1, H, W]
        y = torch.cat([y, s1], dim=1)  # [B, 2*c1, H, W]
        y = self.conv1(y)
        return self.head(y)  # [B, out_channels, H, W] logits
