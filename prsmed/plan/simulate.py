"""Run one training (or inference) step of a model without its weights, and measure what it allocates.

The model is built on the meta device from its real module configuration, then every parameter and buffer is
replaced by a fake tensor (``torch._subclasses.FakeTensorMode``): it has a shape, a dtype and a device but no data.
The real code of the step then runs on it: the composite model's forward, the trainer's loss, backward, gradient
clipping and the AdamW update. Nothing is computed and nothing is allocated, but every operator is dispatched, so
a dispatch mode can keep the books:

* live bytes: each new storage an operator returns is counted until Python or autograd drops its last reference;
  the high-water mark is the step's peak above what existed before it (weights and optimizer states);
* FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` counts matmuls, convolutions and attention from shapes.

What a fake step cannot see: the caching allocator's rounding and fragmentation, the CUDA context, and kernels'
own workspaces. :mod:`prsmed.plan.estimate` adds those as a stated overhead. Mixed precision is CPU autocast with
the requested dtype, whose operator lists match CUDA's for everything this model runs (matmuls and convolutions
in the low dtype; norms, softmax and losses in float32).

Data-dependent control flow cannot run without data. ``.item()`` answers 1 (``True`` for a bool): every sequence is
taken to be full length with no padding, which is the largest a batch of that length can be.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from prsmed.model.spec import ModelSpec

PRECISIONS = ("fp32", "bf16", "fp16", "4bit")


class SimulationError(RuntimeError):
    """A model's step could not be run on fake tensors; the message names the operation that needed real data."""


class _Books(TorchDispatchMode):
    """Counts the bytes of every storage an operator creates, while it lives; answers ``.item()`` with 1."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return True if args[0].dtype == torch.bool else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t)
        return out

    def _count(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._sizes:
            return  # a view or an in-place result: no new memory
        size = storage.nbytes()
        self._sizes[key] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        # The storage's Python object lives exactly as long as the storage (PyTorch preserves it while C++ holds a
        # reference, e.g. a tensor saved for backward), so its finaliser marks the moment the memory is freed.
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live


def _fused_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention as a GPU runs it: one fused kernel that keeps the output and the row
    log-sum-exp, never the (L, S) attention matrix. On a CPU PyTorch takes the math path for some calls (dropout in
    training, a mask), which materialises that matrix: 1 GiB per sample for the PRS-Med head's attention over 4,096
    image tokens. This stands in for it while simulating a GPU, with the same inputs, outputs and gradients."""
    if torch.is_autocast_enabled("cpu"):
        low = torch.get_autocast_dtype("cpu")
        query, key, value = query.to(low), key.to(low), value.to(low)
    squeeze = query.dim() == 3
    if squeeze:
        query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
    if key.shape[-3] != query.shape[-3]:  # grouped-query attention: the kernel reads each KV head per group
        groups = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    bias = attn_mask
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.zeros(bias.shape, dtype=query.dtype).masked_fill(~bias, float("-inf"))
        bias = bias.to(query.dtype)
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, bias, True, float(dropout_p), bool(is_causal), scale=scale
    )[0]
    return out.squeeze(0) if squeeze else out


# Simulations run in worker threads of the service while real predictions run in others: the swap of
# F.scaled_dot_product_attention is installed once for however many simulations are running, and answers with the
# fused stand-in only in a thread that is simulating.
_swap_lock = threading.Lock()
_swap_users = 0
_original_sdpa = None
_simulating = threading.local()


def _sdpa_by_thread(*args, **kwargs):
    if getattr(_simulating, "gpu", False):
        return _fused_sdpa(*args, **kwargs)
    return _original_sdpa(*args, **kwargs)


@contextlib.contextmanager
def _gpu_attention() -> Iterator[None]:
    import torch.nn.functional as F

    global _swap_users, _original_sdpa
    with _swap_lock:
        if _swap_users == 0:
            _original_sdpa = F.scaled_dot_product_attention
            F.scaled_dot_product_attention = _sdpa_by_thread
        _swap_users += 1
    _simulating.gpu = True
    try:
        yield
    finally:
        _simulating.gpu = False
        with _swap_lock:
            _swap_users -= 1
            if _swap_users == 0:
                F.scaled_dot_product_attention = _original_sdpa


@contextlib.contextmanager
def _per_component(model, books: _Books, into: dict[str, int]) -> Iterator[None]:
    """Bytes each top-level component's forward leaves allocated (its activations kept for backward, its output)."""
    handles = []

    def watch(name: str, module: torch.nn.Module) -> None:
        before = 0

        def enter(*_):
            nonlocal before
            before = books.live

        def leave(*_):
            into[name] = into.get(name, 0) + books.live - before

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave))

    for name in ("vision_encoder", "llm", "fusion_head", "modality_head"):
        module = getattr(model, name, None)
        if module is not None:
            watch(name, module)
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class StepTrace:
    """What one step of one configuration needs."""

    batch: int
    seq_len: int  # the LLM's sequence: image tokens + text tokens
    image_size: int
    params: dict[str, dict[str, int]]  # per component: total, trainable (and lora for the LLM)
    weight_bytes: dict[str, int]  # "frozen", "trained" (at the dtypes the trainer keeps them in)
    weight_params: dict[str, int] = field(default_factory=dict)  # "frozen_quantizable": text-model linear weights
    optimizer_bytes: int = 0  # AdamW states, allocated once and kept
    activation_bytes: int = 0  # held at the end of the forward pass (saved for backward, inputs, loss)
    activation_by_component: dict[str, int] = field(default_factory=dict)
    peak_bytes: int = 0  # the step's high-water mark above weights and optimizer states
    flops_forward: int = 0
    flops_backward: int = 0
    kv_bytes_per_token: int = 0  # inference only: the KV cache's growth per generated token and sequence


def _fake_like(t: torch.Tensor, requires_grad: bool | None = None) -> torch.Tensor:
    fake = torch.empty(t.shape, dtype=t.dtype)
    if requires_grad is None:
        return fake
    return torch.nn.Parameter(fake, requires_grad=requires_grad)


def _fakeify(model: torch.nn.Module) -> None:
    """Swap every meta parameter and buffer for a fake CPU tensor (the caller holds a FakeTensorMode)."""
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                module._parameters[name] = _fake_like(p, requires_grad=p.requires_grad)
        for name, b in list(module._buffers.items()):
            if b is not None:
                module._buffers[name] = _fake_like(b)


def _quantizable_params(model) -> int:
    """Frozen weights a 4-bit base would quantise: the text model's linear layers (not embeddings, not lm_head)."""
    text = model.llm.text_model()
    if text is None:
        return 0
    total = 0
    for module in text.modules():
        if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
            total += module.weight.numel()
    return total


def _optimizer(params: list[torch.nn.Parameter], device: str) -> torch.optim.Optimizer:
    # The trainer's AdamW; on a GPU PyTorch picks the foreach implementation, whose temporaries are traced too.
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-5, eps=1e-6, foreach=device == "cuda")


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Deprecation and fake-tensor warnings from the libraries say nothing about the user's configuration.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass
class SyntheticBatch:
    """A batch of the shapes a real one has: full-length sequences, the last third of the text supervised."""

    pixels: torch.Tensor
    inputs: Any  # LLMInputs
    masks: torch.Tensor
    modality: torch.Tensor
    seq_len: int
    image_size: int


def synthetic_batch(model, batch: int, text_len: int, *, train: bool) -> SyntheticBatch:
    """Works on real tensors (calibration) and inside a FakeTensorMode (planning) alike."""
    from prsmed.interfaces import LLMInputs
    from prsmed.model.prsmed_model import IGNORE_INDEX

    c_llm = model.contracts["llm"]
    size = model.contracts["vision_encoder"].input_size
    seq = c_llm.image_tokens + text_len
    ids = torch.zeros(batch, seq, dtype=torch.long)
    attention = torch.ones(batch, seq, dtype=torch.long)
    labels = None
    if train:
        labels = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long)
        labels[:, seq - max(1, text_len // 3):] = 0
    # No pixel_values: the image tokens' positions are in the sequence, so the text model runs at full length, and
    # the LLM's own image tower (frozen, no activations kept) is counted on its own (see _tower_flops).
    inputs = LLMInputs(input_ids=ids, attention_mask=attention, pixel_values=None, labels=labels)
    return SyntheticBatch(
        pixels=torch.zeros(batch, 3, size, size), inputs=inputs, masks=torch.zeros(batch, size, size),
        modality=torch.zeros(batch, dtype=torch.long), seq_len=seq, image_size=size,
    )


def forward_loss(model, b: SyntheticBatch, autocast) -> torch.Tensor:
    """The trainer's own forward and loss (prsmed.train.step.model_loss) on a synthetic batch."""
    from prsmed.train.losses import LossWeights
    from prsmed.train.step import model_loss

    return model_loss(model, b.pixels, b.inputs, b.masks, b.modality, epoch=0, weights=LossWeights(),
                      autocast=autocast)[0]


def autocast_for(precision: str, device_type: str = "cpu"):
    from prsmed.train.device import autocast

    return autocast(precision, device_type)


def _tower_flops(model, batch: int) -> int:
    """Forward FLOPs of the LLM's frozen image tower and projector (no backward: nothing before it trains)."""
    from torch.utils.flop_counter import FlopCounterMode

    c = model.contracts["llm"]
    if not c.image_tokens or model.llm.image_path() is None:
        return 0
    pixels = torch.zeros(batch, 3, c.image_size, c.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.llm.image_features(pixels)
    return int(counter.get_total_flops())


def build_meta_model(spec: ModelSpec, *, grad_checkpointing: bool):
    """The model of ``spec`` on the meta device, with the trainer's gradient checkpointing switch applied."""
    from prsmed.train.device import enable_grad_checkpointing
    from prsmed.zoo import build_model

    model = build_model(spec, weights=False, device="meta")
    if grad_checkpointing:
        enable_grad_checkpointing(model)
    return model


def simulate(
    spec: ModelSpec,
    *,
    batch: int,
    text_len: int,
    precision: str = "bf16",
    grad_checkpointing: bool = False,
    device: str = "cuda",
    mode: str = "train",
    count_flops: bool = True,
) -> StepTrace:
    """One step of ``spec`` at ``batch`` samples of ``text_len`` text tokens each. ``mode`` is "train" (forward,
    loss, backward, clip, AdamW) or "infer" (one prefill with KV cache, mask and image features)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from prsmed.train.device import apply_dtype_policy

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")
    if mode not in ("train", "infer"):
        raise ValueError(f"mode must be 'train' or 'infer'; got {mode!r}")
    autocast = autocast_for(precision)
    books = _Books()
    with _quiet():
        model = build_meta_model(spec, grad_checkpointing=grad_checkpointing and mode == "train")
    attention = _gpu_attention() if device == "cuda" else contextlib.nullcontext()
    with _quiet(), FakeTensorMode(), books, attention:
        _fakeify(model)
        apply_dtype_policy(model, precision, device)
        trained = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        buffers = list(model.buffers())
        trace = StepTrace(
            batch=batch, seq_len=0, image_size=0, params=model.parameter_counts(),
            weight_bytes={"frozen": _bytes(frozen) + _bytes(buffers), "trained": _bytes(trained)},
            weight_params={"frozen_quantizable": _quantizable_params(model)},
        )
        if mode == "train":
            model.train()
            opt = _optimizer(trained, device)
            for p in trained:
                p.grad = torch.zeros_like(p)
            opt.step()  # allocates AdamW's states, as after the first real step
            opt.zero_grad(set_to_none=True)
            trace.optimizer_bytes = _bytes(t for s in opt.state.values() for t in s.values() if t.dim() > 0)
        else:
            model.eval()
        books.reset_peak()
        start = books.live
        try:
            b = synthetic_batch(model, batch, text_len, train=mode == "train")
            trace.seq_len, trace.image_size = b.seq_len, b.image_size
            if mode == "train":
                with _per_component(model, books, trace.activation_by_component):
                    loss = forward_loss(model, b, autocast)
                trace.activation_bytes = books.live - start
                loss.backward()
                del loss
                torch.nn.utils.clip_grad_norm_(trained, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                trace.peak_bytes = books.peak - start
                if count_flops:
                    # A second pass: FlopCounterMode's backward hooks keep tensors alive, so counting FLOPs
                    # during the measured pass would inflate its peak.
                    with FlopCounterMode(display=False) as fwd:
                        loss = forward_loss(model, b, autocast)
                    with FlopCounterMode(display=False) as bwd:
                        loss.backward()
                    del loss
                    opt.zero_grad(set_to_none=True)
                    trace.flops_forward = int(fwd.get_total_flops())
                    trace.flops_backward = int(bwd.get_total_flops())
            else:
                with FlopCounterMode(display=False) as fwd, torch.no_grad(), autocast:
                    z_img = model.vision_encoder(b.pixels)
                    prefill = model.llm(b.inputs, use_cache=True)
                    model.fusion_head(z_img, prefill.hidden_states, prompt_mask=b.inputs.attention_mask.bool())
                trace.activation_bytes = books.live - start
                trace.peak_bytes = books.peak - start
                trace.flops_forward = int(fwd.get_total_flops())
                cache = [t for t in tree_leaves(_cache_tensors(prefill.past_key_values)) if isinstance(t, torch.Tensor)]
                trace.kv_bytes_per_token = _bytes(cache) // max(1, batch * trace.seq_len)
            if count_flops:
                trace.flops_forward += _tower_flops(model, batch)
        except (RuntimeError, NotImplementedError) as e:
            raise SimulationError(
                f"could not run a {mode} step of {spec.name!r} on fake tensors ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); a component may need real data in its forward"
            ) from e
    return trace


def _cache_tensors(cache: Any) -> Any:
    """The tensors of a transformers KV cache (a Cache object or the legacy tuple of tuples)."""
    if cache is None:
        return []
    layers = getattr(cache, "layers", None)
    if layers is not None:
        return [[getattr(layer, "keys", None), getattr(layer, "values", None)] for layer in layers]
    if hasattr(cache, "key_cache"):
        return [cache.key_cache, cache.value_cache]
    return list(cache)
