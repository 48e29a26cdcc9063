"""A linear layer that runs from AutoAWQ GEMM tensors.

`AWQLinear` keeps the checkpoint's own tensors as buffers (`qweight`, `qzeros`, `scales`,
`bias`), so its state_dict is the exported format. Its forward pass uses PyTorch's int4
matmul where one exists for the device and activation dtype, and dequantises otherwise.

Memory: the int4 matmul needs the codes in its own layout. So that a model holds its 4-bit
weights once, not twice, the layer moves the codes into that layout (at `prepare()`, or the
first forward that can use the kernel) and drops the `qweight` buffer; `layer.qweight` is then
None. `qzeros` and `scales` stay, plus a (scale, offset) table in the activation dtype
(4 bytes per group and output channel, about 1/16 of the codes at group size 128).
Everything that needs `qweight` rebuilds it from the packed codes, exactly:
`state_dict()` (so saving a prepared model materialises each layer's qweight once more;
on a GPU, move the model to the CPU first), `load_state_dict()`, a move to another device
(the packed layout is device-specific), pickling, and the dequantise path.
`unprepare()` restores the plain buffers for good.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import cache

import torch
import torch.nn.functional as F
from torch import nn

from r1v_quant.errors import UserError
from r1v_quant.int4.format import (
    AWQ_DTYPES,
    PACK,
    awq_dequantize,
    awq_shapes,
    check_awq_shape,
    check_awq_tensors,
    dequantize,
    pack_awq,
    unpack_awq,
)
from r1v_quant.int4.kernels import awq_scale_table, awq_to_int4pack, int4_mm, int4unpack

_KERNEL_GROUP_SIZES = (32, 64, 128, 256)
# Introduced in torch 2.6, when the CUDA packer also switched to the byte layout int4pack_cuda writes.
_HAS_INT4_OPS = hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu")
# Codes re-packed into AutoAWQ form at a time when qweight is rebuilt (bounds pack_awq's int64 scratch to 128 MiB).
_REBUILD_CODES = 1 << 24


def _cuda_inner_k_tiles(in_features: int) -> int | None:
    """Largest tile count the CUDA kernel accepts for this K, or None."""
    for tiles in (8, 4, 2):
        if in_features % (tiles * 16) == 0:
            return tiles
    return None


@cache
def _cuda_has_int4_mm(index: int) -> bool:
    """The tensor-core int4 matmul needs NVIDIA sm80 or newer."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 0)


def _version(t: torch.Tensor) -> int:
    """The in-place modification counter of t (-1 for inference tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return -1


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
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = check_awq_shape(out_features, in_features, group_size, name)
        for leaf, (shape, _) in awq_shapes(out_features, in_features, group_size).items():
            self.register_buffer(leaf, torch.empty(shape, dtype=AWQ_DTYPES[leaf], device=device))
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype, device=device) if bias else None)
        # The codes in the int4 kernel's layout, on the buffers' device; while set, the qweight
        # buffer is None (this is the only copy of the codes).
        self._packed: torch.Tensor | None = None
        self._packed_tiles = 0
        # (qzeros, its version, scales, its version, dtype, table): the kernel's scale/offset
        # table, rebuilt when either source is replaced or modified in place.
        self._table: tuple | None = None

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
        in_features, out_features = check_awq_tensors(qweight, qzeros, scales, bias, group_size, name)
        layer = cls.empty(in_features, out_features, group_size, bias is not None)
        layer.qweight, layer.qzeros, layer.scales = qweight, qzeros, scales
        if bias is not None:
            layer.bias = bias
        return layer

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"group_size={self.group_size}, bias={self.bias is not None}"
        )

    # -- the codes, in whichever form the layer holds them --------------------------------

    @property
    def prepared(self) -> bool:
        """True when the codes live only in the int4 kernel's layout (`qweight` is None)."""
        return self._packed is not None and self._buffers["qweight"] is None

    def codes(self) -> torch.Tensor:
        """The 4-bit codes, uint8 [out, in] (nn.Linear layout), on the layer's device."""
        with torch.no_grad(), torch.inference_mode(False):
            if self.prepared:
                return int4unpack(self._packed, self.out_features, self.in_features, self._packed_tiles)
            return unpack_awq(self.qweight).t().contiguous()

    def awq_qweight(self) -> torch.Tensor:
        """The AutoAWQ qweight, int32 [in, out/8]: the buffer, or rebuilt from the packed codes."""
        if not self.prepared:
            return self.qweight
        with torch.no_grad(), torch.inference_mode(False):
            codes_t = self.codes().t()
            qweight = torch.empty(self.in_features, self.out_features // PACK, dtype=torch.int32, device=codes_t.device)
            rows = max(1, _REBUILD_CODES // self.out_features)
            for r in range(0, self.in_features, rows):
                qweight[r: r + rows] = pack_awq(codes_t[r: r + rows])
        return qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The [out, in] weight this layer computes with, in nn.Linear layout."""
        if not self.prepared:
            return awq_dequantize(self.qweight, self.qzeros, self.scales, self.group_size).to(dtype)
        zeros = unpack_awq(self.qzeros).t()
        return dequantize(self.codes(), self.scales.t(), zeros, self.group_size).to(dtype)

    def _kernel_tiles(self, device: torch.device, dtype: torch.dtype) -> int | None:
        """None when no int4 kernel runs for activations of this dtype on this device; else the
        inner_k_tiles to pack with (unused on CPU)."""
        if not _HAS_INT4_OPS or dtype != torch.bfloat16:
            return None
        if self.group_size not in _KERNEL_GROUP_SIZES or device != self.qzeros.device:
            return None
        if device.type == "cpu":
            # Only the bf16 CPU kernel is vectorised on x86; fp16/fp32 run a scalar reference loop.
            return 1 if self.out_features % 16 == 0 else None
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            return _cuda_inner_k_tiles(self.in_features) if _cuda_has_int4_mm(index) else None
        return None

    def _pack(self, tiles: int, dtype: torch.dtype) -> torch.Tensor:
        """The packed codes for this tile count, packing (and dropping qweight) if need be."""
        if self._packed is not None and self._buffers["qweight"] is None and self._packed_tiles == tiles:
            return self._packed
        with torch.no_grad():
            if self._packed is not None and self._buffers["qweight"] is None:
                self._restore_qweight()  # packed for other tiles: go back to the source first
            # A qweight assigned while packed makes the packed codes stale; it wins.
            zeros, scales = self.qzeros, self.scales
            packed, table = awq_to_int4pack(self._buffers["qweight"], zeros, scales, dtype, tiles)
        self._packed, self._packed_tiles = packed, tiles
        self._table = (zeros, _version(zeros), scales, _version(scales), dtype, table)
        self._buffers["qweight"] = None
        return packed

    def _scale_table(self, dtype: torch.dtype) -> torch.Tensor:
        zeros, scales = self.qzeros, self.scales
        hit = self._table
        if (hit is None or hit[0] is not zeros or hit[1] != _version(zeros) or hit[2] is not scales
                or hit[3] != _version(scales) or hit[4] != dtype):
            with torch.no_grad():
                table = awq_scale_table(zeros, scales, dtype)
            hit = (zeros, _version(zeros), scales, _version(scales), dtype, table)
            self._table = hit
        return hit[5]

    def _restore_qweight(self) -> None:
        """Put the AutoAWQ qweight back as a buffer and forget the packed codes."""
        if self.prepared:
            qweight = self.awq_qweight()
            self._buffers["qweight"] = qweight
        self._packed, self._packed_tiles = None, 0

    def prepare(self, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> bool:
        """Move to `device` (if given) and pack for the int4 kernel now rather than at the first
        forward, dropping qweight. Returns whether activations of `dtype` will use the kernel
        (if not, nothing is packed and qweight stays)."""
        if device is not None:
            self.to(device)
        tiles = self._kernel_tiles(self.qzeros.device, dtype)
        if tiles is None or self.qzeros.is_meta:
            return False
        self._pack(tiles, dtype)
        self._scale_table(dtype)
        return True

    def unprepare(self) -> None:
        """Rebuild the qweight buffer and drop the packed codes and table (until the next forward
        that uses the kernel)."""
        self._restore_qweight()
        self._table = None

    # -- forward -------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        tiles = None
        # The int4 ops have no backward; the dequantise path does.
        if x2.shape[0] and not (x2.requires_grad and torch.is_grad_enabled()):
            tiles = self._kernel_tiles(x2.device, x2.dtype)
        if tiles is None:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            y = F.linear(x2, self.dequantized_weight(x.dtype), bias)
        else:
            packed = self._pack(tiles, x2.dtype)
            table = self._scale_table(x2.dtype)
            y = int4_mm(x2.contiguous(), packed, self.group_size, table)
            if self.bias is not None:
                y = y + self.bias.to(y.dtype)
        return y.reshape(*lead, self.out_features)

    # -- module plumbing -----------------------------------------------------------------

    def _apply(self, fn, recurse=True):
        # Model-wide casts (`model.to(torch.bfloat16)`) must not touch the float16 scales:
        # rounding them would change every dequantised weight. Only their device follows.
        scales = self._buffers["scales"]
        target = None
        if scales is not None:
            target = fn(torch.empty(0, dtype=scales.dtype, device=scales.device)).device
            if target != scales.device:
                # The packed layout belongs to its device: unpack before leaving it.
                self._restore_qweight()
                self._table = None
        names = list(self._buffers)
        self._buffers.pop("scales")
        try:
            super()._apply(fn, recurse)
            if scales is not None and target != scales.device:
                scales = torch.empty_like(scales, device=target) if scales.is_meta else scales.to(target)
        finally:
            self._buffers["scales"] = scales
            # Restore registration order so state_dict keys keep the format's order.
            for k in names:
                self._buffers[k] = self._buffers.pop(k)
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if not self.prepared:
            return super()._save_to_state_dict(destination, prefix, keep_vars)
        # Lend the rebuilt qweight to the buffer slot so keys, order and hooks stay as usual.
        self._buffers["qweight"] = self.awq_qweight()
        try:
            super()._save_to_state_dict(destination, prefix, keep_vars)
        finally:
            self._buffers["qweight"] = None

    def _load_from_state_dict(self, *args, **kwargs):
        # Rebuild qweight even if the state dict replaces it: a failed or partial load must
        # leave the layer's own weights intact.
        self._restore_qweight()
        self._table = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        # Pickle (and deepcopy) the portable AutoAWQ form: the packed layout depends on the
        # device and, on CPU, on the instruction set.
        state = dict(self.__dict__)
        if self.prepared:
            buffers = type(self._buffers)(self._buffers)
            buffers["qweight"] = self.awq_qweight()
            state["_buffers"] = buffers
        state["_packed"], state["_packed_tiles"], state["_table"] = None, 0, None
        return state


def prepare_awq(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """`prepare()` every AWQLinear in model, one layer at a time; returns how many will use the int4 kernel."""
    return sum(m.prepare(dtype) for m in model.modules() if isinstance(m, AWQLinear))


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


def replace_linear(root: nn.Module, name: str, build: Callable[[nn.Linear], nn.Module]) -> nn.Module:
    """Put `build(old)` where the nn.Linear submodule `name` of root was; returns the new module."""
    parent, child, old = _linear_to_replace(root, name)
    new = build(old)
    setattr(parent, child, new)
    return new


def swap_to_empty_awq(
    root: nn.Module, names: Iterable[str], group_size: int, device: torch.device | str = "meta"
) -> list[str]:
    """Replace named nn.Linear submodules with storage-less AWQLinear layers of the same shape.

    For loaders that build on the meta device and then `load_state_dict(..., assign=True)`.
    The bias (if any) keeps the replaced linear's dtype.
    """
    def empty(name: str) -> Callable[[nn.Linear], AWQLinear]:
        def build(old: nn.Linear) -> AWQLinear:
            has_bias = old.bias is not None
            return AWQLinear(old.in_features, old.out_features, group_size, has_bias, device=device,
                             bias_dtype=old.bias.dtype if has_bias else torch.bfloat16, name=name)
        return build

    names = list(names)
    for name in names:
        replace_linear(root, name, empty(name))
    return names
