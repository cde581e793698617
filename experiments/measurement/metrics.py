"""Cost metrics of a model and of one training step: FLOPs, memory, time, parameter counts.

Every number a run reports about cost comes from exactly one function here. A ``step_fn`` is a
zero-argument callable that runs one full training step (forward, backward, optimizer step).
"""

from __future__ import annotations

import contextlib
import logging
import math
import statistics
import time
import warnings
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map
from torch.utils.flop_counter import FlopCounterMode

import wasi
from experiments.builders.inputs import Inputs, logits, sample_name, size, take
from experiments.builders.variant import Variant, train_step
from wasi import factored_layers

_logger = logging.getLogger(__name__)

__all__ = [
    "measure",
    "inference_flops",
    "train_step_flops",
    "activation_bytes",
    "weight_bytes",
    "peak_bytes",
    "median_time",
    "count_parameters",
]


def measure(variant: Variant, x: Inputs, y: torch.Tensor, *, grad_clip: float | None,
            amp: contextlib.AbstractContextManager, device: torch.device, repeats: int = 5) -> dict:
    """Every cost metric of one training step on the batch x (images (B, 3, S, S), or token ids and masks (B, L)),
    y: (B,), and of inference on one sample of it (`flops/inference_per_image`, or `..._per_sequence` for text).

    Whole step: flops/train_step, memory/activation_bytes, weight_bytes, peak_bytes. Over the fine-tuned layers
    (`variant.tuned`, the paper's count; `tuned_layers`): flops/layers_train_step, flops/layers_inference and, for a
    model with converted layers, their activation and weight memory next to the same layers' dense ones
    (`compressed_layers_bytes`). One untimed step first, so optimizer state exists as in any later step. This takes
    optimizer steps: measure after training (or on a throwaway variant). `repeats=0` leaves out time/*.
    """
    model, optimizer = variant.model, variant.optimizer
    step = lambda: train_step(model, optimizer, x, y, grad_clip, amp)  # noqa: E731
    step()

    def forward() -> torch.Tensor:
        with amp:
            return F.cross_entropy(logits(model, x), y)

    deployed = variant.method.inference_model(model)
    per = sample_name(x)
    infer_flops = inference_flops_by_module(deployed, take(x, 1), device)
    out = {
        f"flops/inference_per_{per}": infer_flops[""],
        "flops/train_step": train_step_flops(step),
        "memory/activation_bytes": activation_bytes(forward, model),
        "memory/weight_bytes": weight_bytes(model, optimizer),
        "memory/peak_bytes": peak_bytes(step, device, model, optimizer),
        "flops/layers_inference": tuned_layers(infer_flops, deployed, variant.tuned),
        **tuned_layer_bytes(model, variant.tuned, forward),
        **compressed_layers_bytes(model),
        "flops/layers_train_step": tuned_layers_train_flops(model, variant.tuned, forward),  # last: it leaves .grads
    }
    if repeats:
        out["time/train_step_s"] = median_time(step, repeats=repeats, device=device)
        deployed.eval()
        with torch.no_grad(), amp:
            per_batch = median_time(lambda: logits(deployed, x), repeats=repeats, device=device)
            out[f"time/inference_per_{per}_s"] = per_batch / size(x)
        model.train()
    return out


def tuned_layers(by_module: dict[str, int], model: nn.Module, names: Sequence[str]) -> int:
    """The part of a per-module count (`by_module`: qualified module name -> FLOPs of its calls, children included;
    "" the whole model) that the layers `names` did: for each, its own count, else that of the nearest enclosing
    module that counted any (a fused MLP runs its linears as one function: wasi.mlp), each module once. The modules
    summed are disjoint: a linear has a count of its own exactly when it ran as a module."""
    chosen: set[str] = set()
    for name in names:
        parts = name.split(".")
        while parts and not by_module.get(".".join(parts)):
            parts.pop()
        if parts:
            chosen.add(".".join(parts))
    return sum(by_module[n] for n in chosen if not any(n.startswith(o + ".") for o in chosen))


def tuned_layers_train_flops(model: nn.Module, names: Sequence[str], forward: Callable[[], Any]) -> int:
    """FLOPs of the fine-tuned layers' own training work, the paper's per-layer count: each layer's forward and
    backward (its weight gradient, compressed for ASI/WASI, and its input gradient when its input needs one) on the
    input it receives in a training forward (`forward`). A layer that does not run as a module of its own (the
    linears of a fused MLP, wasi.mlp) is counted through the nearest module of its block that ran (the MLP, once).

    Each such module is rerun alone on a copy of its first call's inputs (requires_grad as in the step) and
    backpropagated from a ones gradient under ``FlopCounterMode`` (which attributes a whole backward reliably, not
    a module's share of one). Not counted: the optimizer's update of those layers, and a block's recomputation.
    It leaves gradients in ``.grad``: call it last, or clear them."""
    if not names:
        return 0
    blocks = wasi.find_blocks(model)
    modules = dict(model.named_modules())
    inside = {}
    for name in names:  # the layer and its ancestors within its block: where its work may be counted
        block = next((b for b in blocks if name.startswith(b + ".")), None)
        parts = name.split(".")
        chain = []
        while parts and (block is None or len(".".join(parts)) > len(block)):
            chain.append(".".join(parts))
            parts.pop()
        inside[name] = chain if block is not None else chain[:1]
    calls: dict[str, tuple[tuple, dict]] = {}

    def capture(name: str) -> Callable[..., None]:
        def keep(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in calls:
                calls[name] = tree_map(_detached_copy, (args, kwargs))
        return keep

    watched = {n for chain in inside.values() for n in chain}
    handles = [modules[n].register_forward_pre_hook(capture(n), with_kwargs=True) for n in watched]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    units = {next(n for n in chain if n in calls) for chain in inside.values() if any(n in calls for n in chain)}
    units = {u for u in units if not any(u.startswith(o + ".") for o in units)}
    total = 0
    for unit in sorted(units):
        args, kwargs = calls[unit]
        counter = flop_counter()
        with counter:
            out = modules[unit](*args, **kwargs)
            if not isinstance(out, torch.Tensor):
                out = next(t for t in tree_leaves(out) if isinstance(t, torch.Tensor))
            if out.requires_grad:
                out.backward(torch.ones_like(out))
        total += int(counter.get_total_flops())
    return total


def _detached_copy(value: Any) -> Any:
    """A tensor's copy outside the graph, requiring grad as the tensor did; anything else as it is."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad and value.is_floating_point())
    return value


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: ``q kᵀ`` plus ``attn v``.

    q: (..., N, D), k: (..., M, D), v: (..., M, Dv) -> ``prod(...)·N·M·(D + Dv)`` MACs.
    """
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    return math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


class _KeywordForward(nn.Module):
    """`model(**dict(zip(keys, tensors)))`'s logits as a module of positional tensors, which a tracer takes."""

    def __init__(self, model: nn.Module, keys: Sequence[str]) -> None:
        super().__init__()
        self.model, self.keys = model, list(keys)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return logits(self.model, dict(zip(self.keys, tensors)))


def inference_flops(model: nn.Module, inputs: int | Inputs, device: str | torch.device = "cpu") -> int:
    """FLOPs of one eval-mode forward pass on one image ``(1, 3, image_size, image_size)`` (``inputs`` an int, the
    image size) or on the given inputs (a batch of images, or of token ids and masks, e.g. one sample of a batch).

    Counted with fvcore's ``FlopCountAnalysis``, which counts one fused multiply-add as one
    flop (a linear ``(*, I) -> (*, O)`` is ``prod(*)·O·I``, bias not counted). We report
    ``FLOPs = 2 × fvcore's count`` so the unit matches ``torch.utils.flop_counter`` (a
    multiply-add is two FLOPs). Beyond fvcore's defaults, ``aten::scaled_dot_product_attention``
    is counted as its two matmuls (timm's and transformers' fused attention would otherwise be skipped).
    Elementwise ops are not counted; operators fvcore skips are listed at debug level.
    The model's train/eval mode is restored afterwards.
    """
    return inference_flops_by_module(model, inputs, device)[""]


def inference_flops_by_module(model: nn.Module, inputs: int | Inputs, device: str | torch.device = "cpu"
                              ) -> dict[str, int]:
    """`inference_flops` of the whole model ("") and of each of its modules (qualified name, children included)."""
    with warnings.catch_warnings():  # fvcore.nn's import scripts a loss with deprecated torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    if isinstance(inputs, int):
        inputs = torch.zeros(1, 3, inputs, inputs, device=device, dtype=dtype)
    traced, args, prefix = ((_KeywordForward(model, list(inputs)), tuple(inputs.values()), "model.")
                            if isinstance(inputs, Mapping) else (model, (inputs,), ""))
    try:
        model.eval()
        analysis = FlopCountAnalysis(traced, args)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            macs = analysis.by_module()
        skipped = analysis.unsupported_ops()
        if skipped:
            _logger.debug("fvcore skipped operators (not counted): %s", dict(skipped))
    finally:
        model.train(was_training)
    out = {name.removeprefix(prefix): 2 * int(count) for name, count in macs.items() if name.startswith(prefix)}
    out[""] = 2 * int(macs[""])
    return out


def _addmm_inplace_flops(self_shape: Any, a_shape: Any, b_shape: Any, out_shape: Any = None, **kwargs: Any) -> int:
    (m, k), n = a_shape, b_shape[1]
    return 2 * m * n * k


def _onednn_linear_flops(x_shape: Any, w_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * math.prod(x_shape) * w_shape[0]


def flop_counter() -> FlopCounterMode:
    """``torch.utils.flop_counter.FlopCounterMode`` that also counts the in-place ``addmm_`` (which it leaves out:
    torch 2.x registers only ``addmm``), as the factored optimizer step computes ``R' += L'ᵀG Pᵀ`` in place, and
    oneDNN's ``mkldnn._linear_pointwise`` (x: (…, n) times a weight (m, n)), which the low-rank layers' factor
    products use on the CPU (`wasi.functional.factor_product`)."""
    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: _addmm_inplace_flops,
                                                          torch.ops.mkldnn._linear_pointwise: _onednn_linear_flops})


def train_step_flops(step_fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step_fn`` (forward + backward + optimizer step).

    Counted by ``flop_counter()``: matmuls (``mm``, ``addmm``, ``addmm_``,
    ``bmm``, ``baddbmm``, oneDNN's linear), convolutions and attention kernels, forward and backward, with a
    multiply-add as two FLOPs. It does not count elementwise ops (activations, norms, softmax,
    the optimizer's updates), reductions, or decompositions such as QR/SVD/eigh, so the
    subspace iterations of WSI/ASI contribute only their matmuls.
    """
    counter = flop_counter()
    with counter:
        step_fn()
    return int(counter.get_total_flops())


def _model_state_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Parameters (trainable or frozen) and buffers of ``model``."""
    return [*model.parameters(), *model.buffers()]


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _unique_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Sum of ``untyped_storage().nbytes()`` over tensors, each storage counted once."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def held_activations(forward: Callable[[], Any], model: nn.Module) -> dict[str, int]:
    """Bytes a training forward leaves alive for backward, by the module and op that created them.

    `forward` runs the model and the loss with grad enabled and returns the loss. Every storage an op
    creates while it runs (seen through a ``TorchDispatchMode``) and still alive when it returns is held
    for backward, whatever holds it: autograd nodes (saved tensors), activation checkpointing (block
    inputs), layer caches (Tucker warm-start factors, themselves saved). Each storage counts once at its
    full ``nbytes``. Not counted: the returned loss, tensors that existed before (the input batch,
    parameters, buffers) and storages of the model's parameters and buffers. The graph is freed on return.
    Keys: ``"<module> (<type>) / <op>"``, the innermost module running when the storage was created, named
    within its transformer block (``wasi.find_blocks``: timm ``blocks.<i>.``, Swin ``layers.<s>.blocks.<i>.``,
    Llama ``model.layers.<i>.`` dropped, so all blocks add up; ``block`` for the block itself, ``(outside the
    model)`` for the loss) and the aten op that created it.
    """
    blocks = wasi.find_blocks(model)

    def within(name: str) -> str:
        block = next((b for b in blocks if name == b or name.startswith(b + ".")), None)
        return (name[len(block) + 1:] or "block") if block is not None else (name or "model")

    names = {m: within(n) for n, m in model.named_modules()}
    stack: list[nn.Module] = []

    def label(func: Any) -> str:
        where = f"{names[stack[-1]]} ({type(stack[-1]).__name__})" if stack else "(outside the model)"
        return f"{where} / {func.overloadpacket.__name__}"

    def enter(module: nn.Module, args: Any) -> None:
        stack.append(module)

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        stack.pop()

    hooks = [h for m in model.modules() for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]
    tracker = _LiveStorageTracker([], label)
    try:
        with tracker:
            out = forward()
    finally:
        tracker.detach()
        for h in hooks:
            h.remove()
    excluded = {_storage_key(t) for t in [*_model_state_tensors(model), out]}
    held: dict[str, int] = defaultdict(int)
    for key, nbytes in tracker.live.items():
        if key not in excluded:
            held[tracker.labels[key]] += nbytes
    return dict(held)


def activation_bytes(forward: Callable[[], Any], model: nn.Module) -> int:
    """Bytes held from the forward into the backward of a training step: the sum of `held_activations`."""
    return sum(held_activations(forward, model).values())


def _factored_grads(model: nn.Module) -> list[torch.Tensor]:
    """``(G, P)`` factors of ``∇W = G Pᵀ`` held by WSI/WASI layers after backward."""
    return [t for _, layer in factored_layers(model) if layer.factored_grad is not None
            for t in layer.factored_grad]


def _optimizer_state_tensors(optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """Every tensor the optimizer's state holds, also inside containers and objects (galore_torch keeps each
    weight's projection in a GaLoreProjector's `ortho_matrix`)."""
    if optimizer is None:
        return []
    return [t for state in optimizer.state.values() for v in state.values() for t in _tensors_in(v)]


def _tensors_in(value: Any, depth: int = 3) -> list[torch.Tensor]:
    """Tensors of `value`: itself, or found within `depth` levels of lists, tuples, dicts and object attributes."""
    if isinstance(value, torch.Tensor):
        return [value]
    if depth == 0 or isinstance(value, (str, bytes, int, float, bool)) or value is None:
        return []
    if isinstance(value, (list, tuple)):
        items: Iterable[Any] = value
    elif isinstance(value, dict):
        items = value.values()
    else:
        items = vars(value).values() if hasattr(value, "__dict__") else ()
    return [t for item in items for t in _tensors_in(item, depth - 1)]


def weight_bytes(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    """Bytes of trainable parameters, their ``.grad``, optimizer state and factored gradients.

    Frozen parameters and buffers are not counted. Optimizer state is every tensor in
    ``optimizer.state`` (e.g. SGD ``momentum_buffer``; AdamW ``exp_avg``, ``exp_avg_sq``,
    ``step``), also inside the objects it holds (GaLore's projection matrices). Factored gradients
    are the ``(G, P)`` of ``wasi.factored_layers(model)``.
    Memory is counted per storage, each once at its full size, so a view costs what its storage
    holds (e.g. a ``P`` that views the saved layer input) and an expanded tensor costs its storage.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    grads = [p.grad for p in trainable if p.grad is not None]
    tensors = [*trainable, *grads, *_optimizer_state_tensors(optimizer), *_factored_grads(model)]
    return _unique_storage_bytes(tensors)


class _LiveStorageTracker(TorchDispatchMode):
    """Tracks live bytes of storages produced by dispatched ops; records their peak (and, with `label`,
    a label of the op that created each storage).

    An op output is a new storage when its storage is neither among the op's inputs (views,
    in-place and ``out=`` ops) nor already tracked. ``aten.lift_fresh`` outputs are new: they
    wrap tensors built from Python data (``torch.tensor``) outside dispatch. A storage leaves
    the count when it is freed (``weakref.finalize`` on the untyped storage).
    """

    def __init__(self, resident: Iterable[torch.Tensor], label: Callable[[Any], str] | None = None) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.labels: dict[int, str] = {}  # key -> label(op that created it), when `label` is given
        self.current = 0
        self.peak = 0
        self._label = label
        self._finalizers: list[weakref.finalize] = []
        for t in resident:
            self._track(t.untyped_storage())

    def _track(self, storage: torch.UntypedStorage, func: Any = None) -> None:
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or key in self.live:
            return
        self.live[key] = nbytes
        if self._label is not None and func is not None:
            self.labels[key] = self._label(func)
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self._finalizers.append(weakref.finalize(storage, self._release, key))

    def _release(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def detach(self) -> None:
        """Stop following storages still alive."""
        for fin in self._finalizers:
            fin.detach()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        fresh = func is torch.ops.aten.lift_fresh.default
        inputs = set() if fresh else {_storage_key(t) for t in _dense_tensors((args, kwargs))}
        for t in _dense_tensors(out):
            if _storage_key(t) not in inputs:
                self._track(t.untyped_storage(), func)
        return out


def _dense_tensors(tree: Any) -> list[torch.Tensor]:
    """Strided (storage-backed) tensors among the leaves of a pytree."""
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor) and t.layout is torch.strided]


def _resident_tensors(model: nn.Module | None, optimizer: torch.optim.Optimizer | None) -> list[torch.Tensor]:
    """Model parameters, buffers, ``.grad`` and factored gradients, and optimizer state."""
    tensors = _optimizer_state_tensors(optimizer)
    if model is not None:
        tensors += _model_state_tensors(model)
        tensors += [p.grad for p in model.parameters() if p.grad is not None]
        tensors += _factored_grads(model)
    return tensors


def peak_bytes(
    step_fn: Callable[[], Any],
    device: str | torch.device,
    model: nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> int:
    """Peak bytes of memory in use during ``step_fn``, including what was resident before.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (everything the
    caching allocator has handed out, model, batch and workspaces included).

    CPU has no allocator statistic, so live storages are followed instead: the count starts at
    the bytes already resident (parameters, buffers, ``.grad`` and factored gradients of
    ``model``, state of ``optimizer``, each storage once); a ``TorchDispatchMode`` adds every new
    storage an op returns during ``step_fn`` (forward, backward and optimizer ops all pass the
    dispatcher), a ``weakref.finalize`` on each storage (resident ones too, e.g. grads dropped
    by ``zero_grad``) subtracts it when freed, and the maximum is returned. Views and in-place
    results share a counted storage and add nothing. Limits: scratch buffers a kernel frees
    before returning, storages made outside dispatch (``torch.from_numpy``, data loading) and
    tensors alive before the call that are not model/optimizer state (e.g. a batch built
    outside ``step_fn``) are not counted; allocator overhead and fragmentation are not modelled.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step_fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    tracker = _LiveStorageTracker(_resident_tensors(model, optimizer))
    try:
        with tracker:
            step_fn()
    finally:
        tracker.detach()
    return tracker.peak


def median_time(
    fn: Callable[[], Any],
    warmup: int = 2,
    repeats: int = 5,
    device: str | torch.device = "cpu",
    timer: Callable[[], float] = time.perf_counter,
) -> float:
    """Median wall-clock seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    On CUDA the device is synchronized before reading the clock, so queued kernels are timed.
    """
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        fn()
    durations = []
    for _ in range(repeats):
        sync()
        start = timer()
        fn()
        sync()
        durations.append(timer() - start)
    return statistics.median(durations)


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": all parameter elements, "trainable": those with requires_grad}``."""
    params = list(model.parameters())
    return {
        "total": sum(p.numel() for p in params),
        "trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def compressed_layers_bytes(model: nn.Module) -> dict[str, int]:
    """The paper's memory count over the converted layers, from their last training forward.

    compressed: saved-activation factors (S + Σ U_m, or x if kept dense) + weight factors (L + R,
    or W) + bias; vanilla: dense input x + dense W + bias for the same layers. Empty dict if the
    model has no converted layers.
    """
    reports = [m.memory_report() for m in model.modules() if isinstance(m, (wasi.ASILinear, wasi.WSILinear))]
    if not reports:
        return {}
    return {
        "memory/compressed_layers_bytes": sum(r["activation_bytes"] + r["weight_bytes"] for r in reports),
        "memory/compressed_layers_vanilla_bytes": sum(r["dense_activation_bytes"] + r["dense_weight_bytes"]
                                                      for r in reports),
    }


def tuned_layer_bytes(model: nn.Module, names: Sequence[str], forward: Callable[[], Any]) -> dict[str, int]:
    """The paper's memory count over the fine-tuned layers `names`, activation and weight apart, next to the same
    layers dense, from one training forward (`forward`, as for `held_activations`):
    - memory/layers_activation_bytes: what each keeps of its input for the weight gradient: an ASI/WASI layer its
      Tucker factors (S + Σ U_m), any other layer its input x;
    - memory/layers_weight_bytes: its weight: a WSI/WASI layer L + R + b, any other layer its parameters (W + b);
    - memory/layers_activation_dense_bytes, memory/layers_weight_dense_bytes: x and W + b of every one of them.
    {} for no names. Converted layers report themselves (`memory_report`); a dense layer's input is read by a
    forward hook (its first call)."""
    if not names:
        return {}
    seen: dict[str, int] = {}

    def hook(name: str) -> Callable[..., None]:
        def read(module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
            seen.setdefault(name, x.numel() * x.element_size())
        return read

    layers = {name: model.get_submodule(name) for name in names}
    dense = {n: m for n, m in layers.items() if not isinstance(m, (wasi.ASILinear, wasi.WSILinear))}
    handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in dense.items()]
    try:
        forward()
    finally:
        for h in handles:
            h.remove()
    out = dict.fromkeys(("memory/layers_activation_bytes", "memory/layers_weight_bytes",
                         "memory/layers_activation_dense_bytes", "memory/layers_weight_dense_bytes"), 0)
    for name, layer in layers.items():
        if name in dense:
            own = (seen.get(name, 0), sum(p.numel() * p.element_size() for p in layer.parameters()))
            counts = (*own, *own)
        else:
            r = layer.memory_report()
            counts = (r["activation_bytes"], r["weight_bytes"], r["dense_activation_bytes"], r["dense_weight_bytes"])
        for key, count in zip(out, counts):
            out[key] += count
    return out
