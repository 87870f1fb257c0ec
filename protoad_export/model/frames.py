"""The graph's camera input: uint8 frames [B, H, W, C] -> the network's float32 [B, 3, H, W] in [0, 1].

The same arithmetic as the Python path (``Preprocessing.pixels_array``), on the same tables
(``data.resample``): cast, resize the height (whole rows of the frame, in its own NHWC layout),
then the width, block-wise (constant Gather + batched MatMul: TensorRT has no antialiased
Resize), scale by 1/255, crop by computing only the kept outputs, letterbox by a constant Pad. A grey camera's single channel is resized once and repeated;
BGR sources are reordered after the resize (both commute with a per-channel linear resize).

TensorRT accepts uint8 only as a network input followed by a cast to float, so the Cast is the
first node on ``frames``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..data.images import Preprocessing
from ..data.resample import AxisResample
from ..options import CHANNEL_ORDERS



class _Axis(nn.Module):
    """One axis of the resize (``AxisResample.apply_first`` / ``apply_last`` on a batch)."""

    def __init__(self, table: AxisResample) -> None:
        super().__init__()
        groups, span = table.index.shape
        self.groups, self.span, self.block, self.n_out = groups, span, table.block, table.n_out
        self.register_buffer("index", torch.from_numpy(table.index.reshape(-1).copy()))
        self.register_buffer("weights", torch.from_numpy(table.weights.copy()))  # [G, L, block]
        self.register_buffer("weights_t", torch.from_numpy(table.weights.transpose(0, 2, 1).copy()))  # [G, block, L]

    def rows(self, x: torch.Tensor) -> torch.Tensor:
        """Axis 1 of [B, H, W, C] -> [B, kept, W, C]."""
        b, _, w, c = x.shape
        spans = torch.index_select(x, 1, self.index).reshape(b, self.groups, self.span, w * c)
        out = torch.matmul(self.weights_t, spans)  # [B, G, block, W*C]
        return out.reshape(b, self.groups * self.block, w, c)[:, : self.n_out]

    def last(self, x: torch.Tensor) -> torch.Tensor:
        """The last axis of [N, C, R, in] -> [N, C, R, kept]."""
        n, c, r, _ = x.shape
        spans = torch.index_select(x, 3, self.index).reshape(-1, self.groups, self.span)  # [N*C*R, G, L]
        out = torch.matmul(spans.transpose(0, 1), self.weights)  # [G, N*C*R, block]
        out = out.transpose(0, 1).reshape(n, c, r, -1)
        return out[..., : self.n_out]


class FrameInput(nn.Module):
    """uint8 frames [B, height, width, C] (C = 3 for ``rgb``/``bgr``, 1 for ``gray``) -> float32 [B, 3, H, W]
    (the preprocessing's input size)."""

    def __init__(self, prep: Preprocessing, width: int, height: int, channel_order: str = "rgb") -> None:
        super().__init__()
        if channel_order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {channel_order!r}")
        axis_w, axis_h, (left, top) = prep.tables(width, height)
        self.width, self.height, self.channel_order = width, height, channel_order
        self.channels = 1 if channel_order == "gray" else 3
        self.resize_w, self.resize_h = _Axis(axis_w), _Axis(axis_h)
        self.register_buffer("bgr", torch.tensor([2, 1, 0]))  # a Gather: every backend has it
        out_w, out_h = prep.input_size
        self.pad = None
        if prep.mode == "letterbox":
            self.pad = (left, out_w - left - axis_w.n_out, top, out_h - top - axis_h.n_out)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = self.resize_h.rows(frames.to(torch.float32))  # [B, h, W, C]
        x = self.resize_w.last(x.permute(0, 3, 1, 2)) * (1.0 / 255.0)  # [B, C, h, w]
        if self.channel_order == "bgr":
            x = torch.index_select(x, 1, self.bgr)
        elif self.channel_order == "gray":
            x = x.expand(-1, 3, -1, -1)
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return x


class FrameNetwork(nn.Module):
    """:class:`FrameInput` followed by the ProtoAD network: frames -> (anomaly_map, score)."""

    def __init__(self, frames: FrameInput, network: nn.Module) -> None:
        super().__init__()
        self.frames = frames
        self.network = network

    @property
    def size(self) -> int:
        return self.network.size

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.network(self.frames(frames))
