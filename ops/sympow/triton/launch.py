"""One launcher for every kernel: jax_triton.triton_call on a GPU; on a CPU the same kernel
in Triton's interpreter inside jax.pure_callback (float32: the interpreter mishandles bf16).

Kernels are plain Python functions written in triton.language, taking their input pointers,
then their output pointers (lowercase, `_ptr`), then keyword scalars: the sequence length
seq_len at run time, so that one compile serves every length (jax-triton specialises it only on
divisibility by 16), and the rest tl.constexpr (uppercase). A `Plan` holds one problem's
launches: each kernel's tiling and grid, and the scalars, of which each kernel gets those it
names. The launcher decorates them: triton.jit for the GPU, the interpreter's
InterpretedFunction for the CPU. Outputs are filled with NaN before an interpreted run, so a
tile the kernel never writes shows."""

import contextlib
import dataclasses
import functools
import inspect
import threading

import jax
import jax.numpy as jnp
import numpy as np
import triton
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction


class HostTensor:
    """Just enough of a torch tensor for Triton's interpreter, over a numpy array in host
    memory. The interpreter would copy device tensors to the host and back; here the memory
    already is the host's, so every copy is the identity."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.dtype = array.dtype

    def data_ptr(self) -> int:
        return self.array.ctypes.data

    def untyped_storage(self):
        return self

    def cpu(self):
        return self

    def new_empty(self, *_, **__):
        return self

    def set_(self, storage, *_):
        return storage

    def copy_(self, other):
        assert other is self, "host tensors are never copied"

    def storage_offset(self) -> int:
        return 0

    def size(self):
        return self.array.shape

    def stride(self):
        return tuple(s // self.array.itemsize for s in self.array.strides)


# Triton reads a kernel's source and globals, so it gets the plain function, never a wrapper
# (a decorator or an import hook such as jaxtyping's would otherwise hide them).
@functools.cache
def compiled(kernel):
    return triton.jit(inspect.unwrap(kernel))


@functools.cache
def interpreted(kernel):
    return InterpretedFunction(inspect.unwrap(kernel))


def call_interpreted(device_function: JITFunction, *args, **kwargs):
    """A device function called from interpreted code, run by the interpreter. Unlike
    InterpretedFunction.__call__ (triton 3.7), this undoes its patches of triton.language,
    which would otherwise break every later compile in the process."""
    scope = _patch_lang(device_function.fn)
    try:
        return interpreted(device_function.fn).rewrite()(*args, **kwargs)
    finally:
        scope.restore()


# The interpreter keeps global state (grid indices, patches of triton.language), and devices
# run their callbacks on threads of their own (two shards of a shard_map, say): one at a time.
INTERPRETER_LOCK = threading.Lock()


@contextlib.contextmanager
def interpreting():
    """Run as if TRITON_INTERPRET=1 had been set before triton was imported: triton's own
    device functions (tl.max, tl.sum, ...) were made as compiled JITFunctions then, and
    refuse to be called from interpreted code unless routed to the interpreter."""
    with INTERPRETER_LOCK:
        saved_call, saved_knob = JITFunction.__call__, triton.knobs.runtime.interpret
        JITFunction.__call__ = call_interpreted
        triton.knobs.runtime.interpret = True
        try:
            yield
        finally:
            JITFunction.__call__, triton.knobs.runtime.interpret = saved_call, saved_knob


@dataclasses.dataclass(frozen=True)
class Tiling:
    """How a kernel is cut and launched: rows of q (BLOCK_M) and of k (BLOCK_N) per tile, warps
    and software-pipeline stages. Each kernel's GPU tiling was chosen among those compiled for
    sm_90 to fit an H100's shared memory and spill (next to) no registers, as tests/test_triton.py
    checks; none is timed on a GPU yet."""

    query_rows: int
    key_rows: int
    num_warps: int = 4
    num_stages: int = 3

    def blocks(self) -> dict:
        return dict(BLOCK_M=self.query_rows, BLOCK_N=self.key_rows)


# The interpreter takes 16-row tiles, so that small test shapes cross many tiles and their masks.
INTERPRETER_TILING = Tiling(16, 16)


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


STAGES = ("states", "outputs")  # the chunked kernels' stages


@dataclasses.dataclass(frozen=True)
class LaunchOptions:
    """Choices about how the kernels launch, where the machine's defaults do not suit (tests, a
    tuning sweep). Hashable: it passes through jax.custom_vjp as a static argument.

    compiled: jax_triton on a GPU (True) or Triton's interpreter (False); None: compiled where
        JAX's default backend is a GPU.
    gpu_tilings: each kernel's GPU tiling (True) or the interpreter's 16-row tiles (False);
        None: the GPU's when compiled.
    tiling_itemsize: choose the GPU tilings as for inputs of this many bytes (2: bf16's, which
        the interpreter cannot run); None: the inputs'.
    overrides: (kernel, Tiling) pairs that replace those kernels' tilings (tools.tune).
    scan_value_columns: value columns per program of the chunked kernels' two scans, each
        sequential over chunks: 32 gives, at dim 64, batch 1 and 8 heads, 640 programs for an
        H100's 132 SMs, with half the registers for the running state that whole columns take.
    kernel_stages: the chunked form's stages that run as kernels, the others in pure JAX (float32,
        in the kernels' tiled layout: ops.sympow.triton.chunked): "states" (what each chunk adds
        and the scan over chunks) and "outputs" (each chunk's outputs); both by default.
    """

    compiled: bool | None = None
    gpu_tilings: bool | None = None
    tiling_itemsize: int | None = None
    overrides: tuple = ()
    scan_value_columns: int = 32
    kernel_stages: tuple[str, ...] = STAGES

    def __post_init__(self):
        if unknown := set(self.kernel_stages) - set(STAGES):
            raise ValueError(f"unknown kernel stages {sorted(unknown)}; the chunked kernels' stages are {STAGES}")

    def runs_compiled(self) -> bool:
        return on_gpu() if self.compiled is None else self.compiled

    def tilings(self, gpu_tilings, dim: int, itemsize: int) -> dict:
        """Each kernel's tiling here, from its family's gpu_tilings(dim, itemsize)."""
        chosen = gpu_tilings(dim, self.tiling_itemsize or itemsize)
        if not (self.runs_compiled() if self.gpu_tilings is None else self.gpu_tilings):
            chosen = dict.fromkeys(chosen, INTERPRETER_TILING)
        return chosen | dict(self.overrides)


def taken_by(kernel, scalars: dict) -> dict:
    """The scalars that kernel names among its parameters: each kernel takes only those it uses."""
    parameters = inspect.signature(inspect.unwrap(kernel)).parameters
    return {name: value for name, value in scalars.items() if name in parameters}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How one problem's kernels launch: where (compiled or interpreted), each kernel's tiling and
    grid, and the scalars the kernels take, of which each gets those it names."""

    compiled: bool
    tilings: dict
    grids: dict
    scalars: dict

    def launch(self, kernel, inputs: list[jax.Array], out_shapes: list[jax.ShapeDtypeStruct]) -> list[jax.Array]:
        tiles = self.tilings[kernel]
        scalars = taken_by(kernel, self.scalars | tiles.blocks())
        return launch(kernel, self.grids[kernel], inputs, out_shapes, tiles, self.compiled, **scalars)


def per_query_head(q, *arrays) -> list[jax.ShapeDtypeStruct]:
    """Shapes of kernel outputs that hold, for each query head of q [batch, seq, heads, dim], a row
    of each array's last axis in its dtype: y of v, and a query head's share of a key/value head's
    gradient (the host sums a group's shares)."""
    return [jax.ShapeDtypeStruct((*q.shape[:3], a.shape[-1]), a.dtype) for a in arrays]


# Triton's hint that an argument is a multiple of 16: bytes for a pointer, units for an int.
DIVISIBLE_BY_16 = [["tt.divisibility", 16]]


def compile_for(kernel, pointer_types: dict[str, str], scalars: dict, tiles: Tiling, capability: int = 90):
    """Compile kernel with this tiling ahead of time for an NVIDIA GPU of the given compute
    capability, specialised as jax-triton would on one: every pointer 16-byte aligned (XLA's
    buffers are), each runtime int (seq_len) a multiple of 16 where its value here is; works
    without a GPU. scalars may name more than the kernel takes."""
    from triton.backends.compiler import GPUTarget

    function = compiled(kernel)
    runtime = {param.name for param in function.params if not param.is_constexpr} - pointer_types.keys()
    scalars = taken_by(kernel, scalars | tiles.blocks())
    signature = {**pointer_types, **{name: "i32" if name in runtime else "constexpr" for name in scalars}}
    hinted = [*pointer_types, *(name for name in runtime if scalars[name] % 16 == 0)]
    source = triton.compiler.ASTSource(
        fn=function,
        signature=signature,
        constexprs={name: value for name, value in scalars.items() if name not in runtime},
        attrs={(function.arg_names.index(name),): DIVISIBLE_BY_16 for name in hinted},
    )
    options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)


def dce_rule_for_jax(rule, jax_passes_live_inputs: bool):
    """A dead-code-elimination rule called as this jax calls them: jax 0.12 passes (used
    outputs, live inputs, equation) where jax 0.11 passed (used outputs, equation), and
    jax-triton 0.4.1 registers a rule of the old two arguments for its kernel call (under jax
    0.12: "takes 2 positional arguments but 3 were given"). A rule of the other convention is
    wrapped; every input is taken as live where an old jax gives no such list."""
    if (len(inspect.signature(rule).parameters) == 3) == jax_passes_live_inputs:
        return rule
    if jax_passes_live_inputs:
        return lambda used_outputs, live_inputs, eqn: rule(used_outputs, eqn)
    return lambda used_outputs, eqn: rule(used_outputs, [True] * len(eqn.invars), eqn)


@functools.cache
def jax_triton():
    """jax_triton, imported on a GPU only (on a CPU it finds no backend to lower to). With
    triton 3.6 (the lent GPU machine's), jax-triton 0.4.1 silently stubs its NVIDIA backend
    unless TMA_TF32 exists before import (docs/gpu.md; not yet seen on a GPU here); its kernel
    call's DCE rule is adapted to this jax (dce_rule_for_jax)."""
    import triton.backends.nvidia.driver as nvidia_driver

    if not hasattr(nvidia_driver, "TMA_TF32"):
        nvidia_driver.TMA_TF32 = 11
    import jax_triton

    rules, kernel_call = jax_triton.triton_lib.pe.dce_rules, jax_triton.triton_lib.triton_kernel_call_p
    rules[kernel_call] = dce_rule_for_jax(rules[kernel_call], jax_passes_live_inputs=jax.__version_info__ >= (0, 12))
    return jax_triton


def launch(
    kernel,
    grid: tuple[int, ...],
    inputs: list[jax.Array],
    out_shapes: list[jax.ShapeDtypeStruct],
    tiles: Tiling,
    compiled_on_gpu: bool,
    **scalars,
) -> list[jax.Array]:
    """Run kernel(*inputs, *outputs, **scalars) over grid with this tiling, through jax_triton on a
    GPU or else in the interpreter; return the outputs."""
    if compiled_on_gpu:
        return list(
            jax_triton().triton_call(
                *inputs,
                kernel=compiled(kernel),
                out_type=out_shapes,
                grid=grid,
                num_warps=tiles.num_warps,
                num_stages=tiles.num_stages,
                **scalars,
            )
        )

    def run_on_host(*arrays):
        outputs = [np.full(s.shape, np.nan, s.dtype) for s in out_shapes]
        arguments = [HostTensor(np.array(a)) for a in arrays] + [HostTensor(o) for o in outputs]
        # log(0) of padded keys is -inf by design; other floating-point errors still show as NaN.
        with interpreting(), np.errstate(divide="ignore"):
            interpreted(kernel)[grid](*arguments, **scalars)
        return outputs

    if any(s.dtype != jnp.float32 for s in out_shapes) or any(a.dtype not in (jnp.float32, jnp.int32) for a in inputs):
        raise TypeError("the Triton interpreter runs float32 only (it mishandles bf16); cast first")
    return list(jax.pure_callback(run_on_host, out_shapes, *inputs))
