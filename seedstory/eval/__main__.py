"""``python -m seedstory.eval``: judge and generate.

    python -m seedstory.eval judge --stories DIR --base-url URL --model NAME [--out OUT]
    python -m seedstory.eval judge --pairwise DIR_A DIR_B --base-url URL --model NAME [--out OUT]
    python -m seedstory.eval generate --val VAL.jsonl --images ROOT --out DIR [--preset P] [--frames 24]
    accelerate launch --num_processes 4 -m seedstory.eval generate ...   (one GPU per process)

The judge's API key is read from the environment variable named by ``--api-key-env`` (default
OPENAI_API_KEY); it is never printed or written. Without it no Authorization header is sent (fine for a
local server).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from ..quiet import quiet_libraries
from ..threads import passive_openmp

passive_openmp()
quiet_libraries()

log = logging.getLogger("seedstory.eval")


# -- judge -------------------------------------------------------------------------------------------------
def _add_judge(sub) -> None:
    from .judge import ASPECTS

    p = sub.add_parser("judge", help="score stories with an LLM judge, or compare two folders pairwise",
                       description="Score saved stories on image style consistency, engagement and text-image "
                                   "coherence (1-10), or compare two folders of stories pairwise (both orders), "
                                   "with any OpenAI-compatible chat-completions endpoint.")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--stories", metavar="DIR", help="folder of saved stories (subfolders or .zip files)")
    what.add_argument("--pairwise", nargs=2, metavar=("DIR_A", "DIR_B"),
                      help="compare the stories of the same name in two folders (win/tie/loss of DIR_A)")
    p.add_argument("--base-url", required=True,
                   help="the endpoint's base URL, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the judge model's name at that endpoint")
    p.add_argument("--out", help="results folder (default: next to the stories, <DIR>-judge-<model>)")
    p.add_argument("--api-key-env", default="OPENAI_API_KEY", metavar="NAME",
                   help="environment variable holding the API key (default OPENAI_API_KEY)")
    p.add_argument("--aspects", nargs="+", default=list(ASPECTS), choices=list(ASPECTS),
                   help="aspects to judge (default: all three)")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once (default 4)")
    p.add_argument("--max-frames", type=int, default=0,
                   help="show only the first N frames of each story (default 0: all; the paper's scripts showed 5)")
    p.add_argument("--max-image-side", type=int, default=512,
                   help="shrink pictures so the longer side is at most this many pixels (0: as saved; default 512)")
    p.add_argument("--temperature", type=float, default=0.3, help="judge sampling temperature (default 0.3)")
    p.add_argument("--max-tokens", type=int, default=1024, help="longest judge reply (0: leave to the server)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for one answer (default 120)")
    p.add_argument("--retries", type=int, default=5, help="retries per request on 429/5xx/timeouts (default 5)")
    p.add_argument("--backoff", type=float, default=2.0, help="first retry delay in seconds, doubling (default 2)")
    p.add_argument("--max-backoff", type=float, default=60.0, help="longest retry delay in seconds (default 60)")
    p.add_argument("--max-errors", type=int, default=20,
                   help="stop sending after this many requests failed for good (0: never; default 20)")
    p.add_argument("--retry-failed", action="store_true", help="ask again where an earlier reply had no verdict")
    p.add_argument("--limit", type=int, default=0, help="judge only the first N stories (by name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_judge)


def cmd_judge(args) -> int:
    from .client import ChatClient
    from .judge import default_out, format_pairwise_table, format_score_table, judge_pairwise, judge_stories

    if args.concurrency < 1:
        raise ValueError("--concurrency must be at least 1")
    api_key = os.environ.get(args.api_key_env) or None
    if api_key is None:
        log.info("no API key in $%s: sending requests without an Authorization header", args.api_key_env)
    client = ChatClient(args.base_url, args.model, api_key=api_key, timeout=args.timeout, max_retries=args.retries,
                        backoff=args.backoff, max_backoff=args.max_backoff, temperature=args.temperature,
                        max_tokens=args.max_tokens or None)
    common = dict(aspects=args.aspects, concurrency=args.concurrency, max_frames=args.max_frames,
                  max_image_side=args.max_image_side, retry_failed=args.retry_failed, max_errors=args.max_errors,
                  limit=args.limit, progress=not args.no_progress)
    if args.pairwise:
        dir_a, dir_b = args.pairwise
        out = args.out or default_out(dir_a, args.model, other=dir_b)
        summary, report = judge_pairwise(client, dir_a, dir_b, out, **common)
        table = format_pairwise_table(summary["aspects"], os.path.basename(os.path.abspath(dir_a)),
                                      os.path.basename(os.path.abspath(dir_b)))
        count = f"{summary['pairs']} pair(s)"
    else:
        out = args.out or default_out(args.stories, args.model)
        summary, report = judge_stories(client, args.stories, out, **common)
        table = format_score_table(summary["aspects"])
        count = f"{summary['stories']} stor{'y' if summary['stories'] == 1 else 'ies'}"
    print(table)
    print(f"{count}; this run: {report.scored} judged, {report.failed} without a verdict, {len(report.errors)} "
          f"request error(s), {report.already_done} already done; {client.requests} HTTP request(s)")
    if report.skipped_stories:
        print(f"skipped {len(report.skipped_stories)} stor{'y' if len(report.skipped_stories) == 1 else 'ies'} "
              "that could not be loaded:", file=sys.stderr)
        for name, reason in sorted(report.skipped_stories.items()):
            print(f"  {name}: {reason}", file=sys.stderr)
    if report.errors:
        print("requests that failed (they are asked again on the next run):", file=sys.stderr)
        for key, message in report.errors[:10]:
            print(f"  {key}: {message}", file=sys.stderr)
        if len(report.errors) > 10:
            print(f"  ... and {len(report.errors) - 10} more", file=sys.stderr)
    if report.aborted:
        print(f"stopped early: {report.aborted}", file=sys.stderr)
    print(f"results: {os.path.join(out, 'results.jsonl')}  summary: {os.path.join(out, 'summary.json')}")
    return 0 if report.ok else 1


# -- generate --------------------------------------------------------------------------------------------
def _add_generate(sub) -> None:
    from ..cli import add_generation_args
    from ..config import list_presets

    p = sub.add_parser("generate", help="make stories from the first frame of each validation story",
                       description="For each line of a StoryStream-style JSONL ({\"id\"?, \"images\": [...], "
                                   "\"captions\": [...]}), open a story with its first picture and caption and "
                                   "generate --frames more; save it to OUT/<id>/. Complete stories are skipped. "
                                   "Under `accelerate launch` the work is split across the processes.")
    p.add_argument("--val", required=True, metavar="JSONL", help="validation stories, one JSON object a line")
    p.add_argument("--images", required=True, metavar="ROOT", help="folder the image paths are relative to")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: one story folder per line")
    p.add_argument("--preset", help=f"model preset ({', '.join(list_presets())}); default: demo if present, else tiny")
    p.add_argument("--frames", type=int, default=24, help="frames to generate after the opening (default 24: 25 in all)")
    p.add_argument("--limit", type=int, default=0, help="only the first N good lines")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="preset overrides, e.g. runtime.dtype=bf16")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generation_args(p)
    p.set_defaults(func=cmd_generate)


def cmd_generate(args) -> int:
    from ..cli import settings_from_args
    from .generate import generate_stories

    report = generate_stories(args.val, args.images, args.out, preset=args.preset, frames=args.frames,
                              overrides=args.set, configure=lambda pipe: settings_from_args(pipe, args),
                              mode=args.mode or "window", limit=args.limit, progress=not args.no_progress)
    if not report.main:  # under a launch, rank 0 speaks for all
        return 0 if report.complete_after == report.total else 1
    bad = f"; {len(report.bad_lines)} bad line(s) skipped ({report.bad_summary()})" if report.bad_lines else ""
    print(f"{report.complete_after} of {report.total} stories complete in {args.out}; made {len(report.made)} "
          f"now, {report.already_complete} were already there, {len(report.failed)} failed{bad}")
    for story_id, reason in report.failed:
        print(f"  {story_id}: {reason}", file=sys.stderr)
    return 0 if report.complete_after == report.total else 1


# -- synthetic-world analyzer -----------------------------------------------------------------------------
def _add_synthetic(sub) -> None:
    from . import synthetic

    p = sub.add_parser("synthetic", help="analyse stories of the synthetic world (validity, agreement, consistency)",
                       description=synthetic.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    synthetic.configure(p)


# -- entry point -------------------------------------------------------------------------------------------
# Each command adds its own subparser.
COMMANDS = [_add_judge, _add_generate, _add_synthetic]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m seedstory.eval",
                                     description="Evaluate SEED-Story models: LLM-judge scores and comparisons, "
                                                 "story generation for evaluation, and the synthetic-world "
                                                 "analyzer")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    log.addHandler(handler)
    propagate, level = log.propagate, log.level
    log.propagate = False
    log.setLevel(logging.WARNING if args.quiet else logging.INFO)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # bad settings, StoryError, PresetError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: finished results are kept; run the same command again to continue", file=sys.stderr)
        return 130
    finally:
        log.removeHandler(handler)
        log.propagate, log.level = propagate, level


if __name__ == "__main__":
    sys.exit(main())
