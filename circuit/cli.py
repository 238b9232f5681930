"""The ``wordpos`` command line: subcommands over the Python API (probe, patch, circuit, run, models).

The packages import their public names lazily (:mod:`probing.lazy`) and the commands import what they use, so
the heavy imports (torch, transformers, scikit-learn) happen inside :func:`main`, after it has paused the garbage
collector until the model is loaded (:mod:`probing.heap`). Bad input surfaces as one line naming the problem and
the fix (a :class:`probing.errors.WordposError`), not a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from wordpos.probing.cli import add_models_parser, add_probe_parser

    parser = argparse.ArgumentParser(
        prog="wordpos",
        description="Find the attention heads that give a language model emergent positional embeddings of "
                    "words, and draw their circuit.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more, show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    add_probe_parser(sub)
    try:
        from wordpos.patching.cli import add_patch_parser
    except ImportError:  # pragma: no cover - during development
        add_patch_parser = None
    if add_patch_parser:
        add_patch_parser(sub)
    try:
        from wordpos.circuit.commands import add_circuit_parsers
    except ImportError:  # pragma: no cover
        add_circuit_parsers = None
    if add_circuit_parsers:
        add_circuit_parsers(sub)
    add_models_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from wordpos.probing import heap

    heap.pause_until_loaded()  # no collections through imports and model loading (see probing.heap)
    try:
        return _main(argv)
    finally:
        heap.resume()


@contextlib.contextmanager
def _library_bars(show: bool) -> Iterator[None]:
    """``--quiet`` also hides the libraries' own bars (transformers' "Loading weights", the hub's downloads),
    restored afterwards for a caller in the same process."""
    if show:
        yield
        return
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    was, hub_was_off = hf_logging.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()  # (it turns the hub's off too)
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()  # (and the hub's on: put back what the caller had)
        if hub_was_off:
            hub_utils.disable_progress_bars()


def _low_output_disk(out: str | None) -> Path | None:
    """Where a full disk that an error does not place most likely is: the output folder's, when it is nearly full
    (under 256 MB free); ``None`` (say nothing of where) otherwise."""
    import shutil

    from wordpos.probing.io import existing_parent

    if out is None:
        return None
    where = existing_parent(Path(out))
    return Path(out) / "-" if shutil.disk_usage(where).free < 256 * 2**20 else None


def _main(argv: Sequence[str] | None) -> int:
    from wordpos.probing.errors import DiskFullError, WordposError
    from wordpos.probing.io import disk_full_error

    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        try:
            with _library_bars(not getattr(args, "quiet", False)):
                return int(args.func(args) or 0)
        except OSError as e:  # a full disk met outside wordpos' own writers (a library's cache, say) reads the same
            full = disk_full_error(e, _low_output_disk(getattr(args, "out", None)), f"{args.command}'s output",
                                   atomic=False)
            if full is None or full is e or args.verbose:
                raise
            raise full from e
    except WordposError as e:
        if args.verbose:
            raise
        resume = ""
        if isinstance(e, DiskFullError) and getattr(args, "out", None):
            resume = (" What finished is saved: run the command again without --overwrite to resume from it."
                      if getattr(args, "overwrite", False) else
                      " What finished is saved: the same command resumes from it.")
        print(f"wordpos {args.command}: error: {e}{resume}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished stages are saved and a re-run resumes from them", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
