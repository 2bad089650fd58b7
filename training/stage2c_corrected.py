"""Stage 2c: stage 2 again, on the agent's own stories corrected by the world's rules (DAgger-style).

    accelerate launch -m training.stage2c_corrected --config configs/train/<...>.yaml [--resume] [key=value ...]

Trained on true stories alone, the agent never sees the states its own stories reach, nor what should follow
where it goes wrong (in the demo, mostly someone giving a prop they do not hold). So the starting model's agent
first writes ``corrected.stories`` stories from training openings with the decoding it is used with
(``corrected.preset``), and the world's rules replace each caption that could not have happened
(``training.corrected_stories``); then stage 2 trains on them mixed with the true stories. The stories are
written once (by the main process) to ``<output_dir>/corrected.jsonl``, their pictures under
``data.image_root``; the mix is ``<output_dir>/train_mix.jsonl``. Both are kept, so a resumed run trains on
the same data.
"""
from __future__ import annotations

import json
import os
import random
import time

from seedstory.atomic import write_text
from seedstory.config import resolve_path

from . import stage2_agent
from .common import load_config, parse_args
from .corrected_stories import write_corrected


def mix(out: str, inputs: list[str], seed: int) -> int:
    """Every story of ``inputs`` in one file, shuffled (the data stream shuffles only within a small buffer)."""
    lines = []
    for path in inputs:
        with open(path) as f:
            lines += [line if line.endswith("\n") else line + "\n" for line in f if line.strip()]
    random.Random(seed).shuffle(lines)
    write_text(out, "".join(lines))
    return len(lines)


def main(argv=None) -> str:
    args = parse_args(__doc__.splitlines()[1], argv)
    cfg = load_config(args.config, args.overrides)
    out_dir, c = resolve_path(cfg.output_dir), cfg.corrected
    corrected, mixed = os.path.join(out_dir, "corrected.jsonl"), os.path.join(out_dir, "train_mix.jsonl")
    if int(os.environ.get("RANK", "0")) == 0:
        if not os.path.exists(mixed):
            os.makedirs(out_dir, exist_ok=True)
            result = write_corrected(
                c.get("preset", "demo"), corrected, resolve_path(cfg.data.train_jsonl),
                resolve_path(cfg.data.image_root), int(c.stories),
                [f"path={resolve_path(cfg.model.pretrained)}", *list(c.get("set", []) or [])],
                frames=int(c.get("frames", 30)), size=int(c.get("size", 128)), seed=int(cfg.train.get("seed", 0)),
                workers=int(c.get("workers", 1)))
            print(f"corrected stories: {json.dumps(result)}", flush=True)
            mix(mixed, [resolve_path(cfg.data.train_jsonl), corrected], int(cfg.train.get("seed", 0)))
    else:
        while not os.path.exists(mixed):  # the main process writes the stories; the others wait for them
            time.sleep(5)
    return stage2_agent.main(["--config", args.config, *(["--resume"] if args.resume else []), *args.overrides,
                              f"data.train_jsonl={mixed}"])


if __name__ == "__main__":
    main()
