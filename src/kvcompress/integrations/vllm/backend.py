"""The vLLM attention backend that stores K/V as kvcompress codes in packed pages and attends from them.

Pages: each layer's KV tensor is (num_blocks, kv_heads, block_size, slot_bytes) bytes (vLLM's LBHNC),
one `paged.SlotLayout` slot per token and KV head; `customize_spec` publishes slot_bytes, so vLLM's
pool accounting counts the packed size. `do_kv_cache_update` encodes each new token once into its
slot (`slot_mapping`) before `forward`, where every query attends causally to its request's tokens
read from their codes, its own chunk and itself included (`kernels.paged_attention`): prefill,
chunked prefill, recomputation, prefix-cache hits and decode alike, so a token's output does not
depend on how vLLM scheduled it. On CPU every step runs the compiled paged kernel (`cpu_paged`, built
at start-up); on CUDA with Triton, the Triton store and attention (`triton_paged`); elsewhere, or where
neither applies, every step runs the torch path: never a mix.
Decoder-only full attention without ALiBi, soft-capping, sinks or sliding windows; kv_cache_dtype "auto".
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from vllm.config import get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from ...kernels import cpu, cpu_paged, triton_paged
from ...kernels import mode as kernels_mode
from ...kernels.backend import load_triton, triton_installed
from ...kernels.paged_attention import check_lengths, paged_attention
from ...paged import PagedLayout, SlotLayout
from .config import ENV, PREFIX, ServingSpecError, configured_text, serving_layout, serving_slot_bytes

logger = logging.getLogger("vllm.kvcompress")


def _num_layers() -> int:
    """Decoder layers of the model vLLM is building (its current config)."""
    return get_current_vllm_config().model_config.get_total_num_hidden_layers()


@functools.lru_cache(maxsize=4)
def _announce(layout: PagedLayout, full_bytes: int) -> None:
    """Log once per layout what a slot holds and, for a per-layer spec, what the widest layer costs."""
    logger.info("kvcompress: %s=%s stores %d bytes per token and KV head (K and V) in every layer, "
                "%.2fx fewer than the model dtype's %d", ENV, configured_text(), layout.slot_bytes,
                full_bytes / layout.slot_bytes, full_bytes)
    if layout.narrowest_bytes < layout.slot_bytes:
        logger.warning("kvcompress: the per-layer spec gives every layer the widest layer's %d-byte slot (vLLM sizes "
                       "one page for all layers); its narrowest layers need only %d", layout.slot_bytes,
                       layout.narrowest_bytes)


@functools.lru_cache(maxsize=1)
def use_triton_kernels() -> bool:
    """Whether this engine's layers store and attend through the Triton paged kernels (`triton_paged`): on
    CUDA when Triton imports (KVCOMPRESS_KERNELS=torch or cpu says no; =triton also asks for them on the CPU
    platform under TRITON_INTERPRET=1, Triton's interpreter: checks only). Decided once per process and logged."""
    chosen = kernels_mode()
    on_cuda = current_platform.is_cuda()
    if chosen in ("torch", "cpu") or (chosen == "auto" and not on_cuda):
        return False
    if chosen == "auto" and not triton_installed():
        logger.warning("kvcompress: attention runs the slower torch paged path: Triton is not importable "
                       "(pip install 'kvcompress[gpu]')")
        return False
    load_triton()  # KVCOMPRESS_KERNELS=triton without Triton: the error names the extra
    if not on_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ServingSpecError(f"{PREFIX}: KVCOMPRESS_KERNELS=triton off CUDA needs TRITON_INTERPRET=1 (Triton's "
                               "interpreter, for checks); unset KVCOMPRESS_KERNELS")
    logger.info("kvcompress: store and attention run the Triton paged kernels for every step")
    return True


@functools.lru_cache(maxsize=4)
def _triton_declines(head_size: int) -> None:
    """Log once that the Triton kernels do not serve this head size (the torch path serves every layer)."""
    logger.warning("kvcompress: attention runs the torch paged path: the Triton kernels need a power-of-two "
                   "head_dim of at most %d (this model's is %d)", triton_paged.MAX_DIM, head_size)


@functools.lru_cache(maxsize=1)
def use_cpu_kernel() -> bool:
    """Whether this engine's layers attend through the compiled CPU paged kernel: on the CPU platform
    when the extension loads (built here, at start-up, the first time; KVCOMPRESS_KERNELS=torch says no).
    Decided once per process and logged: the kernel and the torch path round differently, and a token
    must compute the same in whatever step it comes."""
    if not current_platform.is_cpu():
        logger.info("kvcompress: attention runs the torch paged path (the compiled paged kernel is CPU-only)")
        return False
    if cpu.load() is None:
        logger.warning("kvcompress: attention runs the slower torch paged path: the CPU paged kernel is not "
                       "available (%s)", cpu.unavailable_reason())
        return False
    logger.info("kvcompress: attention runs the compiled CPU paged kernel for every step")
    return True


class KvcompressAttentionBackend(AttentionBackend):
    """Paged attention over kvcompress codes (see the module docstring)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        """The registry entry it takes (vLLM looks the name up there): CPU_ATTN on CPU, CUSTOM elsewhere."""
        return "CPU_ATTN" if current_platform.is_cpu() else "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(16)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)  # a page is [kv_heads][block_size][slot_bytes]

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """The spec with `state_content_bytes` = the packed slot size (bytes per token and KV head, K and V)."""
        if spec.head_size_v != spec.head_size:
            raise ServingSpecError(f"{PREFIX}: keys and values of different head sizes ({spec.head_size}, "
                                   f"{spec.head_size_v}) are not served; unset {ENV}")
        return replace(spec, state_content_bytes=serving_slot_bytes(spec.head_size, spec.dtype))

    @staticmethod
    def get_impl_cls() -> type[KvcompressAttentionImpl]:
        return KvcompressAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[KvcompressMetadataBuilder]:
        return KvcompressMetadataBuilder


@dataclass
class KvcompressMetadata:
    """What one forward step tells every layer (R requests, N scheduled tokens).

    Built once per step (lengths checked, int32 and contiguous as the CPU kernel reads them), so a layer's
    forward is one kernel call.

    Attributes:
        num_actual_tokens: N (query/key/value may carry padding rows after them).
        query_start_loc: (R + 1,) int32 on CPU; request r's tokens are rows [qsl[r], qsl[r + 1]).
        seq_lens: (R,) int32 on CPU: tokens of request r stored once this step's are written (all read from codes).
        block_table: (R, max_blocks) int32: request r's token t is in block block_table[r, t // block_size].
        slot_mapping: (N,) int64: the slot of each scheduled token (-1: padding).
    """

    num_actual_tokens: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class KvcompressMetadataBuilder(AttentionMetadataBuilder[KvcompressMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> KvcompressMetadata:
        cam = common_attn_metadata
        query_start_loc = cam.query_start_loc_cpu.to(torch.int32).contiguous()
        seq_lens = cam.seq_lens.cpu().to(torch.int32).contiguous()
        check_lengths(seq_lens, query_start_loc)  # once per step, not per layer
        block_table = cam.block_table_tensor
        if block_table.device.type == "cpu":
            block_table = block_table.to(torch.int32).contiguous()
        return KvcompressMetadata(num_actual_tokens=cam.num_actual_tokens, query_start_loc=query_start_loc,
                                  seq_lens=seq_lens, block_table=block_table, slot_mapping=cam.slot_mapping)


class KvcompressAttentionImpl(AttentionImpl[KvcompressMetadata]):
    """One layer: writes new tokens' codes into their slots, then attends from the codes of every token."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 sinks: torch.Tensor | None = None, **extra) -> None:
        unsupported = [what for what, present in (
            ("ALiBi", alibi_slopes is not None), ("sliding-window attention", sliding_window is not None),
            ("logit soft-capping", bool(logits_soft_cap)), ("attention sinks", sinks is not None),
            (f"{attn_type} attention", attn_type != AttentionType.DECODER),
            (f"kv_cache_dtype {kv_cache_dtype!r}", kv_cache_dtype != "auto"),
            ("KV sharing between layers", kv_sharing_target_layer_name is not None),
            (f"options {sorted(extra)}", bool(extra))) if present]
        if unsupported:
            raise ServingSpecError(f"{PREFIX}: this model needs {', '.join(unsupported)}, which the kvcompress backend "
                                   f"does not serve; unset {ENV} (and leave kv_cache_dtype at 'auto')")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = None
        dtype = get_current_vllm_config().model_config.dtype
        self.model_layout = serving_layout(_num_layers(), head_size, dtype)
        _announce(self.model_layout, 2 * head_size * dtype.itemsize)
        self._slot_layout: SlotLayout | None = None
        self._writer = None  # the compiled encoder of this layer's slots (cpu_paged.slot_writer), when use_kernel
        self._attend = None  # the compiled kernel bound to this layer's slots (cpu_paged.layer_attention)
        # one path for every layer and step (see use_cpu_kernel): the kernel needs every layer's slots readable
        layers = self.model_layout.layers
        self.use_triton = use_triton_kernels() and all(triton_paged.supports_layout(x) for x in layers)
        if use_triton_kernels() and not self.use_triton:
            _triton_declines(head_size)
        self.use_kernel = (not use_triton_kernels() and use_cpu_kernel()
                           and all(cpu_paged.supports_layout(x) for x in layers))

    def slot_layout(self, layer: torch.nn.Module) -> SlotLayout:
        """This layer's slot layout (its index read from vLLM's layer name on the first call)."""
        if self._slot_layout is None:
            self._slot_layout = self.model_layout.layers[extract_layer_index(layer.layer_name)]
            if self.use_kernel:
                self._writer = cpu_paged.slot_writer(self._slot_layout)
                self._attend = cpu_paged.layer_attention(self._slot_layout)
        return self._slot_layout

    def do_kv_cache_update(self, layer: torch.nn.Module, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Encode the scheduled tokens' keys and values (N, Hkv, D) into their slots, once."""
        if kv_cache.numel() == 0:
            return
        pages = kv_cache.view(torch.uint8)
        layout = self.slot_layout(layer)
        if pages.shape[-1] != layout.slot_bytes:
            raise RuntimeError(f"{PREFIX}: vLLM's page slot holds {pages.shape[-1]} bytes, the layout {layout.slot_bytes}")
        n = slot_mapping.shape[0]
        if self.use_triton:
            triton_paged.write(pages, key[:n], value[:n], slot_mapping, layout)
        elif self._writer is None or not self._writer(pages, key[:n], value[:n], slot_mapping):
            layout.write(pages, key[:n], value[:n], slot_mapping)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: KvcompressMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None
                ) -> torch.Tensor:
        """output (T, Hq, D) = causal attention over the codes of the request's tokens, each query's own included."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{PREFIX}: fused output quantization is not supported")
        if attn_metadata is None:  # a profiling run: nothing is stored
            return output
        md = attn_metadata
        n = md.num_actual_tokens
        layout, pages = self.slot_layout(layer), kv_cache.view(torch.uint8)
        # self.use_kernel is the same for every layer and step: a token decoded on one path and recomputed
        # in a prefill chunk on the other would not compute the same bits
        result = None
        if self.use_triton:
            result = triton_paged.attend(query[:n], pages, md.block_table, md.seq_lens, md.query_start_loc, layout,
                                         self.scale)
        elif self._attend is not None:  # lengths were checked once for the step (the metadata builder)
            result = self._attend(query[:n], pages, md.block_table, md.seq_lens, md.query_start_loc, self.scale)
        if result is None:
            result = paged_attention(query[:n], pages, md.block_table, md.seq_lens, md.query_start_loc, layout,
                                     self.scale, use_kernel=self.use_kernel)
        out, _ = result
        output[:n].copy_(out)
        return output
