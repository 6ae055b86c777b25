"""Asymmetric uniform integer quantization of KV states, with real bit packing.

Each group shares an fp16 scale and zero point: code = round((x - zero) / scale) in [0, 2**bits - 1],
x^ = code * scale + zero, zero = min(group), scale = (max - min) / (2**bits - 1), so the error is at
most scale / 2. Grouping follows KIVI (Liu et al., arXiv:2402.02750): axis="channel", each channel
over `group_size` consecutive tokens (keys); axis="token", each token over groups of `group_size`
channels (values). Codes are packed along head_dim (`packing`). Departure: on CUDA with Triton,
encoding runs one fused kernel (`kernels.quantize_pack`, byte-identical output).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from .base import Codec, Stored, check_finite
from .packing import pack, unpack

ALLOWED_BITS = (2, 3, 4, 8)
# Per-token groups are packed 8 tokens to a row: long contiguous runs for the unpack (see `encode`).
TOKEN_AXIS_ROW_TOKENS = 8
ALLOWED_AXES = ("channel", "token")
_FP16_MAX = 65504.0


def _check_fp16_range(lo: torch.Tensor, hi: torch.Tensor) -> None:
    """Raise a ValueError if a group minimum `lo` or maximum `hi` lies outside the fp16 range.

    On CUDA the check stays on the device (no host synchronisation on the hot path): a value
    out of range trips a device-side assertion, reported as a CUDA error at the next
    synchronisation (see `base.check_finite`).
    """
    if lo.device.type == "cuda":
        largest = torch.maximum(hi.abs().amax(), lo.abs().amax())
        torch._assert_async(largest <= _FP16_MAX, "KV states exceed the fp16 range of scales and zero points")
        return
    if max(hi.abs().max().item(), lo.abs().max().item()) > _FP16_MAX:
        raise ValueError(
            "KV states exceed the fp16 range in which scales and zero points are stored "
            f"(|x| up to {max(hi.abs().max().item(), lo.abs().max().item()):.3g}); "
            "this codec cannot represent them."
        )


@dataclass(frozen=True)
class QuantCodec(Codec):
    """Uniform asymmetric quantization of (B, H, T, D) states.

    Attributes:
        bits: code width, one of 2, 3, 4, 8.
        axis: "channel" (statistics per channel over `group_size` tokens) or "token"
            (statistics per token over `group_size` channels).
        group_size: number of values that share a scale and zero point.
    """

    bits: int = 4
    axis: str = "token"
    group_size: int = 32

    def __post_init__(self):
        if self.bits not in ALLOWED_BITS:
            raise ValueError(f"bits must be one of {ALLOWED_BITS}, got {self.bits!r}")
        if self.axis not in ALLOWED_AXES:
            raise ValueError(f"axis must be one of {ALLOWED_AXES}, got {self.axis!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {self.group_size!r}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    @property
    def row_tokens(self) -> int:
        """Tokens whose codes are packed together in one row of `codes` (see `encode`)."""
        return self.group_size if self.axis == "channel" else TOKEN_AXIS_ROW_TOKENS

    @property
    def token_multiple(self) -> int:
        return self.row_tokens

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        """View (B, H, T, D) as groups along the reduction dim -2 of the result."""
        B, H, T, D = x.shape
        if self.axis == "token":
            if D % self.group_size:
                raise ValueError(f"group_size {self.group_size} must divide head_dim {D}")
            return x.reshape(B, H, T, D // self.group_size, self.group_size).transpose(-1, -2)  # (B,H,T,g,D/g)
        if T % self.group_size:
            raise ValueError(f"per-channel groups need a multiple of {self.group_size} tokens, got {T}")
        return x.reshape(B, H, T // self.group_size, self.group_size, D)  # (B,H,T/g,g,D)

    def encode(self, x: torch.Tensor) -> Stored:
        """Codes, scales and zero points of `x` (B, H, T, D); on CUDA with Triton, one fused kernel
        (`kernels.quantize_pack`, byte-identical output)."""
        check_finite(x)
        if x.shape[-1] % 8:
            raise ValueError(f"head_dim must be a multiple of 8 for bit packing, got {x.shape[-1]}")
        if kernels.use_triton(x) and kernels.can_pack(x.shape[-1], self.bits, self.axis, self.group_size):
            self._grouped(x)  # the same errors as the torch path for groups that do not fit
            _check_fp16_range(x, x)
            self._check_rows(x.shape[2])
            return kernels.quantize_pack(x, self.bits, self.axis, self.group_size)
        codes, scale, zero = self.quantize(x)
        B, H, T, D = x.shape
        r = self.row_tokens
        self._check_rows(T)
        codes = codes.reshape(B, H, T // r, r * D)  # r tokens' codes per row
        return {
            "codes": pack(codes, self.bits),  # (B, H, T/r, r*D*bits/8) uint8
            "scale": scale,  # token: (B, H, T, D/g); channel: (B, H, T/g, D)
            "zero": zero,
        }

    def quantize(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Unpacked codes (B, H, T, D) uint8 and fp16 scales and zero points of `x` (B, H, T, D).

        Scales and zero points are (B, H, T, D/g) for axis "token", (B, H, T/g, D) for axis
        "channel". Any number of tokens for axis "token" (no rows are packed here).
        """
        groups = self._grouped(x.float())
        lo = groups.amin(dim=-2, keepdim=True)
        hi = groups.amax(dim=-2, keepdim=True)
        _check_fp16_range(lo, hi)
        zero = lo.half()
        scale = ((hi - zero.float()) / self.levels).half()
        # A constant group has scale 0: any positive scale gives code 0 and exact decoding.
        safe_scale = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        codes = torch.round((groups - zero.float()) / safe_scale).clamp_(0, self.levels).to(torch.uint8)
        return self._ungrouped(codes, x.shape), scale.squeeze(-2), zero.squeeze(-2)

    def _check_rows(self, tokens: int) -> None:
        r = self.row_tokens
        if tokens % r:
            raise ValueError(f"{self} packs {r} tokens per row and needs a multiple of {r} tokens, got {tokens}")

    def _ungrouped(self, groups: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        B, H, T, D = shape
        if self.axis == "token":
            return groups.transpose(-1, -2).reshape(B, H, T, D)
        return groups.reshape(B, H, T, D)

    def decoded_shape(self, stored: Stored) -> tuple[int, int, int, int]:
        """(B, H, T, D) of the states that `stored` encodes."""
        B, H, rows, m = stored["codes"].shape  # (B, H, T/r, r*D*bits/8)
        r = self.row_tokens
        return B, H, rows * r, m * 8 // self.bits // r

    def decode(self, stored: Stored, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(self.decoded_shape(stored), dtype=dtype, device=stored["codes"].device)
        self.decode_into(stored, out)
        return out

    def decode_into(self, stored: Stored, out: torch.Tensor) -> None:
        """x_hat = code * scale + zero, written into `out` (B, H, T, D).

        Codes are unpacked to uint8 (`packing.unpack`: a few whole-run operations), converted
        into `out` by one copy, then scaled and shifted in place (`mul_`, `add_`: on CPU these
        broadcast the per-group scale much faster than one `addcmul`). `out` may be a view into
        the layer's output; nothing decoded is copied again. Equals `unpack_reference` followed
        by `code * scale + zero` in `out.dtype` (two roundings in that dtype).
        """
        B, H, T, D = self.decoded_shape(stored)
        if tuple(out.shape) != (B, H, T, D):
            raise ValueError(f"decode_into: out has shape {tuple(out.shape)}, the codes decode to {(B, H, T, D)}")
        dtype = out.dtype
        g = self.group_size
        if self.axis == "token":
            grouped = (B, H, T, D // g, g)  # scale, zero: (B, H, T, D/g) -> (B, H, T, D/g, 1)
            scale, zero = stored["scale"].to(dtype).unsqueeze(-1), stored["zero"].to(dtype).unsqueeze(-1)
        else:
            grouped = (B, H, T // g, g, D)  # scale, zero: (B, H, T/g, D) -> (B, H, T/g, 1, D)
            scale, zero = stored["scale"].to(dtype).unsqueeze(-2), stored["zero"].to(dtype).unsqueeze(-2)
        codes = unpack(stored["codes"], self.bits).reshape(grouped)  # rows of r tokens are tokens in order
        try:
            target, copy_back = out.view(grouped), False
        except RuntimeError:  # a layout that cannot be regrouped without a copy
            target, copy_back = torch.empty(grouped, dtype=dtype, device=out.device), True
        target.copy_(codes)
        target.mul_(scale).add_(zero)
        if copy_back:
            out.copy_(target.reshape(B, H, T, D))
