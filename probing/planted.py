"""The planted-circuit model: a 2-layer GPT-2 whose weights are set by hand, so its word-counting circuit is
known exactly. It is the ground truth the tests check every method against.

**Residual layout** (d_model 256). Dimensions 0-127 carry features, 128-255 their negatives, so the mean over
dimensions is always 0 and LayerNorm only divides by the norm, which a constant feature (300 in dimension 0)
dominates; LayerNorm weights undo that scale, so every block reads the features almost exactly (≤ 0.2%).

| dims | feature |
| --- | --- |
| 0 | constant 300 (1 after LayerNorm) |
| 1 | token starts a word (BPE "Ġ") |
| 2 | token is an anchor: ".", "," or "\\n" |
| 3 | token is BOS |
| 4 | *count*: written by the counter 0.2 |
| 5 | *absolute position*: written by 0.1 |
| 6 | *previous token starts a word*: written by 0.0 |
| 7 | *count, relayed*: written by the receiver 1.1 |
| 64-127 | one-hot absolute position (learned position embedding) |

**Heads** (all others are zero: uniform attention, zero output; MLPs are zero).

* **0.2, the counter** (the post's hypothesis, literally): attention score 3 on anchors, 1 on word-initial
  tokens, -20 elsewhere; its value is "starts a word", so it writes ``10 · n·e / (a·e³ + n·e)`` to *count*,
  with ``n`` word-initial and ``a`` anchor tokens so far — monotone in the word index whatever the words'
  token lengths.
* **0.1, absolute-position distractor**: uniform attention, value "is BOS", so it writes ``5 / (pos + 1)``.
* **0.0, previous-token distractor**: attends to position − 1 (one-hot positions), copies "starts a word".
* **1.1, the receiver**: attends to its own position and copies *count* (value composition with 0.2) into
  *count, relayed*. So the counter reaches the probe directly (dim 4) and through 1.1 (dim 7): the
  planted edges are ``0.2 → probe``, ``0.2 → 1.1`` (via v) and ``1.1 → probe``.

The distractors write features a sloppy method could take for word position: absolute position (0.1) and
word boundaries (0.0). Neither differs between the clean and corrupted prompts of a position-preserving
corruption, so a correct method gives them no effect.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from probing.cache import cache_root
from probing.io import atomic_dir

VERSION = 1
D_MODEL, N_HEAD, D_HEAD, N_POS = 256, 4, 64, 64
CONST = 300.0
MIRROR = 128
DIM = {"const": 0, "space": 1, "anchor": 2, "bos": 3, "count": 4, "abspos": 5, "prev_space": 6, "relay": 7}
POS0 = 64  # one-hot positions live in dims 64..127
ANCHORS = (".", ",", "\n")
MANIFEST = "wordpos_planted.json"


@dataclass(frozen=True)
class PlantedGroundTruth:
    counter: tuple[int, int] = (0, 2)
    distractors: dict[str, tuple[int, int]] = field(
        default_factory=lambda: {"abs_position": (0, 1), "prev_token": (0, 0)})
    receivers: tuple[tuple[int, int], ...] = ((1, 1),)
    edges: tuple[tuple[str, str, str], ...] = (("0.2", "probe", "direct"), ("0.2", "1.1", "v"),
                                               ("1.1", "probe", "direct"))
    probe_layer: int = 1
    n_layers: int = 2
    n_heads: int = N_HEAD

    @property
    def circuit_heads(self) -> list[str]:
        return sorted({f"{L}.{h}" for L, h in (self.counter, *self.receivers)})

    def to_dict(self) -> dict:
        d = asdict(self)
        d["circuit_heads"] = self.circuit_heads
        return d


PLANTED = PlantedGroundTruth()


def _ln_weight() -> torch.Tensor:
    """LayerNorm weights that turn the normalised residual back into raw features (constant → 1)."""
    std = CONST * (2 / D_MODEL) ** 0.5
    w = torch.zeros(D_MODEL)
    w[:MIRROR] = std
    w[DIM["const"]] = std / CONST
    return w


def _write(W: torch.Tensor, row: int, col: int, value: float) -> None:
    """Output projection entry (Conv1D: x @ W) writing to a feature and, negated, to its mirror."""
    W[row, col] += value
    W[row, col + MIRROR] -= value


def build_planted_model(out_dir: str | Path) -> Path:
    """Write the planted model (weights + GPT-2 tokenizer + ground truth) as a Hugging Face directory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from probing.tokenizers import gpt2_tokenizer

    tok = gpt2_tokenizer()
    cfg = GPT2Config(vocab_size=len(tok), n_positions=N_POS, n_embd=D_MODEL, n_layer=2, n_head=N_HEAD,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, activation_function="gelu_new",
                     tie_word_embeddings=True, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    with torch.device("meta"):
        model = GPT2LMHeadModel(cfg)
    model = model.to_empty(device="cpu")
    for p in model.parameters():
        torch.nn.init.zeros_(p)
    sd = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    # token embedding: constant, starts-a-word, anchor, BOS (and mirrors)
    pieces = tok.convert_ids_to_tokens(list(range(len(tok))))
    space = torch.tensor([p.startswith("Ġ") for p in pieces], dtype=torch.float32)
    anchor = torch.zeros(len(tok))
    for a in ANCHORS:
        anchor[tok.encode(a)[0]] = 1.0
    bos = torch.zeros(len(tok))
    bos[tok.eos_token_id] = 1.0
    wte = torch.zeros(len(tok), D_MODEL)
    for name, col in (("const", torch.full((len(tok),), CONST)), ("space", space), ("anchor", anchor), ("bos", bos)):
        wte[:, DIM[name]] = col
        wte[:, DIM[name] + MIRROR] = -col
    sd["transformer.wte.weight"] = wte
    wpe = torch.zeros(N_POS, D_MODEL)
    wpe[torch.arange(N_POS), POS0 + torch.arange(N_POS)] = 1.0
    wpe[torch.arange(N_POS), POS0 + MIRROR + torch.arange(N_POS)] = -1.0
    sd["transformer.wpe.weight"] = wpe
    ln = _ln_weight()
    for L in range(2):
        sd[f"transformer.h.{L}.ln_1.weight"] = ln.clone()
        sd[f"transformer.h.{L}.ln_2.weight"] = ln.clone()
    sd["transformer.ln_f.weight"] = ln.clone()
    scale = D_HEAD ** 0.5  # HF divides scores by sqrt(d_head)

    def qkv(L: int) -> torch.Tensor:
        return sd[f"transformer.h.{L}.attn.c_attn.weight"]  # [d_model, 3 * d_model]: q | k | v, heads contiguous

    def col(part: int, head: int, j: int) -> int:
        return part * D_MODEL + head * D_HEAD + j

    # 0.0 previous-token head: q = e_(p-1), k = e_p' over one-hot positions; copies "starts a word"
    W, h = qkv(0), 0
    for j in range(N_POS - 1):
        W[POS0 + j + 1, col(0, h, j)] = 15.0 * scale
        W[POS0 + j, col(1, h, j)] = 1.0
    W[DIM["space"], col(2, h, 0)] = 1.0
    _write(sd["transformer.h.0.attn.c_proj.weight"], h * D_HEAD, DIM["prev_space"], 1.0)
    # 0.1 absolute-position head: uniform attention, value "is BOS" → 5 / (pos + 1)
    h = 1
    W[DIM["bos"], col(2, h, 0)] = 1.0
    _write(sd["transformer.h.0.attn.c_proj.weight"], h * D_HEAD, DIM["abspos"], 5.0)
    # 0.2 the counter: score 3 on anchors, 1 on word starts, -20 elsewhere; value "starts a word"
    h = 2
    W[DIM["const"], col(0, h, 0)] = 1.0 * scale
    W[DIM["anchor"], col(1, h, 0)] = 23.0
    W[DIM["space"], col(1, h, 0)] = 21.0
    W[DIM["const"], col(1, h, 0)] = -20.0
    W[DIM["space"], col(2, h, 0)] = 1.0
    _write(sd["transformer.h.0.attn.c_proj.weight"], h * D_HEAD, DIM["count"], 10.0)
    # 1.1 the receiver: attends to itself, relays the count (value composition with 0.2)
    W, h = qkv(1), 1
    for j in range(N_POS):
        W[POS0 + j, col(0, h, j)] = 15.0 * scale
        W[POS0 + j, col(1, h, j)] = 1.0
    W[DIM["count"], col(2, h, 0)] = 1.0
    _write(sd["transformer.h.1.attn.c_proj.weight"], h * D_HEAD, DIM["relay"], 1.0)
    sd["lm_head.weight"] = wte
    model.load_state_dict(sd)
    model.eval()
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    (out_dir / MANIFEST).write_text(json.dumps({"version": VERSION, "ground_truth": PLANTED.to_dict()}, indent=2))
    return out_dir


def _valid(path: Path) -> bool:
    try:
        meta = json.loads((path / MANIFEST).read_text())
        return meta.get("version") == VERSION and (path / "model.safetensors").stat().st_size > 1e6 \
            and (path / "config.json").exists() and (path / "tokenizer.json").exists()
    except (OSError, ValueError):
        return False


def planted_dir() -> Path:
    """The cached planted model, (re)built when missing, partial or from another version."""
    path = cache_root() / "planted"
    if not _valid(path):
        with atomic_dir(path) as tmp:
            build_planted_model(tmp)
    return path
