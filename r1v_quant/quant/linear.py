"""A linear layer that runs from AutoAWQ GEMM tensors.

`AWQLinear` keeps the checkpoint's own tensors as buffers (`qweight`, `qzeros`, `scales`,
`bias`), so its state_dict is the exported format. Its forward pass uses PyTorch's int4
matmul where one exists for the device and activation dtype, and dequantises otherwise.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.errors import UserError
from r1v_quant.quant.primitives import PACK, awq_dequantize, awq_tensors, awq_to_int4pack, check_awq_shape

_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# Introduced in torch 2.6, when the CUDA packer also switched to the byte layout int4pack_cuda writes.
_HAS_INT4_OPS = hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")


def _cuda_inner_k_tiles(in_features: int) -> int | None:
    """Largest tile count the CUDA kernel accepts for this K, or None."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


class AWQLinear(nn.Module):
    """y = x W^T + b with W stored as AutoAWQ GEMM tensors (4-bit, asymmetric, grouped)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = True,
        *,
        device: torch.device | str | None = None,
        bias_dtype: torch.dtype = torch.bfloat16,
        name: str = "",
    ) -> None:
        super().__init__()
        check_awq_shape(out_features, in_features, group_size, name)
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(in_features, out_features // PACK, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.empty(groups, out_features // PACK, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        # Turned off to force the dequantise path (tests compare the two).
        self.use_int4_kernel = True
        # (device, dtype) -> (qweight, packed weight, scale/offset table); the qweight
        # reference detects buffers replaced by assignment.
        self._int4_cache: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def empty(
        cls,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = True,
        device: torch.device | str = "meta",
        bias_dtype: torch.dtype = torch.bfloat16,
    ) -> AWQLinear:
        """A layer without storage, to be filled by `load_state_dict(..., assign=True)`."""
        return cls(in_features, out_features, group_size, bias, device=device, bias_dtype=bias_dtype)

    @classmethod
    def from_tensors(
        cls,
        qweight: torch.Tensor,
        qzeros: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
        name: str = "",
    ) -> AWQLinear:
        """Wrap existing AutoAWQ tensors (not copied), checking their shapes and dtypes."""
        where = f"layer {name}: " if name else ""
        if qweight.dim() != 2:
            raise UserError(f"{where}qweight must be 2-D [in, out/8], got shape {tuple(qweight.shape)}.")
        in_features, out_features = qweight.shape[0], qweight.shape[1] * PACK
        check_awq_shape(out_features, in_features, group_size, name)
        groups = in_features // group_size
        expected = {
            "qweight": (qweight, (in_features, out_features // PACK), torch.int32),
            "qzeros": (qzeros, (groups, out_features // PACK), torch.int32),
            "scales": (scales, (groups, out_features), torch.float16),
        }
        for key, (t, shape, dtype) in expected.items():
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise UserError(
                    f"{where}{key} is {t.dtype} {tuple(t.shape)} but group size {group_size} needs {dtype} {shape}."
                )
        if bias is not None and tuple(bias.shape) != (out_features,):
            raise UserError(f"{where}bias has shape {tuple(bias.shape)}, expected ({out_features},).")
        layer = cls.empty(in_features, out_features, group_size, bias is not None)
        layer.qweight, layer.qzeros, layer.scales = qweight, qzeros, scales
        if bias is not None:
            layer.bias = bias
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int, name: str = "") -> AWQLinear:
        """Round-to-nearest quantisation of a float linear (no activation-aware scaling)."""
        check_awq_shape(linear.out_features, linear.in_features, group_size, name)
        t = awq_tensors(linear.weight.detach(), group_size)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls.from_tensors(t["qweight"], t["qzeros"], t["scales"], bias, group_size, name)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight this layer computes with, in nn.Linear layout."""
        return awq_dequantize(self.qweight, self.qzeros, self.scales, self.group_size).to(dtype)

    def _kernel_tiles(self, x: torch.Tensor) -> int | None:
        """None when no int4 kernel fits this input; else the inner_k_tiles to pack with (unused on CPU)."""
        if not (self.use_int4_kernel and _HAS_INT4_OPS) or x.dtype != torch.bfloat16:
            return None
        if self.group_size not in _KERNEL_GROUP_SIZES or x.shape[0] == 0:
            return None
        if x.requires_grad and torch.is_grad_enabled():
            return None  # the int4 ops have no backward; the dequantise path does
        if x.device.type == "cpu":
            # Only the bf16 CPU kernel is vectorised on x86; fp16/fp32 run a scalar reference loop.
            return 1 if self.out_features % 16 == 0 else None
        if x.device.type == "cuda" and torch.version.hip is None:
            if torch.cuda.get_device_capability(x.device) < (8, 0):
                return None
            return _cuda_inner_k_tiles(self.in_features)
        return None

    def _packed(self, x: torch.Tensor, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (x.device, x.dtype)
        hit = self._int4_cache.get(key)
        if hit is None or hit[0] is not self.qweight:
            with torch.no_grad():
                packed, table = awq_to_int4pack(self.qweight, self.qzeros, self.scales, x.dtype, tiles)
            hit = (self.qweight, packed, table)
            self._int4_cache[key] = hit
        return hit[1], hit[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        tiles = self._kernel_tiles(x2)
        if tiles is None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x2, self.dequantized_weight(x.dtype), bias)
        else:
            packed, table = self._packed(x2, tiles)
            mm = torch.ops.aten._weight_int4pack_mm_for_cpu if x2.device.type == "cpu" else torch.ops.aten._weight_int4pack_mm
            y = mm(x2.contiguous(), packed, self.group_size, table)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    def _apply(self, fn, recurse=True):
        # Model-wide casts (`model.to(torch.bfloat16)`) must not touch the float16 scales:
        # rounding them would change every dequantised weight. Only their device follows.
        self._int4_cache.clear()
        names = list(self._buffers)
        scales = self._buffers.pop("scales")
        try:
            super()._apply(fn, recurse)
        finally:
            if scales is not None:
                target = fn(torch.empty(0, dtype=scales.dtype, device=scales.device)).device
                if target != scales.device:
                    scales = torch.empty_like(scales, device=target) if scales.is_meta else scales.to(target)
            self._buffers["scales"] = scales
            # Restore registration order so state_dict keys keep the format's order.
            for k in names:
                self._buffers[k] = self._buffers.pop(k)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        self._int4_cache.clear()
        super()._load_from_state_dict(*args, **kwargs)


def awq_module_names(state_dict_keys: Iterable[str]) -> list[str]:
    """Names of the modules that have a `<name>.qweight` tensor, in key order."""
    suffix = ".qweight"
    return [k[: -len(suffix)] for k in state_dict_keys if k.endswith(suffix)]


def _linear_to_replace(root: nn.Module, name: str) -> tuple[nn.Module, str, nn.Linear]:
    parent_name, _, child = name.rpartition(".")
    try:
        parent = root.get_submodule(parent_name)
        old = getattr(parent, child)
    except AttributeError:
        raise UserError(f"the model has no module named {name}.") from None
    if not isinstance(old, nn.Linear):
        raise UserError(f"module {name} is a {type(old).__name__}, not a Linear, and cannot hold AWQ weights.")
    return parent, child, old


def swap_to_awq(root: nn.Module, tensors: Mapping[str, Mapping[str, torch.Tensor]], group_size: int) -> list[str]:
    """Replace named nn.Linear submodules with AWQLinear layers built from AutoAWQ tensors.

    tensors: module name (relative to root) -> {"qweight", "qzeros", "scales", optional "bias"}.
    Returns the swapped names.
    """
    for name, t in tensors.items():
        parent, child, old = _linear_to_replace(root, name)
        new = AWQLinear.from_tensors(t["qweight"], t["qzeros"], t["scales"], t.get("bias"), group_size, name)
        if (new.in_features, new.out_features) != (old.in_features, old.out_features):
            raise UserError(
                f"layer {name}: AWQ tensors are {new.in_features}->{new.out_features} "
                f"but the model's linear is {old.in_features}->{old.out_features}."
            )
        setattr(parent, child, new)
    return list(tensors)


def swap_to_empty_awq(
    root: nn.Module, names: Iterable[str], group_size: int, device: torch.device | str = "meta"
) -> list[str]:
    """Replace named nn.Linear submodules with storage-less AWQLinear layers of the same shape.

    For loaders that build on the meta device and then `load_state_dict(..., assign=True)`.
    The bias (if any) keeps the replaced linear's dtype.
    """
    swapped = []
    for name in names:
        parent, child, old = _linear_to_replace(root, name)
        has_bias = old.bias is not None
        layer = AWQLinear(
            old.in_features, old.out_features, group_size, has_bias, device=device,
            bias_dtype=old.bias.dtype if has_bias else torch.bfloat16, name=name,
        )
        setattr(parent, child, layer)
        swapped.append(name)
    return swapped
