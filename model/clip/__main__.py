"""``python -m model.clip fetch`` (download a tag into a cache dir) or ``tiny`` (write a random smoke model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from model.clip.loading import TINY_MODEL, ClipUnavailable, load_clip, save_checkpoint
from model.clip.spec import DEFAULT_MODEL, DEFAULT_PRETRAINED, ClipSpec


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m model.clip fetch`` (download a tag into a cache dir) or ``tiny`` (write a random smoke model)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m model.clip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    fetch = sub.add_parser("fetch", help="download an open_clip model into a cache dir and check that it loads")
    fetch.add_argument("--model", default=DEFAULT_MODEL)
    fetch.add_argument("--pretrained", default=DEFAULT_PRETRAINED)
    fetch.add_argument("--cache-dir", type=Path, required=True)
    tiny = sub.add_parser("tiny", help=f"write a random-weights {TINY_MODEL} checkpoint (offline smoke tests only)")
    tiny.add_argument("--out", type=Path, required=True)
    tiny.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "fetch":
        try:
            clip = load_clip(ClipSpec(model=args.model, pretrained=args.pretrained, cache_dir=args.cache_dir))
        except ClipUnavailable as err:
            raise SystemExit(str(err)) from None
    else:
        clip = load_clip(ClipSpec(model=TINY_MODEL, pretrained=None, random_init=True, seed=args.seed))
        save_checkpoint(clip.model, args.out)
        print(f"wrote {args.out}: the {TINY_MODEL} architecture with this checkpoint")
    print(f"{clip.spec.describe()}: {clip.num_parameters / 1e6:.1f}M parameters, {clip.image_size}px images")


if __name__ == "__main__":
    main()
