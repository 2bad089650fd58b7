"""``python -m seedstory.data``: check, cut and count StoryStream-format data.

    python -m seedstory.data validate STORIES.jsonl --images ROOT [--no-images] [--json]
    python -m seedstory.data chunk STORIES.jsonl --out WINDOWS.jsonl [--window 10] [--stride N] [--min-frames N]
    python -m seedstory.data stats STORIES.jsonl [--images ROOT] [--json]

``validate`` exits with 2 when it found problems (each kind counted, with example lines), 1 when the input
cannot be read. The synthetic story world has its own command: ``python -m seedstory.data.synthetic``.
"""
from __future__ import annotations

import argparse
import json
import sys

from . import storystream as ss


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m seedstory.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("validate", help="report broken stories (bad JSON, missing fields or images, ...)")
    p.add_argument("jsonl")
    p.add_argument("--images", help="image root (the paths in the file are relative to it)")
    p.add_argument("--no-images", action="store_true", help="do not open the images")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("chunk", help="cut stories into windows of consecutive frames (30 -> 3 x 10)")
    p.add_argument("jsonl")
    p.add_argument("--out", required=True)
    p.add_argument("--window", type=int, default=10)
    p.add_argument("--stride", type=int, default=None, help="frames between window starts (default: the window)")
    p.add_argument("--min-frames", type=int, default=None, help="shortest tail kept (default: the window)")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("stats", help="stories, frames, lengths, caption words")
    p.add_argument("jsonl")
    p.add_argument("--images", help="also check the images")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "validate":
            if args.images is None and not args.no_images:
                print("error: give --images ROOT (or --no-images to check the text only)", file=sys.stderr)
                return 1
            report = ss.validate(args.jsonl, None if args.no_images else args.images)
            print(json.dumps(report.to_dict(), indent=2) if args.json else report.markdown())
            return 0 if report.ok else 2
        if args.command == "chunk":
            result = ss.chunk(args.jsonl, args.out, args.window, args.stride, args.min_frames)
            if args.json:
                print(json.dumps(result, indent=2))
            else:
                skipped = sum(result["problems"].values())
                print(f"wrote {result['out']}: {result.get('windows', 0)} windows from {result.get('stories', 0)} "
                      f"stories ({result.get('frames_dropped', 0)} tail frames dropped, {skipped} broken lines skipped)")
            return 0
        s = ss.stats(args.jsonl, args.images)
        print(json.dumps(s, indent=2) if args.json else ss.stats_markdown(s))
        return 0
    except FileNotFoundError as e:
        print(f"error: {e.filename or e} not found", file=sys.stderr)
        return 1
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
