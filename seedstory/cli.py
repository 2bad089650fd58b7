"""Command line: ``python -m seedstory <command>``.

    generate   tell a story from a picture and an opening text
    convert    turn the released SEED-Story files into our from_pretrained format
    doctor     check a preset's files in seconds, without loading weights
    extract-vit  take the visual tokenizer out of a Qwen-VL-Chat download
    download   fetch the files a release preset needs from the Hugging Face Hub
    export     write a saved story as a comic page, HTML, PDF, GIF or zip
    presets    list the model presets
"""
from __future__ import annotations

import argparse
import os
import sys

from .config import CONTEXT_SOURCES, PRESET_DIR, REPETITION_SCOPES, list_presets, load_preset, resolve_path
from .story import StoryError


def default_preset() -> str:
    """The shipped demo model when its weights are present, else the tiny random preset."""
    if "demo" in list_presets():
        cfg = load_preset("demo")
        if os.path.isdir(resolve_path(cfg.get("path", ""))):
            return "demo"
    return "tiny"


def add_generation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation (defaults come from the preset)")
    g.add_argument("--seed", type=int, help="seed for text sampling and painting (same seed, same story)")
    g.add_argument("--sample", action="store_true", help="sample the text instead of greedy decoding")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--repetition-penalty", type=float,
                   help="penalty on the previous frame's words (1: off; the demo preset uses its own)")
    g.add_argument("--repetition-scope", choices=list(REPETITION_SCOPES),
                   help="what the penalty counts as a repeat: tokens (as transformers), words (a caption's first word "
                        "and the same word later are one), word_starts (words, never a word's inner pieces)")
    g.add_argument("--no-repeat-captions", type=int, metavar="N",
                   help="when sampling, draw a caption again (up to 3 more times) while it repeats one of the last N "
                        "(0: off; the demo preset uses its own)")
    g.add_argument("--caption-candidates", type=int, metavar="K",
                   help="when sampling, captions drawn per frame; the likeliest that repeats none of the last N is kept "
                        "(1: off; the demo preset uses its own)")
    g.add_argument("--candidates", type=int, metavar="K",
                   help="pictures painted per frame; the one the visual tokenizer reads back closest to the story's "
                        "features is kept (1: off; k times the painting time)")
    g.add_argument("--context-from", choices=list(CONTEXT_SOURCES),
                   help="what a new frame puts into the context: features (the agent's own, as the release) or "
                        "picture (the painted picture read back by the visual tokenizer)")
    g.add_argument("--max-new-tokens", type=int, help="longest text per frame, in tokens")
    g.add_argument("--steps", type=int, help="diffusion steps per image")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale")
    g.add_argument("--scheduler", help="euler (the release's), dpm++ (fast; the demo's), euler_a, ddim, unipc, ... "
                                       "(default: the preset's)")
    g.add_argument("--window", type=int, help="frames kept in context (default 8)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sink", action="store_const", const="sink", dest="mode",
                      help="long-story mode: keep an attention sink for evicted frames")
    mode.add_argument("--mode", choices=["window", "sink", "recompute"], help="how the context is kept (default window)")


def settings_from_args(pipe, args):
    return pipe.settings.replace(
        seed=args.seed, do_sample=True if args.sample else None, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, num_inference_steps=args.steps, guidance_scale=args.guidance,
        scheduler=args.scheduler, window=args.window, repetition_penalty=args.repetition_penalty,
        repetition_scope=args.repetition_scope, no_repeat_captions=args.no_repeat_captions,
        caption_candidates=args.caption_candidates, candidates=args.candidates, context_from=args.context_from,
    )


def cmd_generate(args) -> int:
    from tqdm.auto import tqdm

    from .engine import StoryEngine
    from .image_processing import load_image
    from .pipeline import SeedStoryPipeline
    from .storage import save_story

    if args.frames < 1:
        raise StoryError("--frames must be at least 1")
    image = load_image(args.image)  # fail fast, before loading models
    if not args.text or not args.text.strip():
        raise StoryError("the opening text is empty")
    if os.path.isdir(args.out) and os.listdir(args.out) and not os.path.isfile(os.path.join(args.out, "story.json")):
        raise StoryError(f"{args.out} exists and is not a saved story; choose another --out")
    pipe = SeedStoryPipeline.from_preset(args.preset or default_preset(), args.set)
    settings = settings_from_args(pipe, args)
    if args.frames + 1 > settings.max_frames:
        raise StoryError(f"--frames {args.frames} would pass this preset's limit of {settings.max_frames} frames "
                         f"(the opening counts); use at most {settings.max_frames - 1}")
    pipe.settings = settings
    engine = StoryEngine(pipe, mode=args.mode or "window", window=settings.window)
    tree = engine.start(image, args.text)
    bar = tqdm(total=args.frames, desc="frames", unit="frame")
    try:
        for _ in range(args.frames):
            frame = engine.step(tree, settings=settings)
            bar.set_postfix_str(frame.text[:40])
            bar.update(1)
    finally:  # an interrupted run still keeps the frames it made
        bar.close()
        out = save_story(tree, args.out, model_name=pipe.name)
        print(f"wrote {len(tree.path())} frames to {out}")
    return 0


def cmd_convert(args) -> int:
    from .checkpoints.release import convert_release

    out = convert_release(args.release, args.out, preset=args.preset, overwrite=args.force, dtype=args.dtype)
    print(f"wrote {out}")
    return 0


def cmd_doctor(args) -> int:
    from .doctor import diagnose

    report = diagnose(args.preset, args.set)
    print(report.markdown() if args.markdown else report.format())
    return 0 if report.ok else 1


def cmd_extract_vit(args) -> int:
    from .checkpoints.qwen_vl import extract_qwen_vit
    from .config import DTYPES

    cfg = load_preset(args.preset)
    written = extract_qwen_vit(args.qwen_vl_chat, args.out, vit_config=cfg.get("visual_tokenizer") or {},
                               force=args.force, write_pt=args.pt, dtype=DTYPES[args.dtype] if args.dtype else None,
                               progress=True)
    for path in written:
        print(f"wrote {path}")
    return 0


def cmd_download(args) -> int:
    from tqdm.auto import tqdm

    from .doctor import diagnose
    from .download import download_release

    bar = None

    def progress(done: int, total: int, what: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="download")
        bar.total = total
        bar.set_postfix_str(os.path.basename(what), refresh=False)
        bar.update(done - bar.n)

    try:
        cfg = download_release(args.preset, args.to, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    report = diagnose(cfg)
    print(report.format())
    if args.to:
        print(f"the files are in {os.path.abspath(args.to)}: run the app with SEEDSTORY_RELEASE_ROOT="
              f"{os.path.abspath(args.to)}, or add --set release.root={os.path.abspath(args.to)} to a command")
    return 0 if report.ok else 1


def cmd_export(args) -> int:
    from .export import FORMATS, export_story
    from .storage import load_story

    tree = load_story(args.story)
    out = args.out or os.path.splitext(args.story.rstrip("/"))[0] + FORMATS[args.format]
    export_story(tree, args.format, out, frame_id=args.frame)
    print(f"wrote {out}")
    return 0


def cmd_presets(args) -> int:
    if not list_presets():
        print(f"no presets under {PRESET_DIR}: run from a clone of the seedstory repository, or set SEEDSTORY_HOME "
              "to one; any model folder works with --preset PATH", file=sys.stderr)
        return 1
    for name in list_presets():
        cfg = load_preset(name)
        print(f"{name:22s} {cfg.get('source', 'random'):10s} {cfg.get('description', '')}")
    return 0


def program_name() -> str:
    """``seedstory`` when run as the installed command, ``python -m seedstory`` otherwise."""
    return "seedstory" if os.path.basename(sys.argv[0]) == "seedstory" else "python -m seedstory"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=program_name(), description="SEED-Story: multimodal long stories")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="tell a story from a picture and an opening text")
    p.add_argument("--preset", help=f"model preset ({', '.join(list_presets())}); default: demo if present, else tiny")
    p.add_argument("--image", required=True, help="the opening picture")
    p.add_argument("--text", required=True, help="the opening text")
    p.add_argument("--frames", type=int, default=4, help="frames to generate after the opening")
    p.add_argument("--out", required=True, help="output folder (or .zip): story.json + one PNG per frame")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="preset overrides, e.g. runtime.dtype=bf16")
    add_generation_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", help="convert the released weights to our from_pretrained format")
    p.add_argument("--release", default="./pretrained", help="folder holding the released files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--preset", default="seed-story-george", help="release preset naming the files")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output folder")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"],
                   help="dtype written (default fp32, lossless; bf16 halves the size; the VAE stays fp32)")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("doctor", help="check a preset's files in seconds, without loading weights")
    p.add_argument("--preset", default="seed-story-george", help="preset name or YAML path (default seed-story-george)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="preset overrides, e.g. runtime.dtype=fp16")
    p.add_argument("--markdown", action="store_true", help="print the report as markdown")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("extract-vit", help="write visual_tokenizer/qwen_vit_G.safetensors from a Qwen-VL-Chat download")
    p.add_argument("--qwen-vl-chat", required=True, metavar="DIR", help="local Qwen/Qwen-VL-Chat folder (shards)")
    p.add_argument("--out", default="pretrained/visual_tokenizer/",
                   help="output folder (writes qwen_vit_G.safetensors) or a .safetensors/.pt file name")
    p.add_argument("--pt", action="store_true", help="also write qwen_vit_G.pt (the release's file name)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="cast the tensors (default: as stored, bf16)")
    p.add_argument("--preset", default="seed-story-george", help="preset whose visual_tokenizer sizes are checked")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.set_defaults(func=cmd_extract_vit)

    p = sub.add_parser("download", help="fetch the files a release preset needs from the Hugging Face Hub")
    p.add_argument("--preset", default="seed-story-george", help="release preset (default seed-story-george)")
    p.add_argument("--to", metavar="DIR", help="folder to put them in (default: the preset's release.root, "
                                               "./pretrained); a gated repository needs HF_TOKEN")
    p.set_defaults(func=cmd_download)

    p = sub.add_parser("export", help="export a saved story")
    p.add_argument("story", help="a saved story folder or .zip")
    p.add_argument("--format", required=True, choices=["comic", "html", "pdf", "gif", "zip"])
    p.add_argument("--out", help="output file (default: next to the story)")
    p.add_argument("--frame", type=int, help="export the path ending at this frame (default: the current one)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("presets", help="list the model presets")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:  # ImageError, StoryError, PresetError, StoryFileError, ...
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        from .checkpoints import CheckpointError  # imported late: optional heavy deps

        from .download import DownloadError

        if isinstance(e, (CheckpointError, DownloadError)):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise
