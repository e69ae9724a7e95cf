"""Compiles llama_decode.cu for sm_90a at run time and launches it through the CUDA driver API.

nvcc builds a cubin (cached under ~/.cache/tokenmill/kernels by the source's hash, so a process compiles at most
once per source change); the driver loads it (cuModuleLoadData) and the decoder launches it cooperatively
(cuLaunchCooperativeKernel: every block resident at once, which the dependency counters need) on torch's current
stream, so it is captured into CUDA graphs like any other kernel. No torch C++ extension is built: the kernel
needs no torch headers, and a cubin compiles in seconds.

The kernel takes one by-value struct, generated here from PARAM_FIELDS so Python and CUDA agree on its layout:
every field is 8 bytes (pointers, int64, float64).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).with_name("llama_decode.cu")
KERNEL_NAME = "llama_decode_megakernel"
ARCH = "sm_90a"
NUM_THREADS = 288  # 8 consumer warps + 1 producer warp

# (C type, name): pointers as "ptr:<type>", integers "i64", floating point "f64".
PARAM_FIELDS: tuple[tuple[str, str], ...] = (
    ("ptr:const LayerPtrs", "layers"),
    ("ptr:const bf16", "embed"),
    ("ptr:const bf16", "lm_head"),
    ("ptr:const bf16", "final_norm"),
    ("ptr:const float", "cos_tab"),
    ("ptr:const float", "sin_tab"),
    ("ptr:const long long", "input_ids"),
    ("ptr:const long long", "positions"),
    ("ptr:const long long", "slot_mapping"),
    ("ptr:const int", "seq_lens"),
    ("ptr:const int", "block_tables"),
    ("i64", "bt_stride"),
    ("ptr:bf16", "kv_cache"),
    ("i64", "kv_layer_stride"),
    ("i64", "kv_v_offset"),
    ("i64", "block_size"),
    ("ptr:uint32_t", "h"),
    ("ptr:float", "q"),
    ("ptr:bf16", "attn"),
    ("ptr:bf16", "act"),
    ("ptr:float", "part"),
    ("ptr:float", "o_part"),
    ("ptr:float", "ml_part"),
    ("ptr:float", "logits"),
    ("ptr:int", "done"),
    ("ptr:const long long", "epoch"),
    ("i64", "tagged"),
    ("ptr:int", "arrivals"),
    ("ptr:const int", "instrs"),
    ("ptr:const int", "instr_counts"),
    ("i64", "max_instrs"),
    ("i64", "M"),
    ("i64", "hidden"),
    ("i64", "inter"),
    ("i64", "vocab"),
    ("i64", "n_q_heads"),
    ("i64", "n_kv_heads"),
    ("i64", "head_dim"),
    ("i64", "num_layers"),
    ("i64", "attn_splits"),
    ("i64", "min_split_tokens"),
    ("i64", "attn_pair_min_chunks"),
    ("i64", "norm_folded"),
    ("i64", "kseg_o"),
    ("i64", "kseg_down"),
    ("i64", "num_stages"),
    ("i64", "max_inflight"),
    ("i64", "pause_release"),
    ("i64", "attn_tma"),
    ("ptr:const void", "kv_tmap"),
    ("ptr:long long", "trace"),
    ("ptr:long long", "chunk_trace"),
    ("ptr:long long", "phase_trace"),
    ("i64", "max_chunks"),
    ("f64", "eps"),
    ("f64", "scale_log2"),
    # Appended, so that the fields before them keep their offsets in the kernel's parameter space:
    ("i64", "ring_magic"),
    ("i64", "attn_split_magic"),
    ("i64", "attn_item_magic"),
    ("i64", "block_magic"),
    ("i64", "kv_layer_rows"),
    ("i64", "kv_v_rows"),
    ("i64", "attn_whole_splits"),
    ("ptr:int", "claim_counters"),  # ATTN_CLAIM: one per layer, zeroed with the other counters
    ("i64", "claim_item_cost"),  # ATTN_CLAIM: claim_plan's item_cost and merge_cost (tokens)
    ("i64", "claim_merge_cost"),
    ("i64", "kv_head_magic"),  # div_magic(n_kv_heads)
)


@dataclass(frozen=True)
class KVTensorMapShape:
    """The KV cache [layers, 2, blocks, block_size, kv_heads, head_dim] (bf16) as the 3-D tensor TMA copies from:
    dims innermost first (head_dim, kv_heads, every token row of every layer, K and V), strides in bytes of the outer
    two, and the box one copy brings: one KV head's rows of up to 16 tokens of one KV block."""

    dims: tuple[int, int, int]
    strides: tuple[int, int]
    box: tuple[int, int, int]

    @classmethod
    def of(cls, cache_shape: tuple[int, ...]) -> "KVTensorMapShape":
        layers, two, blocks, block_size, kv_heads, head_dim = cache_shape
        rows = layers * two * blocks * block_size
        if rows >= 2**31:
            raise MegakernelUnsupported(f"the KV cache has {rows} token rows; TMA coordinates are 32-bit")
        if min(block_size, 16) * head_dim * 2 % 128:
            # Boxes land at multiples of their size in shared memory, and tensor copies want 128-byte alignment.
            raise MegakernelUnsupported(f"KV blocks of {block_size} tokens of {head_dim}-dim heads are too small "
                                        "for TMA boxes")
        return cls((head_dim, kv_heads, rows), (head_dim * 2, kv_heads * head_dim * 2),
                   (head_dim, 1, min(block_size, 16)))


def encode_kv_tensor_map(libcuda: ctypes.CDLL, kv_cache) -> bytes:
    """The 128-byte CUtensorMap of `kv_cache` (cuTensorMapEncodeTiled: bf16, no interleave or swizzle, L2 promotion
    128 B, no out-of-bounds fill)."""
    shape = KVTensorMapShape.of(tuple(kv_cache.shape))
    storage = (ctypes.c_uint8 * (128 + 64))()  # the map must be 64-byte aligned
    address = (ctypes.addressof(storage) + 63) // 64 * 64
    bf16, interleave_none, swizzle_none, l2_promotion_128b, oob_fill_none = 9, 0, 0, 2, 0
    _check(libcuda, libcuda.cuTensorMapEncodeTiled(
        ctypes.c_void_p(address), ctypes.c_int(bf16), ctypes.c_uint32(3), ctypes.c_void_p(kv_cache.data_ptr()),
        (ctypes.c_uint64 * 3)(*shape.dims), (ctypes.c_uint64 * 2)(*shape.strides),
        (ctypes.c_uint32 * 3)(*shape.box), (ctypes.c_uint32 * 3)(1, 1, 1),
        ctypes.c_int(interleave_none), ctypes.c_int(swizzle_none), ctypes.c_int(l2_promotion_128b),
        ctypes.c_int(oob_fill_none)), "cuTensorMapEncodeTiled")
    return ctypes.string_at(address, 128)


class MegakernelUnsupported(ValueError):
    """The megakernel does not apply to this model or device (the caller falls back)."""


class MegakernelUnavailable(RuntimeError):
    """The megakernel cannot be built or loaded here (no nvcc, no CUDA driver, not a Hopper GPU...)."""


def params_struct_source() -> str:
    lines = ["struct Params {"]
    for kind, name in PARAM_FIELDS:
        if kind.startswith("ptr:"):
            lines.append(f"  {kind[4:]}* {name};")
        else:
            lines.append(f"  {'long long' if kind == 'i64' else 'double'} {name};")
    lines.append("};")
    return "\n".join(lines)


def full_source() -> str:
    """The kernel source as compiled: LayerPtrs and helpers first, then Params, then the kernel."""
    body = SOURCE.read_text()
    marker = "// ---- PTX helpers"
    head, sep, tail = body.partition(marker)
    if not sep:
        raise MegakernelUnavailable(f"{SOURCE.name} lost its '{marker}' marker (Params goes before it)")
    return head + params_struct_source() + "\n\n" + sep + tail


def pack_params(values: dict[str, int | float]) -> ctypes.Array:
    missing = {name for _, name in PARAM_FIELDS} - set(values)
    extra = set(values) - {name for _, name in PARAM_FIELDS}
    if missing or extra:
        raise ValueError(f"params: missing {sorted(missing)}, unknown {sorted(extra)}")
    buf = (ctypes.c_uint64 * len(PARAM_FIELDS))()
    for i, (kind, name) in enumerate(PARAM_FIELDS):
        if kind == "f64":
            buf[i] = ctypes.c_uint64.from_buffer(ctypes.c_double(float(values[name]))).value
        else:
            buf[i] = int(values[name]) & (2**64 - 1)
    return buf


def find_nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def cache_dir() -> Path:
    root = Path(os.environ.get("TOKENMILL_CACHE", Path.home() / ".cache" / "tokenmill"))
    return root / "kernels"


def compile_cubin(head_dim: int = 64, arch: str = ARCH, out_dir: Path | None = None,
                  extra_flags: tuple[str, ...] = ()) -> Path:
    """nvcc -cubin for `arch`, specialised to a model's head_dim (32, 64 or 128); returns the cached cubin's path.
    Raises MegakernelUnavailable without nvcc or when nvcc fails."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise MegakernelUnavailable("nvcc not found (set NVCC or put it on PATH)")
    if head_dim not in (32, 64, 128):
        raise MegakernelUnavailable(f"no attention variant for head_dim {head_dim}")
    source = full_source()
    flags = ("-cubin", f"-arch={arch}", "-O3", "-std=c++17", "-lineinfo", f"-DATTN_HEAD_DIM={head_dim}",
             *extra_flags)
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256((source + " ".join(flags) + version).encode()).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    cubin = out_dir / f"llama_decode_{arch}_d{head_dim}_{key}.cubin"
    if cubin.exists():
        return cubin
    src = out_dir / f"llama_decode_{key}.cu"
    src.write_text(source)
    tmp = cubin.with_suffix(f".{os.getpid()}.tmp")
    proc = subprocess.run([nvcc, *flags, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise MegakernelUnavailable(f"nvcc failed:\n{proc.stderr[-4000:]}")
    tmp.replace(cubin)
    return cubin


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, then a 64-byte value union at offset 8
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem_bytes", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)),
                ("num_attrs", ctypes.c_uint)]


_LAUNCH_ATTRIBUTE_COOPERATIVE = 2
_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION = 4
_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED = 14
PORTABLE_CLUSTER_SIZE = 8


@dataclass
class LoadedKernel:
    function: ctypes.c_void_p
    module: ctypes.c_void_p
    libcuda: ctypes.CDLL

    def _config(self, grid: int, smem_bytes: int, stream: int, cluster: int) -> _LaunchConfig:
        """A cooperative launch (every block resident at once) in thread-block clusters of `cluster` blocks."""
        attrs = (_LaunchAttribute * 2)()
        attrs[0].id = _LAUNCH_ATTRIBUTE_COOPERATIVE
        attrs[0].value[0] = 1
        attrs[1].id = _LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        attrs[1].value[0], attrs[1].value[1], attrs[1].value[2] = cluster, 1, 1
        config = _LaunchConfig((grid, 1, 1), (NUM_THREADS, 1, 1), smem_bytes, stream, attrs, 2)
        config._attrs = attrs  # keeps the array alive with the config
        return config

    def max_cluster_blocks(self, cluster: int, smem_bytes: int) -> int:
        """How many blocks a cooperative launch in clusters of `cluster` blocks can hold (whole clusters that fit
        at once, one block per SM): the GPCs' SM counts need not be multiples of the cluster size."""
        if cluster > PORTABLE_CLUSTER_SIZE:
            _check(self.libcuda, self.libcuda.cuFuncSetAttribute(
                self.function, _FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, ctypes.c_int(1)),
                "cuFuncSetAttribute")
        count = ctypes.c_int()
        config = self._config(cluster, smem_bytes, 0, cluster)
        _check(self.libcuda, self.libcuda.cuOccupancyMaxActiveClusters(
            ctypes.byref(count), self.function, ctypes.byref(config)), "cuOccupancyMaxActiveClusters")
        return count.value * cluster

    def launch(self, grid: int, smem_bytes: int, params: ctypes.Array, stream: int, cluster: int = 1) -> None:
        args = (ctypes.c_void_p * 1)(ctypes.addressof(params))
        if cluster == 1:
            _check(self.libcuda, self.libcuda.cuLaunchCooperativeKernel(
                self.function, ctypes.c_uint(grid), ctypes.c_uint(1), ctypes.c_uint(1),
                ctypes.c_uint(NUM_THREADS), ctypes.c_uint(1), ctypes.c_uint(1),
                ctypes.c_uint(smem_bytes), ctypes.c_void_p(stream), args,
            ), "cuLaunchCooperativeKernel")
            return
        config = self._config(grid, smem_bytes, stream, cluster)
        _check(self.libcuda, self.libcuda.cuLaunchKernelEx(ctypes.byref(config), self.function, args, None),
               "cuLaunchKernelEx")


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        name = ctypes.c_char_p()
        lib.cuGetErrorName(status, ctypes.byref(name))
        raise MegakernelUnavailable(f"{what} failed: {name.value.decode() if name.value else status}")


_LOADED: dict[tuple, LoadedKernel] = {}


def experiment_flags() -> tuple[str, ...]:
    """Preprocessor defines for kernel experiments from TOKENMILL_MEGAKERNEL_NVCC_FLAGS (e.g. "-DFOO -DBAR=2"),
    compiled into the kernel next to the usual flags; MegakernelUnavailable for anything but -D defines."""
    flags = tuple(os.environ.get("TOKENMILL_MEGAKERNEL_NVCC_FLAGS", "").split())
    others = [f for f in flags if not f.startswith("-D") or len(f) == 2]
    if others:
        raise MegakernelUnavailable(f"TOKENMILL_MEGAKERNEL_NVCC_FLAGS takes -DNAME[=VALUE] defines only, got {others}")
    return flags


def load_kernel(device_index: int, head_dim: int, defines: tuple[str, ...] = ()) -> LoadedKernel:
    """Compiles (once per head_dim, `defines` (-DNAME[=VALUE] variants the caller selects) and experiment_flags())
    and loads the kernel into the current CUDA context of `device_index`."""
    flags = (*defines, *experiment_flags())
    key = (device_index, head_dim, flags)
    if key in _LOADED:
        return _LOADED[key]
    import torch

    torch.cuda.init()
    with torch.cuda.device(device_index):
        torch.cuda.current_stream().synchronize()  # makes sure torch's primary context is current
        major, minor = torch.cuda.get_device_capability(device_index)
        if (major, minor) != (9, 0):
            raise MegakernelUnavailable(
                f"the megakernel is built for sm_90a (H100/H200), this GPU is sm_{major}{minor}")
        cubin = compile_cubin(head_dim, extra_flags=flags).read_bytes()
        try:
            lib = ctypes.CDLL("libcuda.so.1")
        except OSError as exc:
            raise MegakernelUnavailable(f"CUDA driver library not found: {exc}") from exc
        module, function = ctypes.c_void_p(), ctypes.c_void_p()
        _check(lib, lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(cubin)), "cuModuleLoadData")
        _check(lib, lib.cuModuleGetFunction(ctypes.byref(function), module, KERNEL_NAME.encode()),
               "cuModuleGetFunction")
        from tokenmill.kernels.megakernel.schedule import SMEM_MAX

        max_dynamic_smem = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
        _check(lib, lib.cuFuncSetAttribute(function, max_dynamic_smem, ctypes.c_int(SMEM_MAX)),
               "cuFuncSetAttribute")
    _LOADED[key] = LoadedKernel(function, module, lib)
    return _LOADED[key]
