"""The NF block and the NFNet, as DeepMind's `nfnets/nfnet.py`, with timm's model interface.

Parameter names and shapes are those of timm's `dm_nfnet_*` (strict state-dict compatibility);
the computation is DeepMind's (see `layers.py` for where that differs from timm).
"""

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import nn
from timm.layers import ClassifierHead
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq

from .layers import GammaAct, SqueezeExcite, StochDepth, WSConv2d, avg_pool_same, bottleneck_width, hidden_width


@dataclass(frozen=True)
class NFNetCfg:
    """Architecture of an NFNet; field names follow DeepMind's `nfnet_params` and `NFNet` arguments."""

    depths: tuple[int, ...] = (1, 2, 6, 3)
    widths: tuple[int, ...] = (256, 512, 1536, 1536)
    group_width: Union[int, tuple[int, ...]] = 128
    expansion: float = 0.5          # bottleneck ratio
    big_width: bool = True          # bottleneck width from the output (True) or input width
    se_ratio: float = 0.5
    alpha: float = 0.2
    activation: str = "gelu"
    stochdepth_rate: float = 0.1    # rate of the last block; block i of N gets rate * i / N
    drop_rate: float = 0.2          # dropout before the classifier
    stem_widths: tuple[int, ...] = (16, 32, 64)  # then widths[0] // 2
    final_conv_mult: float = 2.0
    use_two_convs: bool = True
    strides: tuple[int, ...] = (1, 2, 2, 2)
    train_size: int = 192           # metadata: DeepMind's train and test resolutions
    test_size: int = 256

    def group_widths(self) -> tuple[int, ...]:
        g = self.group_width
        return tuple(g) if isinstance(g, (tuple, list)) else (g,) * len(self.widths)

    @property
    def num_features(self) -> int:
        return int(self.final_conv_mult * self.widths[-1])


class DownsampleAvg(nn.Module):
    """Shortcut: 2x2 average pool (SAME, padding not counted) when strided, then a 1x1 WSConv."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, device=None, dtype=None):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"DownsampleAvg supports strides 1 and 2, got {stride}")
        self.stride = stride
        self.conv = WSConv2d(in_ch, out_ch, 1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(avg_pool_same(x) if self.stride > 1 else x)


class NFBlock(nn.Module):
    """h_{i+1} = h_i + alpha * skip_gain * f(h_i / beta_i), f a bottleneck with two grouped 3x3s and SE.

    `beta` is stored as DeepMind's multiplier 1 / beta_i (the expected std of h_i); the shortcut of
    a transition block (stride or width change) starts from the scaled activation, as DeepMind's.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, beta: float, cfg: NFNetCfg,
                 group_width: int, stochdepth_rate: float, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.alpha, self.beta = cfg.alpha, beta
        mid = bottleneck_width(out_ch, in_ch, cfg.expansion, group_width, cfg.big_width)
        groups = mid // group_width
        self.downsample = (DownsampleAvg(in_ch, out_ch, stride, **dd)
                           if stride > 1 or in_ch != out_ch else None)
        self.act1 = GammaAct(cfg.activation)
        self.conv1 = WSConv2d(in_ch, mid, 1, **dd)
        self.act2 = GammaAct(cfg.activation)
        self.conv2 = WSConv2d(mid, mid, 3, stride=stride, groups=groups, **dd)
        if cfg.use_two_convs:
            self.act2b = GammaAct(cfg.activation)
            self.conv2b = WSConv2d(mid, mid, 3, groups=groups, **dd)
        else:
            self.act2b = self.conv2b = None
        self.act3 = GammaAct(cfg.activation)
        self.conv3 = WSConv2d(mid, out_ch, 1, **dd)
        self.attn_last = SqueezeExcite(out_ch, hidden_width(out_ch, cfg.se_ratio), **dd)
        self.drop_path = StochDepth(stochdepth_rate)
        # SkipInit: the residual branch starts switched off.
        self.skipinit_gain = nn.Parameter(torch.zeros((), **dd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(x) * self.beta
        shortcut = x
        if self.downsample is not None:
            shortcut = self.downsample(out)
        out = self.conv1(out)
        out = self.conv2(self.act2(out))
        if self.conv2b is not None and self.act2b is not None:
            out = self.conv2b(self.act2b(out))
        out = self.conv3(self.act3(out))
        out = self.drop_path(self.attn_last(out) * out)
        return shortcut + self.alpha * self.skipinit_gain * out


class NFNet(nn.Module):
    """Normalizer-Free ResNet (NFNet-F*), numerically DeepMind's, speaking timm's model interface."""

    def __init__(self, cfg: NFNetCfg, num_classes: int = 1000, in_chans: int = 3,
                 global_pool: str = "avg", drop_rate: Optional[float] = None,
                 drop_path_rate: Optional[float] = None, device=None, dtype=None, **kwargs):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if kwargs:
            raise TypeError(f"NFNet got unexpected arguments: {sorted(kwargs)}")
        self.cfg = cfg
        self.num_classes = num_classes
        self.drop_rate = cfg.drop_rate if drop_rate is None else drop_rate
        stochdepth_rate = cfg.stochdepth_rate if drop_path_rate is None else drop_path_rate
        self.grad_checkpointing = False

        stem_widths = (*cfg.stem_widths, cfg.widths[0] // 2)
        stem, ch = [], in_chans
        for i, w in enumerate(stem_widths):
            if i:
                stem.append((f"act{i + 1}", GammaAct(cfg.activation)))
            stride = 2 if i in (0, len(stem_widths) - 1) else 1
            stem.append((f"conv{i + 1}", WSConv2d(ch, w, 3, stride=stride, **dd)))
            ch = w
        self.stem = nn.Sequential(OrderedDict(stem))  # conv1, then (activation, conv) pairs
        self.feature_info = [dict(num_chs=stem_widths[-2], reduction=2, module=f"stem.act{len(stem_widths)}")]

        # beta = 1 / expected_std; the expected variance resets after each stage's first block.
        num_blocks, index, expected_std, reduction = sum(cfg.depths), 0, 1.0, 4
        stages = []
        for s, (depth, width, gw, stride) in enumerate(
                zip(cfg.depths, cfg.widths, cfg.group_widths(), cfg.strides)):
            blocks = []
            for b in range(depth):
                blocks.append(NFBlock(ch, width, stride if b == 0 else 1, 1.0 / expected_std, cfg, gw,
                                      stochdepth_rate * index / num_blocks, **dd))
                ch, index = width, index + 1
                if b == 0:
                    expected_std = 1.0
                expected_std = (expected_std ** 2 + cfg.alpha ** 2) ** 0.5
            reduction *= stride
            stages.append(nn.Sequential(*blocks))
            if s < len(cfg.depths) - 1:
                self.feature_info.append(dict(num_chs=width, reduction=reduction, module=f"stages.{s}"))
        self.stages = nn.Sequential(*stages)

        self.num_features = self.head_hidden_size = cfg.num_features
        self.final_conv = WSConv2d(ch, self.num_features, 1, **dd)
        self.final_act = GammaAct(cfg.activation)
        self.feature_info.append(dict(num_chs=self.num_features, reduction=reduction, module="final_act"))
        # timm < 1.0.21's ClassifierHead takes no device/dtype: build it on the device, then cast
        with torch.device(device) if device is not None else contextlib.nullcontext():
            self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool,
                                       drop_rate=self.drop_rate).to(dtype=dtype)
        if num_classes:
            nn.init.normal_(self.head.fc.weight, std=0.01)  # DeepMind's fc_init N(0, 0.01)
            nn.init.zeros_(self.head.fc.bias)

    # --- timm interface --------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.(\d+)", None),
                (r"^final_conv", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """DeepMind's partition: gains, skip gains and biases (the classifier bias too) are not decayed."""
        return {n for n, _ in self.named_parameters()
                if n.endswith((".gain", ".bias", "skipinit_gain"))}

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)
        if num_classes:
            nn.init.normal_(self.head.fc.weight, std=0.01)
            nn.init.zeros_(self.head.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.stages, x)
        else:
            x = self.stages(x)
        return self.final_act(self.final_conv(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, list[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ):
        """Features at the points of `feature_info` (stem, stages 0-2, final activation)."""
        if output_fmt != "NCHW":
            raise ValueError("NFNet intermediates are NCHW only")
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        intermediates = []
        if 0 in take:  # the stem's last activation, the input of its last (strided) conv
            for layer in self.stem[:-1]:
                x = layer(x)
            intermediates.append(x)
            x = self.stem[-1](x)
        else:
            x = self.stem(x)
        n_stages = len(self.cfg.depths)  # not len(self.stages): pruning shortens it
        for s, stage in enumerate(self.stages):
            if stop_early and s + 1 > max_index:
                break
            x = checkpoint_seq(stage, x) if self.grad_checkpointing else stage(x)
            if s + 1 < n_stages and s + 1 in take:
                intermediates.append(x)
        else:
            x = self.final_act(self.final_conv(x))
            if n_stages in take:
                intermediates.append(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, list[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        if max_index < len(self.stages):
            self.stages = self.stages[:max_index]
            self.final_conv = nn.Identity()
            self.final_act = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take


__all__ = ["NFNet", "NFNetCfg", "NFBlock", "DownsampleAvg"]
