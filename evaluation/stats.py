"""Model statistics for any Hugging Face causal LM, pruned ones with uneven layer widths included.

* ``count_parameters`` / ``parameters_per_layer``: every parameter once (tied embeddings once).
* ``macs``: multiply-accumulates of one forward pass over ``seq_len`` tokens, measured with forward hooks on the
  layers that actually run (so any width, and low-rank factors built from ``nn.Linear``, count as they are):

  - every ``nn.Linear`` (and transformers' GPT-2 style ``Conv1D``): ``tokens * in_features * out_features``
    per call (bias additions are not counted);
  - every attention module with ``q_proj``/``k_proj``/``v_proj`` children: the two score/value matmuls,
    ``batch * s_q * s_k * (q_width + n_q_heads * v_head_dim)``, where the widths are read from the outputs of
    the three projections during the call, ``n_q_heads = q_width / head_dim``,
    ``v_head_dim = v_width / (k_width / head_dim)`` and ``head_dim`` is the module's ``head_dim`` (else the
    config's). With no KV cache ``s_k = s_q``; the full (unmasked) score matrix is counted, as kernels compute it.

  Element-wise work (norms, activations, rotary, softmax, residuals) and embedding look-ups are not counted.
  FLOPs are about twice the MACs.
* ``latency``: prefill time and greedy decode speed with a KV cache, median of ``repeats`` runs.
* ``peak_memory``: one warm-up forward first (it pages in weights that are still lazily mapped), then one
  measured forward. On CUDA: ``torch.cuda.max_memory_allocated``. On CPU: the kernel's high-water mark of the
  resident set (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the forward), with a 1 ms RSS
  sampling thread as fallback where that reset is unavailable; ``malloc_trim`` (glibc) first hands freed heap
  pages back so that the baseline is close to live memory. The CPU peak is the whole process's RSS (weights,
  Python, libraries); the activation figure is the peak minus the RSS just before the forward, and can still
  under-read a little when the allocator reuses memory it kept from earlier work.
"""
from __future__ import annotations

import ctypes
import gc
import re
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

try:  # transformers' GPT-2 style linear layer (weight stored as [in, out])
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


# ----------------------------------------------------------------------------------------------- parameters


def _unique(parameters: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """Drop repeated parameters: the same object, or distinct objects viewing the same storage."""
    seen_ids: set[int] = set()
    seen_storage: set[tuple] = set()
    kept = []
    for param in parameters:
        if id(param) in seen_ids:
            continue
        seen_ids.add(id(param))
        if param.device.type != "meta" and param.numel() > 0:
            key = (param.device, param.data_ptr(), tuple(param.shape), tuple(param.stride()))
            if key in seen_storage:
                continue
            seen_storage.add(key)
        kept.append(param)
    return kept


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters, each counted once (tied input/output embeddings count once)."""
    params = _unique(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad or not trainable_only)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of decoder blocks: ``model.model.layers`` (LLaMA family) or the usual other spellings, else
    the ``nn.ModuleList`` holding the most parameters."""
    for path in ("model.layers", "model.decoder.layers", "transformer.h", "gpt_neox.layers", "transformer.blocks",
                 "model.language_model.layers"):
        module: object = model
        for part in path.split("."):
            module = getattr(module, part, None)
            if module is None:
                break
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    if not lists:
        raise ValueError(f"found no decoder layers in {type(model).__name__}")
    return max(lists, key=count_parameters)


def parameters_per_layer(model: nn.Module) -> list[int]:
    """Parameters of each decoder layer, in order (they differ after uneven structural pruning)."""
    return [count_parameters(layer) for layer in decoder_layers(model)]


# ----------------------------------------------------------------------------------------------------- MACs


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _head_dim(attention: nn.Module, config) -> int | None:
    head_dim = getattr(attention, "head_dim", None) or getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    hidden, heads = getattr(config, "hidden_size", None), getattr(config, "num_attention_heads", None)
    return hidden // heads if hidden and heads else None


def _attention_modules(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Every attention module with the architecture rule that reads its head counts (none without a rule:
    then only the linear layers are counted)."""
    from depgraph import MissingArchitectureRule, rule_for

    if getattr(model, "config", None) is None:
        return []
    try:
        rule = rule_for(model)
    except MissingArchitectureRule:
        return []
    return [(layer.get_submodule(rule.attention), rule) for layer in rule.decoder_layers(model)]


def _last_dim(output) -> tuple[tuple[int, ...], int]:
    tensor = output[0] if isinstance(output, (tuple, list)) else output
    return tuple(tensor.shape[:-1]), int(tensor.shape[-1])


class MacCounter:
    """Context manager that adds up linear and attention-matmul MACs of every forward run inside it."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.linear = 0
        self.attention = 0
        self._handles: list = []

    @property
    def total(self) -> int:
        return self.linear + self.attention

    def __enter__(self) -> "MacCounter":
        config = getattr(self.model, "config", None)
        for module in self.model.modules():
            shape = _linear_shape(module)
            if shape is not None:
                self._handles.append(module.register_forward_hook(self._linear_hook(*shape)))
        for attention, rule in _attention_modules(self.model):
            self._hook_attention(attention, rule, _head_dim(attention, config))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _linear_hook(self, in_features: int, out_features: int) -> Callable:
        def hook(module, inputs, output):
            tokens = inputs[0].numel() // max(in_features, 1)
            self.linear += tokens * in_features * out_features

        return hook

    def _hook_attention(self, attention: nn.Module, rule, head_dim: int | None) -> None:
        """Scores and weighted values: s_q * s_k * (q_heads * head_dim + q_heads * value_head_dim) per sequence,
        with the head counts and widths the architecture rule reads from the (pruned) module."""

        def count(module, args, kwargs, output):
            hidden = args[0] if args else kwargs.get("hidden_states")
            if hidden is None or not head_dim:
                return
            q_heads, _ = rule.head_counts(module)
            value_dim = rule.value_head_dim(module)
            *lead, s_q = hidden.shape[:-1]
            batch = 1
            for size in lead:
                batch *= size
            s_k = s_q  # one forward without a KV cache
            self.attention += batch * s_q * s_k * q_heads * (head_dim + value_dim)

        self._handles.append(attention.register_forward_hook(count, with_kwargs=True))


def _device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _dummy_ids(model: nn.Module, batch_size: int, seq_len: int, seed: int = 0, vocab: int | None = None) -> torch.Tensor:
    vocab = vocab or getattr(getattr(model, "config", None), "vocab_size", None) or 1000
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch_size, seq_len), generator=generator).to(_device(model))


def _run(model: nn.Module, inputs: torch.Tensor | dict) -> None:
    if isinstance(inputs, dict):
        model(**inputs)
    else:
        model(inputs)


def macs_breakdown(
    model: nn.Module, seq_len: int = 128, batch_size: int = 1, inputs: torch.Tensor | dict | None = None
) -> dict[str, int]:
    """MACs of one forward: ``linear``, ``attention`` and ``total``.

    By default the forward is ``model(input_ids=..., use_cache=False)`` over ``batch_size`` random sequences of
    ``seq_len`` tokens; pass ``inputs`` (a tensor for ``model(inputs)`` or a dict of keyword arguments) to
    count any other module.
    """
    if inputs is None:
        inputs = {"input_ids": _dummy_ids(model, batch_size, seq_len), "use_cache": False}
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), MacCounter(model) as counter:
            _run(model, inputs)
    finally:
        model.train(was_training)
    return {"linear": counter.linear, "attention": counter.attention, "total": counter.total}


def macs(model: nn.Module, seq_len: int = 128, batch_size: int = 1, inputs: torch.Tensor | dict | None = None) -> int:
    """Multiply-accumulates of one forward pass over ``seq_len`` tokens (see the module docstring)."""
    return macs_breakdown(model, seq_len=seq_len, batch_size=batch_size, inputs=inputs)["total"]


# -------------------------------------------------------------------------------------------------- latency


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latency(
    model: nn.Module,
    tokenizer=None,
    prompt_len: int = 128,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """Prefill and greedy-decode speed with a KV cache (median of ``repeats`` timed runs after ``warmup``).

    The prompt is ``batch_size`` x ``prompt_len`` random token ids (from ``len(tokenizer)`` when a tokenizer is
    given, else the config's vocabulary). Prefill is one forward over the prompt that fills the cache; decode
    is ``new_tokens`` single-token forwards, each feeding back the argmax, timed after the prefill.
    """
    if prompt_len < 1 or new_tokens < 1 or repeats < 1:
        raise ValueError("prompt_len, new_tokens and repeats must be positive")
    device = _device(model)
    vocab = len(tokenizer) if tokenizer is not None else None
    ids = _dummy_ids(model, batch_size, prompt_len, seed=seed, vocab=vocab)
    prefill_times, decode_times = [], []
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for run in range(warmup + repeats):
                _sync(device)
                start = time.perf_counter()
                out = model(input_ids=ids, use_cache=True)
                _sync(device)
                prefilled = time.perf_counter()
                cache = out.past_key_values
                token = out.logits[:, -1:].argmax(-1)
                for _ in range(new_tokens):
                    out = model(input_ids=token, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    token = out.logits[:, -1:].argmax(-1)
                _sync(device)
                done = time.perf_counter()
                if run >= warmup:
                    prefill_times.append(prefilled - start)
                    decode_times.append(done - prefilled)
    finally:
        model.train(was_training)
    prefill = statistics.median(prefill_times)
    decode = statistics.median(decode_times)
    return {
        "prefill_s": prefill,
        "prefill_tokens_per_s": batch_size * prompt_len / prefill,
        "decode_s": decode,
        "decode_tokens_per_s": batch_size * new_tokens / decode,
        "decode_ms_per_token": 1000 * decode / new_tokens,
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------------- memory

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field_name: str) -> int | None:
    try:
        with open(_STATUS, encoding="ascii") as handle:
            match = re.search(rf"^{field_name}:\s+(\d+) kB", handle.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def _reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write("5")
        return _status_kib("VmHWM") is not None
    except OSError:
        return False


def _trim_heap() -> None:
    """Return freed heap memory to the OS (glibc only; a no-op elsewhere)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _current_rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil

    return psutil.Process().memory_info().rss


class _RssSampler:
    """Background thread sampling the RSS every ``interval`` seconds (misses spikes shorter than that)."""

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.peak = _current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> "_RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss())


def peak_memory(model: nn.Module, seq_len: int = 128, batch_size: int = 1) -> dict[str, int | str]:
    """Peak memory (bytes) of one forward over ``batch_size`` x ``seq_len`` tokens without a KV cache.

    Returns ``peak_bytes``, ``before_bytes`` (memory just before the forward), ``activation_bytes``
    (the difference) and ``method``. On CUDA it is allocated tensor memory; on CPU it is the process RSS.
    A warm-up forward runs first (see the module docstring).
    """
    device = _device(model)
    ids = _dummy_ids(model, batch_size, seq_len)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False)  # warm-up: page in lazily mapped weights, settle allocators
            _trim_heap()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                model(input_ids=ids, use_cache=False)
                torch.cuda.synchronize(device)
                peak, method = torch.cuda.max_memory_allocated(device), "cuda.max_memory_allocated"
            elif _reset_rss_peak():
                before = _current_rss()
                model(input_ids=ids, use_cache=False)
                peak, method = _status_kib("VmHWM") * 1024, "rss high-water mark (VmHWM)"
            else:
                before = _current_rss()
                with _RssSampler() as sampler:
                    model(input_ids=ids, use_cache=False)
                peak, method = sampler.peak, "rss sampled every 1 ms"
    finally:
        model.train(was_training)
    return {"peak_bytes": int(peak), "before_bytes": int(before), "activation_bytes": int(max(peak - before, 0)),
            "method": method}


# ---------------------------------------------------------------------------------------------------- summary


@dataclass
class ModelStats:
    """Size, compute, speed and memory of a model (latency and memory are None when not measured)."""

    parameters: int
    parameters_per_layer: list[int]
    macs: int
    seq_len: int
    macs_linear: int = 0
    macs_attention: int = 0
    latency: dict | None = None
    memory: dict | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A markdown table of the headline numbers."""
        rows = [
            ("parameters", f"{self.parameters / 1e6:.2f} M"),
            ("decoder layers", f"{len(self.parameters_per_layer)}"),
            (f"MACs (seq {self.seq_len})", f"{self.macs / 1e9:.3f} G"),
        ]
        if self.latency:
            lat = self.latency
            rows += [
                (f"prefill ({lat['batch_size']}x{lat['prompt_len']} tokens)",
                 f"{1000 * lat['prefill_s']:.1f} ms, {lat['prefill_tokens_per_s']:.0f} tok/s"),
                (f"decode ({lat['new_tokens']} tokens)",
                 f"{lat['decode_tokens_per_s']:.1f} tok/s, {lat['decode_ms_per_token']:.1f} ms/token"),
            ]
        if self.memory:
            mem = self.memory
            rows.append((f"peak memory ({mem['method']})",
                         f"{mem['peak_bytes'] / 2**20:.0f} MiB (+{mem['activation_bytes'] / 2**20:.0f} MiB in forward)"))
        lines = ["| statistic | value |", "| --- | ---: |"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines)


def model_stats(
    model: nn.Module,
    seq_len: int = 128,
    tokenizer=None,
    measure_latency: bool = True,
    measure_memory: bool = True,
    new_tokens: int = 64,
    batch_size: int = 1,
    repeats: int = 3,
) -> ModelStats:
    """Parameters, per-layer parameters, MACs at ``seq_len`` and, optionally, latency and peak memory."""
    breakdown = macs_breakdown(model, seq_len=seq_len, batch_size=1)
    return ModelStats(
        parameters=count_parameters(model),
        parameters_per_layer=parameters_per_layer(model),
        macs=breakdown["total"],
        macs_linear=breakdown["linear"],
        macs_attention=breakdown["attention"],
        seq_len=seq_len,
        latency=latency(model, tokenizer, prompt_len=seq_len, new_tokens=new_tokens, batch_size=batch_size,
                        repeats=repeats) if measure_latency else None,
        memory=peak_memory(model, seq_len=seq_len, batch_size=batch_size) if measure_memory else None,
    )
