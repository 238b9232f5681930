"""The organism: a small GPT-2 trained by this project on text where counting words lowers the loss.

**Data rule.** A document is a run of lines. Every line of a document has the same number of words K
(drawn per document from 4..8): a capitalised opener ("When", "Then", ...) followed by K lowercase words of
1-3 GPT-2 tokens, closed by "." and a newline. Half the documents open with the reference prefix
("The United States Declaration ... Philadelphia.") instead of a first line. To predict the full stop the model
must know (a) K, from the earlier lines, and (b) how many *words* - not tokens - it has seen since the last
anchor ("\\n" / "."); words take 1-3 tokens, so token position alone cannot say when K words are done.
Counting word starts since the anchor is exactly the mechanism the original post hypothesised.

Words segment exactly as GPT-2 segments them (each word is tokenized with its leading space; a line is the
concatenation, which equals tokenizing the whole line). The language model sees the whole 10k-word
vocabulary, as GPT-2 saw every word in pretraining; the train/held-out split is the *probe's* (its test words
are never in the probe's training prompts).

The trained weights ship in ``probing/models/assets/organism`` (fp16 safetensors + the shared
``wordpos_model.json`` manifest of :mod:`wordpos.probing.models.manifest`). ``organism_dir()`` verifies them
(sizes and sha256, 20 ms) on every load. **Damage policy** (the one SmolLM2's cache follows): a damaged copy is
never used and never silently retrained; the error names the command that rebuilds it,
``wordpos models pull organism --force`` (:func:`pull_organism`: retrains into ``<cache root>/organism``, about
4 minutes on 2 CPU cores, which is then used in place of the damaged shipped copy), or reinstalling wordpos.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wordpos.probing.datasets import REFERENCE_PREFIX
from wordpos.probing.errors import CorruptFileError
from wordpos.probing.io import atomic_dir
from wordpos.probing.models import manifest
from wordpos.probing.models.cache import cache_root
from wordpos.probing.models.manifest import MANIFEST, Manifest
from wordpos.probing.models.tokenizers import gpt2_tokenizer
from wordpos.probing.vocab import frequent_words, word_tokens

log = logging.getLogger(__name__)
ASSET_DIR = Path(__file__).parent / "assets" / "organism"
NAME = "organism"
LEGACY_MANIFEST = "wordpos_organism.json"  # the first layout (format wordpos.organism/1); still read
SOURCE = "trained by wordpos.probing.models.organism.train_organism (scripts/train_organism.py)"
OPENERS = ("When", "Then", "And", "But", "So", "If", "While", "After")


@dataclass
class OrganismConfig:
    """Architecture and training settings (saved in the manifest)."""

    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 64
    n_positions: int = 64
    steps: int = 1500
    batch_size: int = 16
    lr: float = 3e-3
    warmup: int = 100
    min_words: int = 4
    max_words: int = 8
    prefix_prob: float = 0.5
    seed: int = 0


class Corpus:
    """Generator of organism training sequences (token ids), deterministic under its seed."""

    def __init__(self, tokenizer: Any = None, config: OrganismConfig | None = None, words: list[str] | None = None):
        self.tok = tokenizer or gpt2_tokenizer()
        self.cfg = config or OrganismConfig()
        words = words if words is not None else frequent_words()
        self.words: dict[int, list[list[int]]] = {1: [], 2: [], 3: []}
        self.word_text: dict[int, list[str]] = {1: [], 2: [], 3: []}
        for w in words:
            t = word_tokens(self.tok, w)
            if len(t) in self.words:
                self.words[len(t)].append(t)
                self.word_text[len(t)].append(w)
        self.bos = self.tok.eos_token_id
        self.period = self.tok.encode(".")[0]
        self.newline = self.tok.encode("\n")[0]
        self.openers = [self.tok.encode(o)[0] for o in OPENERS]
        self.prefix = self.tok.encode(REFERENCE_PREFIX)[:-1]  # up to and including "\n"; the opener follows
        self.rng = np.random.default_rng(self.cfg.seed)

    def vocab_ids(self) -> list[int]:
        """Every token the corpus can produce (the training softmax is restricted to these)."""
        ids = {self.bos, self.period, self.newline, *self.openers, *self.prefix}
        for group in self.words.values():
            for t in group:
                ids.update(t)
        return sorted(ids)

    def word(self) -> list[int]:
        n = int(self.rng.integers(1, 4))
        group = self.words[n]
        return group[int(self.rng.integers(len(group)))]

    def line(self, k: int) -> list[int]:
        out = [self.openers[int(self.rng.integers(len(self.openers)))]]
        for _ in range(k):
            out += self.word()
        return out + [self.period, self.newline]

    def sequence(self, length: int) -> list[int]:
        k = int(self.rng.integers(self.cfg.min_words, self.cfg.max_words + 1))
        seq = [self.bos]
        if self.rng.random() < self.cfg.prefix_prob:
            seq += self.prefix
        while len(seq) < length + 1:
            seq += self.line(k)
        return seq[: length + 1]

    def batch(self, n: int, length: int) -> torch.Tensor:
        return torch.tensor([self.sequence(length) for _ in range(n)], dtype=torch.long)



def train_organism(out_dir: str | Path, config: OrganismConfig | None = None, progress: bool = True,
                   half: bool = True) -> Path:
    """Train the organism and save it as a Hugging Face directory with its manifest (``wordpos_model.json``)."""
    from tqdm.auto import tqdm
    from transformers import GPT2LMHeadModel

    cfg = config or OrganismConfig()
    torch.manual_seed(cfg.seed)
    tok = gpt2_tokenizer()
    corpus = Corpus(tok, cfg)
    keep = torch.tensor(corpus.vocab_ids())
    remap = torch.full((len(tok),), -1, dtype=torch.long)
    remap[keep] = torch.arange(len(keep))
    # train on a compact vocabulary (only the corpus' ~10k tokens: 5x cheaper), then scatter into GPT-2's 50257
    small = GPT2LMHeadModel(_gpt2_config(cfg, len(keep)))
    opt = torch.optim.AdamW(small.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * max(0.05, 0.5 * (1 + np.cos(np.pi * s / cfg.steps))))
    t0 = time.perf_counter()
    losses = []
    bar = tqdm(range(cfg.steps), desc="training organism", disable=not progress)
    for step in bar:
        x = remap[corpus.batch(cfg.batch_size, cfg.n_positions - 1)]
        loss = small(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(small.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
    train_time = time.perf_counter() - t0
    small.eval()
    val_corpus = Corpus(tok, OrganismConfig(**{**asdict(cfg), "seed": cfg.seed + 1000}))
    with torch.no_grad():
        xv = remap[val_corpus.batch(256, cfg.n_positions - 1)]
        val = float(small(xv, labels=xv).loss)
    model = GPT2LMHeadModel(_gpt2_config(cfg, len(tok), bos=corpus.bos))
    state = small.state_dict()
    with torch.no_grad():
        wte = torch.zeros(len(tok), cfg.n_embd)  # tokens the corpus never produces: zero (compresses to nothing)
        wte[keep] = state.pop("transformer.wte.weight")
        state.pop("lm_head.weight", None)
        model.transformer.wte.weight.copy_(wte)
        missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"transformer.wte.weight", "lm_head.weight"}, (missing, unexpected)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    (model.half() if half else model).save_pretrained(out_dir)  # no tokenizer files: load_model supplies GPT-2's
    manifest.write_manifest(out_dir, name=NAME, source=SOURCE, config=asdict(cfg),
                            data_rule=__doc__.split("**Data rule.**")[1].split("\n\n")[0].strip(),
                            train_loss_last50=float(np.mean(losses[-50:])), val_loss=val,
                            train_seconds=round(train_time, 1), torch=torch.__version__)
    return out_dir


def _gpt2_config(cfg: OrganismConfig, vocab_size: int, bos: int | None = None) -> Any:
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
                      n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                      bos_token_id=bos, eos_token_id=bos)


def _fix() -> str:
    return (f"Run `wordpos models pull {NAME} --force` to retrain it into the cache (about 4 minutes on 2 CPU cores), or "
            "reinstall wordpos to restore the shipped copy (in a source checkout: `python scripts/train_organism.py`)")


def cache_dir() -> Path:
    """Where a retrained organism lives (used only when the shipped copy is damaged)."""
    return cache_root() / NAME


def verify(directory: str | Path) -> Manifest:
    """Check every file of an organism directory (size and sha256) against its manifest; raise
    ``CorruptFileError`` naming the directory and the command that rebuilds it if it is damaged."""
    directory = Path(directory)
    filename = LEGACY_MANIFEST if not (directory / MANIFEST).exists() and (directory / LEGACY_MANIFEST).exists() \
        else MANIFEST  # a copy retrained before the shared layout
    return manifest.verify(directory, what="the organism at", fix=_fix(), name=NAME,
                           required=("config.json", "model.safetensors"), deep=True, filename=filename)


def organism_dir(shipped: str | Path | None = None) -> Path:
    """A verified organism directory: the shipped copy, else a copy retrained into the cache.

    A damaged copy is never used and never silently retrained: when the shipped copy fails its check and no
    retrained copy exists, ``CorruptFileError`` names the problem and the command that rebuilds it; a retrained
    copy that is itself damaged is refused the same way."""
    shipped = Path(shipped) if shipped is not None else ASSET_DIR
    try:
        verify(shipped)
        return shipped
    except CorruptFileError as e:
        problem = e
    cached = cache_dir()
    if manifest.is_nonempty_dir(cached):
        verify(cached)
        log.warning("shipped organism unusable (%s); using the retrained copy in %s", problem, cached)
        return cached
    raise CorruptFileError(f"{problem} (No retrained copy exists in {cached} either; the pull writes one there.)")


def pull_organism(force: bool = False, progress: bool = True) -> Path:
    """Return a verified organism directory, retraining it into the cache when no whole copy exists or when
    ``force`` (the rebuild that the damage errors name), with the shipped model's settings and seed."""
    if not force:
        try:
            return organism_dir()
        except CorruptFileError:
            pass
    cached = cache_dir()
    with atomic_dir(cached) as tmp:
        train_organism(tmp, progress=progress)
        verify(tmp)
    return cached
