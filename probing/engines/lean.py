"""Hook-free decoder blocks with per-reader inputs: the edge runner's fast forward on GPT-2 and Llama models.

Edge-level forwards (:mod:`wordpos.patching.edge_runner`) change the input of each head's query, each key/value
head's key and value and each MLP separately. TransformerLens' bridge does this with its split-input mode
(:mod:`~wordpos.probing.engines.split_inputs`): every block forks the residual per head and fires a few dozen
hooks, about 250 tensor operations per layer. On a GPU those forwards are bound by kernel launches, not
arithmetic. :class:`LeanBlocks` runs the same computation, written out with the bridge's own weights and the
Hugging Face model's own layers (called underneath the bridge's wrappers, norms as ``F.rms_norm``/``F.layer_norm``)
and rotary tables, in about a quarter of the operations. A reader's input is only materialised per head when it
differs from the residual stream (or its gradient is asked for).

Supported: Hugging Face ``gpt2`` and ``llama`` (RMSNorm, RoPE, grouped-query attention) decoder blocks, and Llama's
block as ``mistral`` and ``qwen2`` have it (Qwen2 with q/k/v biases), with the standard attention (no soft-capping,
sliding windows or q/k norms). :func:`lean_unsupported` says why another model is not; the edge runner then keeps
the bridge's hooks, and it checks the lean forward against a plain run before using it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor

from wordpos.probing.errors import ConfigError

ARCHS = ("gpt2", "llama", "mistral", "qwen2")
ROPE_ARCHS = ("llama", "mistral", "qwen2")  # Llama's block: RMSNorm, RoPE, gated MLP (Qwen2: q/k/v biases)
_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")  # the same modules, under three names
_GATED_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
Site = Literal["q", "k", "v", "mlp"]
# reader(layer, site, resid[, out]) -> that reader's input ([rows, pos, slots, d] for q/k/v, [rows, pos, d] for the
# MLP), or None when it is the residual stream itself. Without gradients the q/k/v readers get ``out``, a view of
# one buffer for all three: a reader that writes its input there (and returns ``out``) saves stacking them. Before
# those, site "qkv" offers the whole slot-major buffer ([q, k and v slots, rows, pos, d]): a reader that writes all
# three sites' inputs there returns it (one operation instead of three); None asks for them site by site.
Reader = Callable[..., Tensor | None]
# writer(layer, kind, out): kind "heads" ([rows, pos, n_heads, d], each head's z @ W_O, no bias) or "mlp"
# ([rows, pos, d]); only computed when a writer is given
Writer = Callable[[int, str, Tensor], None]
ZEdit = Callable[[int, Tensor], "Tensor | None"]
# tap(layer, resid): sees the residual entering each block (TransformerLens' hook_resid_pre), to keep it
Tap = Callable[[int, Tensor], None]


def _sliding(cfg: Any) -> bool:
    """Whether some layer attends through a sliding window shorter than the model's context (Mistral v0.1, Qwen2 with
    ``use_sliding_window``): the lean forward masks causally only."""
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    if any(t not in ("full_attention", None) for t in types):
        return True
    if getattr(cfg, "model_type", None) == "qwen2" and not getattr(cfg, "use_sliding_window", False):
        return False
    return isinstance(window, int) and window < int(getattr(cfg, "max_position_embeddings", 0) or 0)


def lean_unsupported(engine: Any) -> str | None:
    """Why :class:`LeanBlocks` cannot run this engine's model (None when it can)."""
    model = getattr(engine, "model", None)
    hf = getattr(model, "original_model", None)
    blocks = getattr(model, "blocks", None)
    if hf is None or blocks is None:
        return f"{type(engine).__name__} is not the TransformerLens engine over a Hugging Face model"
    cfg = hf.config
    arch = getattr(cfg, "model_type", None)
    if arch not in ARCHS:
        return f"model type {arch!r} is not one of {ARCHS}"
    if arch == "gpt2" and (getattr(cfg, "scale_attn_by_inverse_layer_idx", False)
                           or getattr(cfg, "reorder_and_upcast_attn", False) or not getattr(cfg, "scale_attn_weights", True)):
        return "this GPT-2 config scales or upcasts attention in a non-standard way"
    if arch in ROPE_ARCHS:
        if _sliding(cfg):
            return "sliding-window attention (the lean forward's mask is the full causal one)"
        if getattr(cfg, "pretraining_tp", 1) not in (None, 1):
            return "tensor-parallel Llama weights (pretraining_tp > 1)"
        if getattr(cfg, "mlp_bias", False) is None:  # pragma: no cover - defensive
            return "unknown MLP bias setting"
    for b in blocks:
        for part in ("ln1", "ln2", "mlp", "attn"):
            if getattr(getattr(b, part, None), "original_component", None) is None:
                return f"a block's {part} has no original Hugging Face module"
        if getattr(b.attn, "W_Q", None) is None or getattr(b.attn, "W_O", None) is None:
            return "the attention bridge exposes no W_Q/W_O"
        if getattr(b.attn.original_component, "scaling", None) is None:
            return "the attention module has no scaling"
        if _o_proj(b.attn.original_component) is None:
            return "the attention module has no output projection (o_proj / c_proj)"
        if getattr(b.attn.original_component, "c_attn", None) is None and _split_proj(b.attn.original_component) is None:
            return "the attention module has neither c_attn nor q/k/v_proj"
    return None


def _with_past(past: Float[Tensor, "r kv pre d_head"], x: Float[Tensor, "n kv t d_head"]) -> Tensor:
    """``past`` then ``x`` along the positions, ``past``'s rows repeated to ``x``'s (without copying them first)."""
    r, n = past.shape[0], x.shape[0]
    past = past.to(x.dtype)
    if r == n:
        return torch.cat([past, x], 2)
    if n % r:
        raise ConfigError(f"{n} rows cannot attend to a cached prefix of {r} rows (not a multiple).")
    return torch.cat([past.expand(n // r, *past.shape), x.unflatten(0, (n // r, r))], 3).flatten(0, 1)


def _rope(x: Float[Tensor, "slots rows pos d_head"], cos: Tensor, sin_signed: Tensor) -> Tensor:
    """Llama's rotary embedding (Hugging Face's ``x·cos + rotate_half(x)·sin``) of slot-major q/k. ``rotate_half(x)``
    is ``x`` rolled by half its width with the first half negated, so ``rotate_half(x)·sin = roll(x)·sin_signed``
    (:func:`_signed_sin`, exact: a sign moves): four kernels instead of five, the same roundings. ``cos`` and
    ``sin_signed`` broadcast against ``x`` (``[1, pos, d_head]``)."""
    return x * cos + torch.roll(x, x.shape[-1] // 2, -1) * sin_signed


def _rope_(x: Float[Tensor, "slots rows pos d_head"], cos: Tensor, sin_signed: Tensor) -> Tensor:
    """:func:`_rope` written into ``x`` (no autograd), with its roundings (``addcmul`` would round once less): no
    copy back into the q/k/v tensor."""
    rot = torch.roll(x, x.shape[-1] // 2, -1).mul_(sin_signed)
    return x.mul_(cos).add_(rot)


def _signed_sin(sin: Float[Tensor, "1 pos d_head"]) -> Tensor:
    """``sin`` with its first half negated: ``rotate_half(x)·sin == roll(x, half)·_signed_sin(sin)``."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], -1)


def _norm_fn(mod: Any) -> Callable[[Tensor], Tensor]:
    """The block norm ``mod`` as one functional call on its own weights: ``nn.LayerNorm`` (GPT-2) as ``F.layer_norm``,
    Hugging Face's Llama RMSNorm as ``F.rms_norm`` (in float32 the module's own operations on the CPU; in half
    precision the weight is applied after the normalised input is rounded to that precision, as the module does,
    where ``F.rms_norm``'s own weight would be applied before; a float64 input keeps the module, which computes in
    float32). On CUDA ``F.rms_norm`` is one fused kernel instead of six. Anything else: the module itself."""
    F = torch.nn.functional
    if type(mod) is torch.nn.LayerNorm:
        return lambda x: F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)
    w, eps = getattr(mod, "weight", None), getattr(mod, "variance_epsilon", None)
    if (type(mod).__name__ in _RMS_NORMS and isinstance(w, Tensor) and w.dim() == 1
            and isinstance(eps, float) and not _hooked(mod)):
        shape = (int(w.shape[0]),)

        def rms(x: Tensor) -> Tensor:
            if x.dtype == torch.float32:
                return F.rms_norm(x, shape, w, eps)
            if x.dtype == torch.float64:
                return mod(x)
            return w * F.rms_norm(x, shape, None, eps)  # (half precision: round, then the weight, as the module)
        return rms
    return mod


def _unwrap(mod: Any) -> Any:
    """The Hugging Face module under TransformerLens' bridge components (the bridge puts its ``LinearBridge`` in
    place of a model's linear layers; each call then passes through its hook machinery)."""
    while getattr(mod, "original_component", None) is not None:
        mod = mod.original_component
    return mod


def _hooked(mod: Any) -> bool:
    return bool(getattr(mod, "_forward_hooks", None) or getattr(mod, "_forward_pre_hooks", None))


def _linear_fn(mod: Any) -> Callable[[Tensor], Tensor]:
    """A linear layer as a plain call of the model's own module: ``F.linear`` on an ``nn.Linear``'s weights, else the
    unwrapped module itself (GPT-2's Conv1D, a quantised layer). The lean forward is hook-free: the bridge's hook
    points around the layer do not run (a torch forward hook on the module, present when the blocks are built, keeps
    the module's own call)."""
    plain = _unwrap(mod)
    if _hooked(mod):
        return mod
    if type(plain) is torch.nn.Linear and not _hooked(plain):
        return lambda x: torch.nn.functional.linear(x, plain.weight, plain.bias)
    return plain


def _mlp_fn(mod: Any) -> Callable[[Tensor], Tensor]:
    """The MLP as plain calls of its own layers, in the module's own order: Llama's ``down(act(gate(x)) · up(x))``,
    GPT-2's ``c_proj(act(c_fc(x)))`` (in eval mode: its dropout is the identity); any other MLP: the module."""
    if _hooked(mod):
        return mod
    name = type(mod).__name__
    if name in _GATED_MLPS and callable(getattr(mod, "act_fn", None)):
        gate, up, down = (_linear_fn(getattr(mod, f"{n}_proj")) for n in ("gate", "up", "down"))
        act = mod.act_fn
        return lambda x: down(act(gate(x)) * up(x))
    if name == "GPT2MLP" and not mod.training and callable(getattr(mod, "act", None)):
        c_fc, c_proj, act = _linear_fn(mod.c_fc), _linear_fn(mod.c_proj), mod.act
        return lambda x: c_proj(act(c_fc(x)))
    return mod


def _o_proj(hf_attn: Any) -> Any:
    return getattr(hf_attn, "o_proj", None) or getattr(hf_attn, "c_proj", None)


def _split_proj(hf_attn: Any) -> tuple[Any, Any, Any] | None:
    mods = tuple(getattr(hf_attn, f"{x}_proj", None) for x in "qkv")
    return mods if all(m is not None for m in mods) else None


@dataclass
class _Layer:
    ln1: Any
    ln2: Any
    mlp: Any
    W_Q: Tensor  # [n_heads, d_model, d_head]
    W_K: Tensor  # [n_kv_heads, d_model, d_head]
    W_V: Tensor
    W_O: Tensor  # [n_heads, d_head, d_model]
    b_Q: Tensor | None  # [n_heads, d_head]
    b_K: Tensor | None
    b_V: Tensor | None
    scaling: float
    o_proj: Any  # the model's own output projection (z flattened over heads -> d_model, bias included)
    qkv: Any  # GPT-2's joint input projection (c_attn), else None
    qkv_split: tuple[Any, Any, Any] | None  # Llama's q_proj, k_proj, v_proj
    W_QKV: Tensor | None = None  # [n_heads + 2 n_kv_heads, d_model, d_head]
    b_QKV: Tensor | None = None
    # the norms, MLP and output projection as functional calls where that is the module's arithmetic
    norm1: Callable[[Tensor], Tensor] | None = None
    norm2: Callable[[Tensor], Tensor] | None = None
    mlp_fn: Callable[[Tensor], Tensor] | None = None
    o_fn: Callable[[Tensor], Tensor] | None = None
    qkv_fns: tuple[Callable[[Tensor], Tensor], ...] = ()


class LeanBlocks:
    """Blocks ``0..n_layers-1`` of a TransformerBridge as plain tensor code (see the module docstring)."""

    #: attention kernels the forward may use on CUDA (None: PyTorch's choice). PyTorch picks cuDNN's for half
    #: precision with a mask, and cuDNN builds a plan for each new shape; the edge circuit's forwards come in many
    #: shapes. H100, bfloat16, SmolLM2's architecture to layer 23: a first circuit stage 4.97 s with cuDNN, 2.07 s
    #: with these (MATH is chosen); a second one 0.58 s and 0.71 s (docs/performance.md)
    sdpa_backends: tuple[str, ...] | None = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")

    @classmethod
    def attention_kernels(cls) -> list[Any] | None:
        """``sdpa_backends`` as ``torch.nn.attention.SDPBackend`` members (None: PyTorch's choice)."""
        if not cls.sdpa_backends:
            return None
        from torch.nn.attention import SDPBackend

        return [getattr(SDPBackend, name) for name in cls.sdpa_backends]

    def __init__(self, engine: Any, n_layers: int, *, per_head: bool = True):
        """Blocks ``0..n_layers-1``. ``per_head=False`` keeps no per-head weights (no ``reader``/``writer``): the
        model's own projections only, so the blocks hold no copy of any weight (the runner's head edits)."""
        reason = lean_unsupported(engine)
        if reason is not None:
            raise ConfigError(f"the lean forward cannot run this model: {reason}.")
        model = engine.model
        self.hf = model.original_model
        self.arch = self.hf.config.model_type
        self.n_layers = int(n_layers)
        if not 1 <= self.n_layers <= len(model.blocks):
            raise ConfigError(f"the lean forward runs 1..{len(model.blocks)} blocks, not {n_layers}.")
        self.per_head = per_head

        def w(t: Tensor | None) -> Tensor | None:
            return None if t is None or not per_head else t.detach()

        self.layers = []
        for b in list(model.blocks)[: self.n_layers]:
            a = b.attn
            # (bridge properties, each a new tensor: not read without per_head)
            heads = tuple(t.detach() for t in (a.W_Q, a.W_K, a.W_V, a.W_O)) if per_head else (None,) * 4
            self.layers.append(_Layer(b.ln1.original_component, b.ln2.original_component, b.mlp.original_component,
                                      *heads, w(getattr(a, "b_Q", None)),
                                      w(getattr(a, "b_K", None)), w(getattr(a, "b_V", None)),
                                      float(a.original_component.scaling),
                                      _o_proj(a.original_component), getattr(a.original_component, "c_attn", None),
                                      _split_proj(a.original_component)))
        dims = engine.dims
        self.n_heads, self.n_kv_heads = int(dims.n_heads), int(dims.n_kv_heads)
        self.d_model, self.d_head = int(dims.d_model), int(dims.d_head)
        split = [self.n_heads, self.n_kv_heads, self.n_kv_heads]
        for ly in self.layers:  # q, k and v heads stacked (one matmul when every input is per head); W_Q/W_K/W_V
            if per_head:  # and b_Q/b_K/b_V become views of it, not copies
                ly.W_QKV = torch.cat([ly.W_Q, ly.W_K, ly.W_V])
                ly.W_Q, ly.W_K, ly.W_V = ly.W_QKV.split(split)
                if ly.b_Q is not None:
                    ly.b_QKV = torch.cat([ly.b_Q, ly.b_K, ly.b_V])
                    ly.b_Q, ly.b_K, ly.b_V = ly.b_QKV.split(split)
            ly.norm1, ly.norm2 = _norm_fn(ly.ln1), _norm_fn(ly.ln2)
            ly.mlp_fn, ly.o_fn = _mlp_fn(ly.mlp), _linear_fn(ly.o_proj)
            ly.qkv_fns = (_linear_fn(ly.qkv),) if ly.qkv is not None else tuple(_linear_fn(m) for m in ly.qkv_split)
        rope = self.arch in ROPE_ARCHS
        self.rotary = getattr(getattr(self.hf, "model", None), "rotary_emb", None) if rope else None
        self.softmax_fp32 = rope
        # a forward's mask and rotary tables, by (start, positions, dtype, device): the same few shapes recur
        # through a circuit search (the tables of a RoPE that Hugging Face updates with the length, "dynamic" and
        # "longrope", depend on more than that: not kept)
        self._geometry: dict[tuple, tuple] = {}
        rope_type = str(getattr(self.rotary, "rope_type", ""))
        self._keep_geometry = not any(kind in rope_type for kind in ("dynamic", "longrope"))

    def embed(self, tokens: Int[Tensor, "rows pos"], start: int = 0) -> Float[Tensor, "rows pos d_model"]:
        """The residual entering block 0 for ``tokens`` at positions ``start..``: the model's own token embedding,
        plus GPT-2's learned position embedding (Llama's positions enter through RoPE)."""
        if self.arch == "gpt2":
            tr = self.hf.transformer
            pos = torch.arange(start, start + tokens.shape[1], device=tokens.device)
            return tr.wte(tokens) + tr.wpe(pos)[None]
        return self.hf.model.embed_tokens(tokens)

    @staticmethod
    def _per_head(x: Float[Tensor, "rows pos slots d_model"], W: Float[Tensor, "slots d_model d_head"],
                  b: Tensor | None) -> Float[Tensor, "slots rows pos d_head"]:
        """Each slot's own input through its own weights: one batched matmul over the slots (slot-major)."""
        return LeanBlocks._per_head_sm(x.permute(2, 0, 1, 3), W, b)

    @staticmethod
    def _per_head_sm(x: Float[Tensor, "slots rows pos d_model"], W: Float[Tensor, "slots d_model d_head"],
                     b: Tensor | None) -> Float[Tensor, "slots rows pos d_head"]:
        """:meth:`_per_head` of a slot-major input (no copy when it is contiguous)."""
        S, n, t = x.shape[:3]
        out = torch.bmm(x.reshape(S, n * t, -1), W).view(S, n, t, -1)
        return out if b is None else out + b[:, None, None, :]

    def _tables(self, resid: Tensor, start: int, t: int) -> tuple[Tensor | None, Tensor | None, tuple | None]:
        """A forward's attention masks (query i at absolute position start + i sees keys 0..start + i; boolean, and
        additive in the residual's dtype) and rotary ``(cos, signed sin)``, kept per shape (see ``_geometry``)."""
        key = (start, t, resid.dtype, resid.device)
        got = self._geometry.get(key)
        if got is not None:
            return got
        dev, total = resid.device, start + t
        mask = torch.ones(t, total, dtype=torch.bool, device=dev).tril(start) if t > 1 or start else None
        # sdpa turns a boolean mask into this additive one at every call: once here instead
        add = None if mask is None else \
            torch.zeros(t, total, dtype=resid.dtype, device=dev).masked_fill_(~mask, float("-inf"))
        cos_sin = None
        if self.rotary is not None:
            cos, sin = self.rotary(resid, torch.arange(start, total, device=dev)[None])
            cos_sin = (cos, _signed_sin(sin))
        got = (mask, add, cos_sin)
        if self._keep_geometry and not torch.is_inference_mode_enabled():  # (inference tensors: not for a later
            # gradient pass)
            if len(self._geometry) >= 32:
                self._geometry.clear()
            self._geometry[key] = got
        return got

    def _shared_qkv(self, ly: "_Layer", normed: Tensor, xs: dict[str, Tensor | None]) -> dict[str, Tensor]:
        """q/k/v (``[n, heads, t, d_head]``) of the sites whose input is the residual stream itself, by the model's
        own projections (so an unpatched forward is the model's, to its summation order)."""
        n, t, _ = normed.shape
        heads = lambda x: x.view(n, t, -1, self.d_head).transpose(1, 2)  # noqa: E731
        if ly.qkv is not None:  # GPT-2's joint c_attn
            return dict(zip("qkv", (heads(x) for x in ly.qkv_fns[0](normed).split(self.d_model, dim=2))))
        return {site: heads(proj(normed)) for site, proj in zip("qkv", ly.qkv_fns) if xs[site] is None}

    def forward(self, resid: Float[Tensor, "rows pos d_model"], *, start: int = 0,
                past: tuple[list[Tensor], list[Tensor]] | None = None, reader: Reader | None = None,
                writer: Writer | None = None, first: int = 0, z_edit: ZEdit | None = None, stop: int | None = None,
                tap: Tap | None = None) -> Float[Tensor, "rows pos d_model"]:
        """The residual stream after the last block, for inputs ``resid`` (the residual entering block ``first``,
        0 by default) at positions ``start..``; ``past`` holds each layer's keys and values of positions
        ``0..start-1`` (``[r, n_kv_heads, start, d_head]``, as the bridge's cache keeps them: after RoPE; indexed by
        layer) for ``r`` rows that repeat: row ``i`` of ``resid`` attends to past row ``i % r`` (the edge runner's
        circuit-major ``(c b)``). ``z_edit(layer, z)`` may replace each layer's head outputs before the output
        projection (``z`` as TransformerLens' ``hook_z``: ``[rows, pos, head, d_head]``; None keeps them).
        ``stop`` ends after block ``stop - 1`` (default: the last of these blocks). ``tap(layer, resid)`` sees the
        residual entering each block (``hook_resid_pre``)."""
        stop = self.n_layers if stop is None else int(stop)
        if not 0 <= first < stop <= self.n_layers:
            raise ConfigError(f"blocks {first}..{stop - 1} are not within these {self.n_layers} blocks.")
        if not self.per_head and (reader is not None or writer is not None):
            raise ConfigError("these lean blocks keep no per-head weights (per_head=False): no reader or writer.")
        kernels = self.attention_kernels() if resid.is_cuda else None
        if kernels:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(kernels):
                return self._forward(resid, start, past, reader, writer, first, z_edit, stop, tap)
        return self._forward(resid, start, past, reader, writer, first, z_edit, stop, tap)

    def _forward(self, resid: Tensor, start: int, past: tuple[list[Tensor], list[Tensor]] | None,
                 reader: Reader | None, writer: Writer | None, first: int, z_edit: ZEdit | None, stop: int,
                 tap: Tap | None = None) -> Tensor:
        n, t, _ = resid.shape
        mask, add_mask, cos_sin = self._tables(resid, start, t)
        gqa = self.n_kv_heads != self.n_heads
        H, Hkv = self.n_heads, self.n_kv_heads
        slots = {"q": slice(0, H), "k": slice(H, H + Hkv), "v": slice(H + Hkv, H + 2 * Hkv)}
        buf, views = None, {}
        if reader is not None and not torch.is_grad_enabled():  # (a gradient pass stacks fresh tensors instead)
            # slot-major, so the norm's output goes into the per-slot matmul without a copy; readers see
            # [rows, pos, slots, d] views of it
            buf = resid.new_empty(H + 2 * Hkv, n, t, resid.shape[-1])
            views = {site: buf[sl].permute(1, 2, 0, 3) for site, sl in slots.items()}
        for L in range(first, stop):
            ly = self.layers[L]
            if tap is not None:
                tap(L, resid)
            if buf is not None:  # readers write their inputs straight into one buffer: no copy to stack them
                whole = reader(L, "qkv", resid, buf)  # all three sites in one go, where the reader can
                xs = dict(views) if whole is buf else {site: reader(L, site, resid, views[site]) for site in "qkv"}
            else:
                xs = {site: reader(L, site, resid) if reader is not None else None for site in "qkv"}
            if all(x is not None for x in xs.values()):
                # every input per head (a patched forward, a gradient pass): one norm, one matmul, one RoPE
                in_buf = buf is not None and all(xs[site] is views[site] for site in "qkv")
                stacked = buf if in_buf else torch.cat([xs[site].permute(2, 0, 1, 3) for site in "qkv"])
                qkv = self._per_head_sm(ly.norm1(stacked), ly.W_QKV, ly.b_QKV)  # [slots, n, t, d_head]
                if cos_sin is not None:
                    if torch.is_grad_enabled():
                        qkv = torch.cat([_rope(qkv[:H + Hkv], *cos_sin), qkv[H + Hkv:]])
                    else:
                        _rope_(qkv[:H + Hkv], *cos_sin)
                q, k, v = (y.transpose(0, 1) for y in qkv.split([H, Hkv, Hkv]))  # [n, heads, t, d_head]
            else:
                full = self._shared_qkv(ly, ly.norm1(resid), xs) if any(x is None for x in xs.values()) else {}
                q, k, v = (full[site] if xs[site] is None else
                           self._per_head(ly.norm1(xs[site]), W, bias).transpose(0, 1)
                           for site, W, bias in (("q", ly.W_Q, ly.b_Q), ("k", ly.W_K, ly.b_K), ("v", ly.W_V, ly.b_V)))
                if cos_sin is not None:
                    q, k = (_rope(y, *cos_sin) for y in (q, k))  # (the tables broadcast over [n, heads, t, d])
            if past is not None:
                k, v = _with_past(past[0][L], k), _with_past(past[1][L], v)
            if self.softmax_fp32 and q.dtype == torch.float64:
                # Hugging Face's eager Llama attention takes the softmax in float32 whatever the dtype: do the same,
                # so a float64 model's lean forward is its own to float64 precision
                kk, vv = (x.repeat_interleave(self.n_heads // self.n_kv_heads, 1) for x in (k, v)) if gqa else (k, v)
                att = (q @ kk.transpose(-1, -2)) * ly.scaling
                if mask is not None:
                    att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
                z = torch.softmax(att, -1, dtype=torch.float32).to(q.dtype) @ vv
            else:
                z = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=add_mask, scale=ly.scaling,
                                                                     enable_gqa=gqa)  # [n, h, t, d_head]
            zt = z.transpose(1, 2)  # [n, t, h, d_head]: TransformerLens' hook_z
            if z_edit is not None:
                edited = z_edit(L, zt)
                zt = zt if edited is None else edited
            if writer is not None:  # each head's write: [n, t, h, d]
                heads = torch.bmm(zt.permute(2, 0, 1, 3).reshape(H, n * t, -1), ly.W_O).view(H, n, t, -1)
                writer(L, "heads", heads.permute(1, 2, 0, 3))
            # the model's own projection of all heads at once (its summation order, its bias)
            resid = resid + ly.o_fn(zt.reshape(n, t, -1))
            x = reader(L, "mlp", resid) if reader is not None else None
            out = ly.mlp_fn(ly.norm2(x if x is not None else resid))
            if writer is not None:
                writer(L, "mlp", out)
            resid = resid + out
        return resid


__all__ = ["ARCHS", "LeanBlocks", "lean_unsupported"]
