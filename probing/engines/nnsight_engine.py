"""The nnsight implementation of the engine seam (:class:`wordpos.probing.engines.Engine`).

``NNsightEngine.run`` gives the same ``(out, cache)`` as ``TLEngine.run`` for the TransformerLens hook
names the pipeline uses, on the plain Hugging Face model wrapped by nnsight:

==============================  ============================================================
hook name                       read from (module paths per architecture: :mod:`wordpos.probing.engines.archs`)
==============================  ============================================================
``blocks.L.hook_resid_pre``     input of decoder layer L
``blocks.L.attn.hook_q/k/v``    output of the q/k/v projection (or a slice of the fused one),
                                ``[batch, pos, head, d_head]`` (k, v: key/value heads), pre-rotary
``blocks.L.attn.hook_pattern``  attention probabilities returned by the eager attention kernel
``blocks.L.attn.hook_z``        input of the output projection, ``[batch, pos, head, d_head]``
``blocks.L.hook_attn_out``      output ``[0]`` of the attention module
``blocks.L.hook_resid_mid``     input of the norm before the MLP (not in parallel-attention blocks)
``blocks.L.hook_mlp_out``       output of the MLP
``blocks.L.hook_resid_post``    output of decoder layer L
==============================  ============================================================

A whole ``run`` is one nnsight trace: sites are visited in execution order, each hook's return
value is written back into the running forward (so later layers see a patch), requested sites are
saved, and the trace stops (``tracer.stop()``) as soon as the residual ``stop_at_layer`` names
exists. ``start_at_layer`` runs the embeddings on dummy token ids (zeros), *skips* the decoder
layers before it (their output is replaced, they are not computed) and feeds the given residual
into layer ``start_at_layer`` through the model's own call path, so position embeddings / rotary
and the attention mask are the real ones. See ``docs/engines.md``.
"""

from __future__ import annotations

import copy
import re
import socket
import warnings
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor

from wordpos.probing import hooks as H
from wordpos.probing.engines.archs import ArchSpec, arch_for, get_path
from wordpos.probing.engines import HookFn, ModelDims
from wordpos.probing.engines.split_inputs import PAST_DEPRECATED
from wordpos.probing.errors import ConfigError, ModelNotAvailableError

# Sites of one decoder layer, in the order a forward pass produces them.
SITE_ORDER = ("resid_pre", "q", "k", "v", "pattern", "z", "attn_out", "resid_mid", "mlp_out", "resid_post")

_SITE_RE = re.compile(r"^blocks\.(\d+)\.(?:hook_(resid_pre|resid_mid|resid_post|attn_out|mlp_out)"
                      r"|attn\.hook_(q|k|v|z|pattern))$")

SUPPORTED_HOOKS = ("blocks.L.hook_resid_pre", "blocks.L.hook_resid_mid", "blocks.L.hook_resid_post",
                   "blocks.L.hook_attn_out", "blocks.L.hook_mlp_out", "blocks.L.attn.hook_q",
                   "blocks.L.attn.hook_k", "blocks.L.attn.hook_v", "blocks.L.attn.hook_z",
                   "blocks.L.attn.hook_pattern")

REMOTE_CONNECT_TIMEOUT_S = 3.0
REMOTE_BY_VALUE = ("wordpos",)  # the namespace: wordpos.probing, .patching, .circuit and what they define


def parse_site(name: str) -> tuple[int, str]:
    """``"blocks.3.attn.hook_z"`` → ``(3, "z")``; ConfigError for names this engine does not serve."""
    m = _SITE_RE.match(name)
    if not m:
        raise ConfigError(f"the nnsight engine does not serve hook {name!r}; it serves "
                          f"{', '.join(SUPPORTED_HOOKS)}. Use the TransformerLens engine for other sites.")
    return int(m.group(1)), m.group(2) or m.group(3)


def dims_from_config(config: Any) -> ModelDims:
    """:class:`ModelDims` from a Hugging Face config (the numbers TransformerBridge reports)."""
    n_heads = config.num_attention_heads
    d_model = config.hidden_size
    return ModelDims(
        n_layers=config.num_hidden_layers,
        n_heads=n_heads,
        n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
        d_model=d_model,
        d_head=getattr(config, "head_dim", None) or d_model // n_heads,
        n_ctx=config.max_position_embeddings,
        d_vocab=config.vocab_size,
        parallel_attn_mlp=arch_for(config).parallel_attn_mlp,
    )


# --------------------------------------------------------------------------------------------- remote


def check_remote_ready(timeout: float = REMOTE_CONNECT_TIMEOUT_S) -> str:
    """Raise :class:`ModelNotAvailableError` unless an NDIF API key is configured and the NDIF host
    accepts a TCP connection within ``timeout`` seconds. Returns the host URL."""
    from nnsight import CONFIG

    if not CONFIG.API.APIKEY:
        raise ModelNotAvailableError(
            "remote=True runs the model on NDIF and needs an NDIF API key, but none is set. Get one at "
            "https://login.ndif.us, then `export NDIF_API_KEY=...` or run once "
            "`python -c \"import nnsight; nnsight.CONFIG.set_default_api_key('...')\"` (saved to "
            "~/.config/nnsight/config.yaml). Or run locally with remote=False."
        )
    host = CONFIG.API.HOST
    url = urlparse(host if "://" in host else f"https://{host}")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        raise ModelNotAvailableError(
            f"remote=True but the NDIF host {host} cannot be reached ({e}). Check the network (or the "
            "NDIF_HOST setting), or run locally with remote=False on a local copy of the model."
        ) from None
    return host


# ---------------------------------------------------------------------------- model construction


def _bridge_child(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """The child a Hugging Face path segment ``name`` names inside a TransformerBridge tree: the
    child itself, a bridge component whose ``.name`` is ``name`` (GPT-2's ``c_attn`` lives on as
    ``attn.qkv``), or the same inside the wrapped ``_original_component``."""
    while module is not None:
        children = module._modules
        if children.get(name) is not None:
            return children[name]
        for child in children.values():
            if child is not None and getattr(child, "name", None) == name and "_original_component" in child._modules:
                return child
        module = children.get("_original_component")
    return None


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    while module._modules.get("_original_component") is not None:
        module = module._modules["_original_component"]
    return module


def hf_model_from_bridge(bridge: Any) -> torch.nn.Module:
    """A plain Hugging Face ``*ForCausalLM`` (eager attention) whose parameters and buffers *are* the
    TransformerBridge's tensors: no weights are loaded or copied.

    TransformerBridge rebuilds the module tree of ``bridge.original_model`` in place (GPT-2's
    ``c_attn`` becomes ``attn.qkv``, each module sits in an ``_original_component``), so that tree no
    longer runs as Hugging Face code. This builds the architecture on the meta device and points
    each of its parameters/buffers at the bridge's tensor for the same Hugging Face path.
    """
    from transformers import AutoModelForCausalLM

    original = bridge.original_model
    config = copy.deepcopy(original.config)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    for path, module in hf.named_modules():
        owned = [k for k, v in module._parameters.items() if v is not None]
        owned_buffers = [k for k, v in module._buffers.items() if v is not None]
        if not owned and not owned_buffers:
            continue
        src: torch.nn.Module | None = original
        for part in path.split(".") if path else []:
            src = _bridge_child(src, part)
            if src is None:
                break
        src = _unwrap(src) if src is not None else None
        if src is None or type(src) is not type(module):
            raise ConfigError(
                f"cannot find the Hugging Face module {path!r} ({type(module).__name__}) inside this "
                f"TransformerBridge (found {type(src).__name__ if src is not None else 'nothing'}). Build the "
                "nnsight engine from the model's directory instead: NNsightEngine.from_model('path/to/dir')."
            )
        for k in owned:
            module._parameters[k] = src._parameters[k]
        for k in owned_buffers:
            module._buffers[k] = src._buffers[k]
    left = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if left:
        raise ConfigError(f"tensors {left[:5]} of the rebuilt Hugging Face model have no counterpart in the "
                          "TransformerBridge; build the nnsight engine from the model directory instead.")
    hf.eval()
    return hf


def _tokenizer_for(source: str) -> Any:
    """The tokenizer ``probing.load_model`` would give ``source`` (the offline GPT-2 one where a
    GPT-2-family directory has none)."""
    from wordpos.probing.models.registry import _needs_gpt2_tokenizer

    if _needs_gpt2_tokenizer(source):
        from wordpos.probing.models.tokenizers import gpt2_tokenizer

        return gpt2_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _wrap(hf: torch.nn.Module, tokenizer: Any) -> Any:
    """nnsight ``TransformersModel`` (what the deprecated ``LanguageModel`` name is) over ``hf``. The
    tokenizer is copied: nnsight sets ``padding_side='left'`` and a pad token on the one it gets."""
    from nnsight import TransformersModel

    return TransformersModel(hf, tokenizer=copy.deepcopy(tokenizer), task="text-generation")


# ------------------------------------------------------------------------------------------ engine


class NNsightEngine:
    """The nnsight implementation of :class:`wordpos.probing.engines.Engine`.

    ``model`` is an nnsight ``LanguageModel`` / ``TransformersModel`` around a Hugging Face causal LM
    whose ``config.model_type`` is in :data:`wordpos.probing.engines.archs.ARCHS`. Use :meth:`from_model` to build one
    from a TransformerBridge (sharing its weights), a local directory or a hub name. ``remote=True``
    runs every trace on NDIF (see :func:`check_remote_ready`).
    """

    def __init__(self, model: Any, *, tokenizer: Any = None, name: str | None = None, remote: bool | str = False):
        if remote is True:
            check_remote_ready()
        self.model = model
        self.remote = remote
        hf = model._module
        self.config = hf.config
        self.arch: ArchSpec = arch_for(self.config)
        self.dims = dims_from_config(self.config)
        self.tokenizer = tokenizer if tokenizer is not None else model.tokenizer
        try:
            self.device = next(hf.parameters()).device
        except StopIteration:  # pragma: no cover
            self.device = torch.device("cpu")
        if self.device.type == "meta":  # a remote (not dispatched) model: inputs stay on the CPU
            self.device = torch.device("cpu")
        self._sourced: set[int] = set()
        self.name = name or str(getattr(model, "repo_id", None) or getattr(self.config, "_name_or_path", "unknown"))

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def from_model(cls, source: Any, *, device: str | torch.device | None = None, remote: bool | str = False,
                   dtype: torch.dtype | str | None = None) -> "NNsightEngine":
        """Build from a TransformerBridge (reusing its weights), an nnsight model, a Hugging Face
        ``PreTrainedModel``, a local Hugging Face directory, a built-in name or a hub name.

        ``dtype`` (``"float32"`` default, ``"bfloat16"``, ``"float16"``; validated by
        :func:`wordpos.probing.models.resolve_dtype`) is the dtype a directory or name is loaded in; a model
        passed in already loaded keeps its own.

        With ``remote=True`` a hub name is wrapped without loading any weights (they live on NDIF);
        the NDIF key and host are checked before anything else happens.
        """
        from wordpos.probing.models.registry import resolve_dtype

        dtype = resolve_dtype(dtype)  # a bad dtype fails before anything is loaded or contacted
        if remote is True:
            check_remote_ready()
        if isinstance(source, NNsightEngine):
            return source
        if hasattr(source, "run") and hasattr(getattr(source, "model", None), "original_model"):
            source = source.model  # a TLEngine: use its bridge
        if type(source).__name__ in ("LanguageModel", "TransformersModel"):
            return cls(source, remote=remote)
        if hasattr(source, "original_model") and hasattr(source, "run_with_hooks"):
            from wordpos.probing.models import model_name

            if remote is True:
                raise ConfigError("remote=True needs a hub model name (the weights live on NDIF), not a loaded "
                                  "TransformerBridge.")
            hf = hf_model_from_bridge(source)
            return cls(_wrap(hf, source.tokenizer), tokenizer=source.tokenizer, name=model_name(source),
                       remote=remote)
        if isinstance(source, torch.nn.Module):
            if getattr(source.config, "_attn_implementation", "eager") != "eager":
                source.set_attn_implementation("eager")
            tok = _tokenizer_for(source.config._name_or_path)
            return cls(_wrap(source, tok), tokenizer=tok, remote=remote)
        key = str(source)
        if remote:
            from nnsight import TransformersModel

            model = TransformersModel(key, task="text-generation", attn_implementation="eager")
            return cls(model, name=key, remote=remote)
        return cls._from_dir(key, device=device, dtype=dtype)

    @classmethod
    def _from_dir(cls, name_or_dir: str, device: str | torch.device | None = None,
                  dtype: torch.dtype | str | None = None) -> "NNsightEngine":
        from transformers import AutoModelForCausalLM

        from wordpos.probing.models import default_device, resolve_dtype, resolve_model_dir

        source = resolve_model_dir(name_or_dir)
        try:
            hf = AutoModelForCausalLM.from_pretrained(source, attn_implementation="eager",
                                                      dtype=resolve_dtype(dtype))
        except OSError as e:
            raise ModelNotAvailableError(f"Could not load {name_or_dir!r} ({e}). Pass a local Hugging Face "
                                         "directory written by save_pretrained().") from e
        hf = hf.to(device or default_device()).eval()
        tok = _tokenizer_for(source)
        return cls(_wrap(hf, tok), tokenizer=tok, name=str(name_or_dir))

    # --------------------------------------------------------------------------------- running
    def _plan(self, hooks: Sequence[tuple[str, HookFn]], cache: Sequence[str], first: int, end: int,
              ) -> dict[int, dict[str, tuple[str, list[HookFn], bool]]]:
        """Per layer in ``[first, end)``: site → (hook name, hook fns, cache it?). Sites outside the
        layers that run are dropped, as TransformerLens drops hooks that never fire."""
        plan: dict[int, dict[str, tuple[str, list[HookFn], bool]]] = {}
        n = self.dims.n_layers

        def entry(name: str) -> tuple[str, list[HookFn], bool] | None:
            layer, site = parse_site(name)
            if not 0 <= layer < n:
                raise ConfigError(f"hook {name!r}: layer {layer} is out of range 0..{n - 1}.")
            if site == "resid_mid" and self.arch.ln2 is None:
                raise ConfigError(f"hook {name!r}: {self.config.model_type} runs attention and MLP in parallel, "
                                  "so there is no resid_mid.")
            if site == "pattern" and getattr(self.config, "_attn_implementation", "eager") != "eager":
                raise ConfigError(f"hook {name!r} needs eager attention, but the model uses "
                                  f"{self.config._attn_implementation!r}; load it with attn_implementation='eager' "
                                  "(NNsightEngine.from_model does).")
            if not first <= layer < end:
                return None
            slot = plan.setdefault(layer, {})
            return slot.setdefault(site, (name, [], False))

        for name, fn in hooks:
            e = entry(name)
            if e is not None:
                e[1].append(fn)
        for name in cache:
            e = entry(name)
            if e is not None:
                layer, site = parse_site(name)
                plan[layer][site] = (e[0], e[1], True)
        return plan

    def run(self, inputs: Tensor, *, hooks: Sequence[tuple[str, HookFn]] = (), cache: Sequence[str] = (),
            stop_at_layer: int | None = None, start_at_layer: int | None = None,
            past: Any = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Same contract as :meth:`wordpos.probing.engines.Engine.run` (see ``TLEngine.run``), in one nnsight
        trace. ``past``: a :class:`~wordpos.probing.engines.split_inputs.PrefixKV` (the positions before
        ``inputs``), or a Hugging Face cache the forward extends in place (how
        :func:`~wordpos.probing.engines.split_inputs.cached_runs` keeps a run's keys/values); local models only."""
        hf_cache = None
        if past is not None:
            from wordpos.probing.engines.split_inputs import PrefixKV

            if self.remote:
                raise ConfigError("a remote (NDIF) model is not sent cached prefix keys/values (past=); run without "
                                  "past, or locally.")
            hf_cache = past.cache_for(inputs) if isinstance(past, PrefixKV) else past
        n = self.dims.n_layers
        if stop_at_layer is not None and not 0 <= stop_at_layer <= n:
            raise ConfigError(f"stop_at_layer={stop_at_layer} is out of range 0..{n}.")
        if start_at_layer is not None:
            if not 0 <= start_at_layer < n:
                raise ConfigError(f"start_at_layer={start_at_layer} is out of range 0..{n - 1}.")
            if stop_at_layer is not None and stop_at_layer < start_at_layer:
                raise ConfigError(f"stop_at_layer={stop_at_layer} is before start_at_layer={start_at_layer}.")
            if inputs.ndim != 3 or inputs.shape[-1] != self.dims.d_model:
                raise ConfigError(f"start_at_layer={start_at_layer} takes the residual stream "
                                  f"[batch, pos, {self.dims.d_model}], got shape {tuple(inputs.shape)}.")
            resid_in = inputs.to(self.device)
            ids = torch.zeros(inputs.shape[:2], dtype=torch.long, device=self.device)
        else:
            if inputs.ndim != 2 or inputs.is_floating_point():
                raise ConfigError(f"expected token ids [batch, pos], got {inputs.dtype} of shape "
                                  f"{tuple(inputs.shape)} (pass start_at_layer to feed a residual stream).")
            resid_in = None
            ids = inputs.to(self.device)
        first = start_at_layer or 0
        end = n if stop_at_layer is None else stop_at_layer
        plan = self._plan(hooks, cache, first, end)
        edge = H.resid(stop_at_layer, "resid_pre") if stop_at_layer is not None and stop_at_layer < n else None
        want_edge = edge is not None and edge in cache

        for L, sites in plan.items():
            if "pattern" in sites and L not in self._sourced:
                # source-instrument the attention forward before the trace: doing it mid-forward is too late
                getattr(get_path(get_path(self.model, self.arch.layers)[L], self.arch.attn).source, self.arch.attn_fn)
                self._sourced.add(L)
        kwargs: dict[str, Any] = {}
        if self.remote:
            import nnsight

            # NDIF does not have this project installed: ship its code (and hook functions defined in
            # it) by value. Hooks from elsewhere must be importable on the server or defined in __main__.
            for package in REMOTE_BY_VALUE:
                nnsight.register(package)
            kwargs["remote"] = self.remote
        model = self.model
        with warnings.catch_warnings():
            if hf_cache is not None:
                # nnsight assumes no attention mask beside a cache, so the model builds one over prefix and inputs;
                # positions (GPT-2's embeddings, RoPE) continue from the cache's length
                kwargs["past_key_values"] = hf_cache
                warnings.filterwarnings("ignore", message=PAST_DEPRECATED)
            with model.trace(ids, **kwargs) as tracer:
                result = {"cache": {}, "out": None}
                nnsight_save(result)
                interleave(model, tracer, self.arch, self.dims, plan, result, first=first, end=end,
                           stop_at_layer=stop_at_layer, resid_in=resid_in, want_edge=want_edge, edge=edge)
        out = result["out"]
        if stop_at_layer is None and (out is None or out.shape[-1] != self.dims.d_vocab):
            raise RuntimeError("expected logits from a full forward pass")
        return out, result["cache"]


def nnsight_save(value: Any) -> Any:
    import nnsight

    return nnsight.save(value)


# ----------------------------------------------------------------------------- inside the trace
#
# Everything below runs inside the nnsight trace (locally: in nnsight's worker, interleaved with the
# forward pass; remotely: on NDIF, shipped by value through nnsight.register). Envoy reads park until
# the model produces the value, so sites must be visited in execution order (SITE_ORDER).


def _apply(name: str, act: Tensor, fns: list[HookFn]) -> tuple[Tensor, bool]:
    changed = False
    for fn in fns:
        new = fn(act, name)
        if new is not None:
            act, changed = new, True
    return act, changed


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, tuple) else value


def _with_first(old: Any, new: Tensor) -> Any:
    return (new, *old[1:]) if isinstance(old, tuple) else new


def _edit_first_output(env: Any, site: tuple[str, list[HookFn], bool], store: dict[str, Tensor]) -> None:
    """Run a site's hooks on a module's (first) output, write it back if a hook changed it, and cache it."""
    name, fns, keep = site
    raw = env.output
    act, changed = _apply(name, _first(raw), fns)
    if changed:
        env.output = _with_first(raw, act)
    if keep:
        store[name] = act


def _heads(x: Tensor, n: int) -> Tensor:
    return x.view(*x.shape[:-1], n, x.shape[-1] // n)


def _repeat_kv(v: Tensor, n_heads: int) -> Tensor:
    groups = n_heads // v.shape[1]
    return v if groups == 1 else v.repeat_interleave(groups, dim=1)


def _qkv_sites(arch: ArchSpec, dims: ModelDims, layer: Any, sites: dict, store: dict) -> None:
    nq, nkv, dh = dims.n_heads, dims.n_kv_heads, dims.d_head
    if arch.qkv_layout == "split":
        for which, path in (("q", arch.q), ("k", arch.k), ("v", arch.v)):
            if which not in sites:
                continue
            name, fns, keep = sites[which]
            env = get_path(layer, path)
            raw = env.output
            act, changed = _apply(name, _heads(raw, nq if which == "q" else nkv), fns)
            if changed:
                env.output = act.reshape(*act.shape[:-2], -1)
            if keep:
                store[name] = act
        return
    env = get_path(layer, arch.qkv)
    raw = env.output
    if arch.qkv_layout == "concat":
        q, k, v = raw.split([nq * dh, nkv * dh, nkv * dh], dim=-1)
        parts = {"q": _heads(q, nq), "k": _heads(k, nkv), "v": _heads(v, nkv)}
    else:  # per_head: [..., head, (q k v) d_head]
        per = _heads(raw, nq)
        parts = {"q": per[..., :dh], "k": per[..., dh:2 * dh], "v": per[..., 2 * dh:]}
    any_changed = False
    for which in ("q", "k", "v"):
        if which not in sites:
            continue
        name, fns, keep = sites[which]
        parts[which], changed = _apply(name, parts[which], fns)
        any_changed = any_changed or changed
        if keep:
            store[name] = parts[which]
    if any_changed:
        if arch.qkv_layout == "concat":
            env.output = torch.cat([p.reshape(*p.shape[:-2], -1) for p in (parts["q"], parts["k"], parts["v"])], -1)
        else:
            env.output = torch.cat([parts["q"], parts["k"], parts["v"]], -1).reshape(raw.shape)


def interleave(model: Any, tracer: Any, arch: ArchSpec, dims: ModelDims, plan: dict, result: dict, *,
               first: int, end: int, stop_at_layer: int | None, resid_in: Tensor | None, want_edge: bool,
               edge: str | None) -> None:
    """Visit the planned sites layer by layer, apply hooks, fill ``result`` and stop early."""
    store = result["cache"]
    layers = get_path(model, arch.layers)
    n = dims.n_layers
    if resid_in is not None:
        for i in range(first):  # not computed: their output is replaced by the residual we start from
            layers[i].skip(resid_in)
    resid_post = None
    for L in range(first, end):
        layer = layers[L]
        sites = plan.get(L, {})
        if L == first and resid_in is not None:
            h = resid_in
            if "resid_pre" in sites:
                name, fns, keep = sites["resid_pre"]
                h, _ = _apply(name, h, fns)
                if keep:
                    store[name] = h
            layer.input = h
        elif "resid_pre" in sites:
            name, fns, keep = sites["resid_pre"]
            h, changed = _apply(name, layer.input, fns)
            if changed:
                layer.input = h
            if keep:
                store[name] = h
        if any(s in sites for s in ("q", "k", "v")):
            _qkv_sites(arch, dims, layer, sites, store)
        if "pattern" in sites:
            name, fns, keep = sites["pattern"]
            src = getattr(get_path(layer, arch.attn).source, arch.attn_fn)
            if fns:
                args, kw = src.inputs
                value = args[3] if len(args) > 3 else kw["value"]
                z_heads, pattern = src.output
                pattern, _ = _apply(name, pattern, fns)
                # recompute the kernel's output from the (possibly edited, possibly in place) pattern
                z_new = torch.matmul(pattern.to(value.dtype), _repeat_kv(value, dims.n_heads)).transpose(1, 2)
                src.output = (z_new, pattern)
            else:
                pattern = src.output[1]
            if keep:
                store[name] = pattern
        if "z" in sites:
            name, fns, keep = sites["z"]
            env = get_path(layer, arch.o_proj)
            z, changed = _apply(name, _heads(env.input, dims.n_heads), fns)
            if changed:
                env.input = z.reshape(*z.shape[:-2], -1)
            if keep:
                store[name] = z
        if "attn_out" in sites:
            _edit_first_output(get_path(layer, arch.attn), sites["attn_out"], store)
        if "resid_mid" in sites:
            name, fns, keep = sites["resid_mid"]
            env = get_path(layer, arch.ln2)
            act, changed = _apply(name, env.input, fns)
            if changed:
                env.input = act
            if keep:
                store[name] = act
        if "mlp_out" in sites:
            _edit_first_output(get_path(layer, arch.mlp), sites["mlp_out"], store)
        if "resid_post" in sites or (L == n - 1 and stop_at_layer == n):
            raw = layer.output
            act = _first(raw)
            if "resid_post" in sites:
                name, fns, keep = sites["resid_post"]
                act, changed = _apply(name, act, fns)
                if changed:
                    layer.output = _with_first(raw, act)
                if keep:
                    store[name] = act
            resid_post = act
    if stop_at_layer is None:
        result["out"] = model.output.logits
        return
    if stop_at_layer == n:
        result["out"] = resid_post
    else:
        h = layers[stop_at_layer].input if not (resid_in is not None and stop_at_layer == first) else resid_in
        result["out"] = h
        if want_edge:
            store[edge] = h
    tracer.stop()
