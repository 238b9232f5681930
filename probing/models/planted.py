"""The planted-circuit model: a 2-layer GPT-2 whose weights are set by hand, so its word-counting circuit is
known exactly. It is the ground truth the tests check every method against (see ``docs/planted.md``).

It is a plain ``GPT2LMHeadModel`` (LayerNorm, GELU MLP, learned absolute positions, GPT-2's real tokenizer,
vocabulary 50257, ``n_positions`` 128) saved with ``save_pretrained``, so Hugging Face transformers,
TransformerLens' ``TransformerBridge`` and nnsight run it unmodified. Nothing is trained.

**Residual layout** (d_model 64). Dimensions 0-31 carry features, 32-63 their negatives (``MIRROR``), so the
mean over dimensions is always exactly 0 and LayerNorm only divides by the norm. A constant feature
(``CONST`` = 1000 in dimension 0) dominates that norm, and two padding features make the norm of every
token embedding and of every position embedding exactly constant, so the first LayerNorm of layer 0 is an
exact fixed scaling; the LayerNorm weights undo it (features are read back unscaled, the constant as 1).
Later LayerNorms see the heads' outputs too and deviate from the fixed scaling by < 1e-4 (relative).

==== ======================================================================================
dims feature
==== ======================================================================================
0    constant 1000 (1 after LayerNorm)
1    token starts a word (its BPE string starts with "Ġ", a space)
2    token is an anchor: ".", "," or "\\n" (or a token made only of these characters, e.g. ".\\n")
3    token is BOS (``<|endoftext|>``, 50256)
4    token padding: 1 - (1 + 2 + 3), so every token embedding has the same norm
5    position p / 128           (position embedding)
6    (p / 128)^2                (position embedding)
7    position padding: sqrt(2 - p̂² - p̂⁴), so every position embedding has the same norm
8    *count*: written by the counter 0.2
9    *absolute position*: written by 0.1
10   *previous token starts a word*: written by 0.0
11   *count, relayed*: written by the receiver 1.1
==== ======================================================================================

**Heads** (every other head has zero weights: uniform attention, zero output; MLPs are zero).

* **0.2, the counter** (the hypothesis, literally): attention score 3 on anchors, 1 on word-initial tokens,
  -20 elsewhere (BOS included); its value is "starts a word", so it writes
  ``10 · n·e / (a·e³ + n·e)`` to *count*, with ``n`` word-initial and ``a`` anchor tokens so far. With a
  fixed prefix this is monotone in the word index, whatever the words' token lengths.
* **0.1, absolute-position distractor**: uniform attention over all previous tokens, value p̂, so it writes
  ``5 · mean(p̂' for p' ≤ p) = 5 · p / 256``: linear in the token's absolute position.
* **0.0, previous-token distractor**: score ``-16 · (p - 1 - p')²`` (from the p̂, p̂² position features),
  i.e. attends to position p - 1; copies "starts a word" into *previous token starts a word*.
* **1.1, the receiver**: score ``30 · p'``, i.e. attends to its own position; its value reads *count*
  (value composition with 0.2) and writes *count, relayed*.

So the counter reaches the probe on ``blocks.1.hook_resid_post`` directly (dim 8) and through 1.1 (dim 11):
the planted edges are ``0.2 → probe``, ``0.2 → 1.1`` (via v) and ``1.1 → probe``.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wordpos.probing.errors import CorruptFileError
from wordpos.probing.io import atomic_dir
from wordpos.probing.models import manifest
from wordpos.probing.models.cache import cache_root
from wordpos.probing.models.manifest import MANIFEST

VERSION = 2
D_MODEL, N_HEAD, N_LAYER, N_POS = 64, 4, 2, 128
D_HEAD = D_MODEL // N_HEAD
MIRROR = D_MODEL // 2
CONST = 1000.0
COUNT_SCALE, ABSPOS_SCALE = 10.0, 5.0
PREV_SHARPNESS, SELF_SHARPNESS = 16.0, 30.0  # score gap per position step of 0.0 and 1.1
COUNTER_SCORES = {"anchor": 3.0, "space": 1.0, "other": -20.0}
DIM = {"const": 0, "space": 1, "anchor": 2, "bos": 3, "tok_pad": 4, "pos": 5, "pos2": 6, "pos_pad": 7,
       "count": 8, "abspos": 9, "prev_space": 10, "relay": 11}
ANCHOR_CHARS = frozenset(".,\n")
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class PlantedGroundTruth:
    """What was planted: heads as ``(layer, head)``, edges as ``(sender "L.H", receiver "L.H" | "probe",
    via "q" | "k" | "v" | "direct")``; ``"direct"`` edges write into the probed residual
    ``blocks.{probe_layer}.hook_resid_post``."""

    counter: tuple[int, int] = (0, 2)
    distractors: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"abs_position": (0, 1), "prev_token": (0, 0)})
    receivers: tuple[tuple[int, int], ...] = ((1, 1),)
    edges: tuple[tuple[str, str, str], ...] = (("0.2", "probe", "direct"), ("0.2", "1.1", "v"),
                                               ("1.1", "probe", "direct"))
    probe_layer: int = N_LAYER - 1
    n_layers: int = N_LAYER
    n_heads: int = N_HEAD
    d_model: int = D_MODEL
    n_positions: int = N_POS
    features: dict[str, int] = field(default_factory=lambda: dict(DIM))

    @property
    def circuit_heads(self) -> list[str]:
        return sorted({f"{L}.{h}" for L, h in (self.counter, *self.receivers)})

    @property
    def head_edges(self) -> list[tuple[str, str, str]]:
        """Edges between heads (excluding the direct edges to the probe)."""
        return [e for e in self.edges if e[1] != "probe"]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["circuit_heads"] = self.circuit_heads
        return d


PLANTED = PlantedGroundTruth()


def _flags(tok: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-vocabulary-entry flags: starts a word (BPE 'Ġ'), is an anchor, is BOS."""
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    space = torch.tensor([p.startswith("Ġ") for p in pieces], dtype=torch.float32)
    # anchors: tokens made only of ".", "," and newlines ('Ċ' in byte-level BPE), e.g. ".", ",", "\n", ".\n"
    anchor = torch.tensor([bool(p) and set(p.replace("Ċ", "\n")) <= ANCHOR_CHARS for p in pieces],
                          dtype=torch.float32)
    bos = torch.zeros(len(tok))
    bos[tok.eos_token_id] = 1.0
    return space, anchor, bos


def _mirrored(rows: torch.Tensor) -> torch.Tensor:
    """Features [n, MIRROR] → residual vectors [n, D_MODEL] = [features, -features] (mean exactly 0)."""
    return torch.cat([rows, -rows], dim=1)


def _embeddings(tok: Any) -> tuple[torch.Tensor, torch.Tensor]:
    space, anchor, bos = _flags(tok)
    wte = torch.zeros(len(tok), MIRROR)
    wte[:, DIM["const"]] = CONST
    wte[:, DIM["space"]], wte[:, DIM["anchor"]], wte[:, DIM["bos"]] = space, anchor, bos
    wte[:, DIM["tok_pad"]] = 1.0 - space - anchor - bos  # the flags are exclusive: norm² = CONST² + 1
    p = torch.arange(N_POS, dtype=torch.float32) / N_POS
    wpe = torch.zeros(N_POS, MIRROR)
    wpe[:, DIM["pos"]], wpe[:, DIM["pos2"]] = p, p**2
    wpe[:, DIM["pos_pad"]] = (2.0 - p**2 - p**4).sqrt()  # norm² = 2
    return _mirrored(wte), _mirrored(wpe)


def _ln_weight(scale: float = 1.0) -> torch.Tensor:
    """LayerNorm weights that turn the normalised residual back into raw features (constant → 1), read
    from the first half only. The residual of an embedding has variance 2·(CONST² + 3) / D_MODEL."""
    std = math.sqrt(2 * (CONST**2 + 3) / D_MODEL)
    w = torch.zeros(D_MODEL)
    w[:MIRROR] = std * scale
    w[DIM["const"]] = std / CONST * scale
    return w


def _write(W: torch.Tensor, row: int, feature: str, value: float) -> None:
    """Output projection entry (Conv1D: y = x @ W) writing to a feature and, negated, to its mirror."""
    W[row, DIM[feature]] += value
    W[row, DIM[feature] + MIRROR] -= value


def _set_weights(sd: dict[str, torch.Tensor], tok: Any) -> None:
    wte, wpe = _embeddings(tok)
    sd["transformer.wte.weight"], sd["transformer.wpe.weight"] = wte, wpe
    for L in range(N_LAYER):
        sd[f"transformer.h.{L}.ln_1.weight"] = _ln_weight()
        sd[f"transformer.h.{L}.ln_2.weight"] = _ln_weight()
    # the final LayerNorm only feeds the (meaningless) next-token logits: scaled so that logits stay O(1)
    sd["transformer.ln_f.weight"] = _ln_weight(1.0 / CONST)
    sd["lm_head.weight"] = wte  # tied
    scale = math.sqrt(D_HEAD)  # HF divides attention scores by sqrt(d_head)
    c, P, N = DIM["const"], DIM["pos"], float(N_POS)

    def qkv(L: int) -> torch.Tensor:  # [d_model, 3·d_model]: q | k | v, heads contiguous
        return sd[f"transformer.h.{L}.attn.c_attn.weight"]

    def col(part: str, head: int, j: int = 0) -> int:
        return "qkv".index(part) * D_MODEL + head * D_HEAD + j

    def out(L: int) -> torch.Tensor:
        return sd[f"transformer.h.{L}.attn.c_proj.weight"]

    # 0.0 previous-token head: score = -β (p - 1 - p')² = 2βN²(p̂ - 1/N) p̂' - βN² p̂'² + (terms without p')
    W, h, b = qkv(0), PLANTED.distractors["prev_token"][1], PREV_SHARPNESS
    W[P, col("q", h, 0)] = 2 * b * N**2 * scale
    W[c, col("q", h, 0)] = -2 * b * N * scale
    W[c, col("q", h, 1)] = -b * N**2 * scale
    W[P, col("k", h, 0)] = 1.0
    W[DIM["pos2"], col("k", h, 1)] = 1.0
    W[DIM["space"], col("v", h)] = 1.0
    _write(out(0), h * D_HEAD, "prev_space", 1.0)
    # 0.1 absolute-position head: q = 0 (uniform over previous tokens), value p̂ → 5 · p / (2N)
    W, h = qkv(0), PLANTED.distractors["abs_position"][1]
    W[P, col("v", h)] = 1.0
    _write(out(0), h * D_HEAD, "abspos", ABSPOS_SCALE)
    # 0.2 the counter: score 3 on anchors, 1 on word-initial tokens, -20 elsewhere; value "starts a word"
    L, h = PLANTED.counter
    W, s = qkv(L), COUNTER_SCORES
    W[c, col("q", h)] = 1.0 * scale
    W[DIM["anchor"], col("k", h)] = s["anchor"] - s["other"]
    W[DIM["space"], col("k", h)] = s["space"] - s["other"]
    W[c, col("k", h)] = s["other"]
    W[DIM["space"], col("v", h)] = 1.0
    _write(out(L), h * D_HEAD, "count", COUNT_SCALE)
    # 1.1 the receiver: score 30·p' (the latest key, itself, wins); relays count (value composition with 0.2)
    L, h = PLANTED.receivers[0]
    W = qkv(L)
    W[c, col("q", h)] = SELF_SHARPNESS * N * scale
    W[P, col("k", h)] = 1.0
    W[DIM["count"], col("v", h)] = 1.0
    _write(out(L), h * D_HEAD, "relay", 1.0)


def build_planted_model(out_dir: str | Path) -> Path:
    """Write the planted model (weights + GPT-2 tokenizer + the shared ``wordpos_model.json`` manifest with the
    files' sha256, the version and the ground truth) as a Hugging Face directory at ``out_dir``; returns it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from wordpos.probing.models.tokenizers import gpt2_tokenizer

    tok = gpt2_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=N_POS, n_embd=D_MODEL, n_layer=N_LAYER, n_head=N_HEAD,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, summary_first_dropout=0.0,
                     activation_function="gelu_new", tie_word_embeddings=True,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    sd = {k: torch.zeros(v.shape, dtype=torch.float32) for k, v in model.state_dict().items()}
    _set_weights(sd, tok)
    model.load_state_dict(sd, assign=True)
    model.tie_weights()
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    manifest.write_manifest(out_dir, name="planted", source="built in code by wordpos.probing.models.planted",
                            config={"d_model": D_MODEL, "n_head": N_HEAD, "n_layer": N_LAYER, "n_positions": N_POS},
                            version=VERSION, ground_truth=PLANTED.to_dict())  # written last: marks completion
    return out_dir


def _valid(path: Path) -> bool:
    """Whether ``path`` holds a complete planted model of this version (every file present, unchanged)."""
    try:
        meta = manifest.verify(path, what="the planted model at", fix="It is rebuilt", name="planted",
                               required=_REQUIRED, deep=True)
        return meta.extra.get("version") == VERSION and \
            meta.extra.get("ground_truth") == json.loads(json.dumps(PLANTED.to_dict()))
    except CorruptFileError:
        return False


def planted_dir() -> Path:
    """The cached planted model under ``cache_root() / "planted"``, built when missing and rebuilt (into a
    temporary directory, renamed into place) when partial, altered or from another version: the one model the
    shared damage policy (:mod:`wordpos.probing.models.manifest`) lets rebuild itself, as it is built in code
    in seconds."""
    path = cache_root() / "planted"
    if not _valid(path):
        try:
            with atomic_dir(path) as tmp:
                build_planted_model(tmp)
        except OSError:
            if not _valid(path):  # not another process having just put a complete copy in place
                raise
    return path
