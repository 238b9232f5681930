"""Where each activation site lives in a Hugging Face model, per architecture.

The nnsight engine (:mod:`wordpos.probing.engines.nnsight_engine`) reads and writes TransformerLens-named sites
(``blocks.L.attn.hook_z``, ...) on the plain Hugging Face module tree. The module paths differ per
architecture (GPT-2's ``transformer.h[L].attn.c_proj``, Llama's ``model.layers[L].self_attn.o_proj``,
GPT-NeoX's ``gpt_neox.layers[L].attention.dense``), so they live in one table, :data:`ARCHS`, keyed by
the Hugging Face ``config.model_type``. Adding an architecture is one :class:`ArchSpec` entry; see
``docs/engines.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from wordpos.probing.errors import ConfigError

QKVLayout = Literal["split", "concat", "per_head"]


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one architecture. ``layers`` is relative to the ``*ForCausalLM`` root; every
    other path is relative to one decoder layer (``layers[L]``).

    Sites and where they are read:

    - ``hook_resid_pre``: the layer's first input; ``hook_resid_post``: its output (``[0]`` if a tuple).
    - ``hook_resid_mid``: the input of ``ln2`` (the norm in front of the MLP). ``None`` for parallel
      attention/MLP blocks (GPT-NeoX), which have no resid_mid.
    - ``hook_attn_out``: ``attn``'s output ``[0]``; ``hook_mlp_out``: ``mlp``'s output.
    - ``hook_z``: the input of ``o_proj``, viewed as ``[batch, pos, head, d_head]``.
    - ``hook_q/k/v``: the outputs of ``q``/``k``/``v`` (``qkv_layout="split"``), or slices of the
      fused ``qkv`` output: ``"concat"`` is ``[q | k | v]`` along the last axis (GPT-2's ``c_attn``),
      ``"per_head"`` is ``[head, (q k v), d_head]`` (GPT-NeoX's ``query_key_value``). These are the
      projections *before* rotary embeddings, as TransformerLens' ``hook_q``/``hook_k`` are.
    - ``hook_pattern``: output ``[1]`` of the attention kernel call inside ``attn.forward``, reached
      through nnsight's source view as ``attn_fn`` (eager attention only).
    """

    model_type: str
    layers: str
    attn: str
    o_proj: str
    mlp: str
    ln2: str | None
    qkv_layout: QKVLayout = "split"
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    attn_fn: str = "attention_interface_1"
    parallel_attn_mlp: bool = False

    def __post_init__(self) -> None:
        fused = self.qkv_layout in ("concat", "per_head")
        if fused and self.qkv is None or not fused and None in (self.q, self.k, self.v):
            raise ValueError(f"ArchSpec({self.model_type!r}): qkv_layout={self.qkv_layout!r} needs "
                             f"{'qkv' if fused else 'q, k and v'}")


_LLAMA_LIKE = dict(layers="model.layers", attn="self_attn", o_proj="self_attn.o_proj", mlp="mlp",
                   ln2="post_attention_layernorm", q="self_attn.q_proj", k="self_attn.k_proj",
                   v="self_attn.v_proj")

ARCHS: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in [
        ArchSpec("gpt2", layers="transformer.h", attn="attn", o_proj="attn.c_proj", mlp="mlp", ln2="ln_2",
                 qkv_layout="concat", qkv="attn.c_attn"),
        ArchSpec("llama", **_LLAMA_LIKE),
        ArchSpec("mistral", **_LLAMA_LIKE),
        ArchSpec("qwen2", **_LLAMA_LIKE),
        ArchSpec("gpt_neox", layers="gpt_neox.layers", attn="attention", o_proj="attention.dense", mlp="mlp",
                 ln2=None, qkv_layout="per_head", qkv="attention.query_key_value", parallel_attn_mlp=True),
    ]
}


def arch_for(config: Any) -> ArchSpec:
    """The :class:`ArchSpec` of a Hugging Face config (by ``config.model_type``)."""
    model_type = getattr(config, "model_type", None)
    spec = ARCHS.get(model_type)  # type: ignore[arg-type]
    if spec is None:
        raise ConfigError(
            f"the nnsight engine has no module-path table entry for model_type {model_type!r}; known: "
            f"{', '.join(sorted(ARCHS))}. Add an ArchSpec to wordpos.probing.engines.archs.ARCHS (see docs/engines.md) "
            "or use the TransformerLens engine (engine='tl')."
        )
    if spec.parallel_attn_mlp is False and getattr(config, "use_parallel_residual", False):
        raise ConfigError(f"model_type {model_type!r} with use_parallel_residual=True is not in the table.")
    if model_type == "gpt_neox" and not getattr(config, "use_parallel_residual", True):
        # sequential GPT-NeoX: resid_mid is the input of post_attention_layernorm
        from dataclasses import replace

        spec = replace(spec, ln2="post_attention_layernorm", parallel_attn_mlp=False)
    return spec


def get_path(root: Any, path: str) -> Any:
    """Follow a dotted path (``"model.layers"``, ``"self_attn.o_proj"``) from ``root``; numeric parts
    index."""
    obj = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
