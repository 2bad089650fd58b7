#!/usr/bin/env python
"""Dev-only: regenerate ``seedstory/checkpoints/manifests/*.json.gz`` from full key manifests.

A full manifest (one JSON per released weight file, made by building the release's reference modules at full
size on the ``meta`` device) lists every state-dict key of the file with its shape, role and expected dtype. This script packs each into a small gzipped JSON that
ships with the package, so nothing outside the package is read at run time or in tests:

    {"name": ..., "file": <path under ./pretrained>, "summary": {counts, configs},
     "keys": {key: [shape, role, dtype]}}

role: "t" trainable, "f" frozen (requires_grad=False), "b" persistent buffer, "p" plain parameter dump.
dtype: "f32", "bf16", or "?" (depends on how the file was made).

Usage:  python scripts/build_manifests.py --src DIR_OF_FULL_MANIFESTS
"""
from __future__ import annotations

import argparse
import gzip
import json
import os

from seedstory.atomic import write_file

NAMES = ["agent_seed_story_george_sft", "agent_seedx_pretrained", "detokenizer_pretrained",
         "detokenizer_george_adapted", "qwen_vit_G"]
SUMMARY_FIELDS = ["file", "config", "total_keys", "total_params", "trainable_keys", "frozen_keys", "buffer_keys",
                  "if_saved_with_zero1_or_without_frozen_params", "sdxl_unet_config"]
HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "seedstory", "checkpoints", "manifests")


def role_letter(role: str) -> str:
    if role == "trainable":
        return "t"
    if role.startswith("frozen") or "requires_grad=False" in role:
        return "f"
    if "buffer" in role:
        return "b"
    if role.startswith("parameter"):
        return "p"
    raise ValueError(f"unknown role {role!r}")


def dtype_letter(dtype: str) -> str:
    return {"float32": "f32", "bfloat16": "bf16"}.get(dtype.split(" ")[0], "?")


def build(src: str, out: str) -> None:
    os.makedirs(out, exist_ok=True)
    for name in NAMES:
        with open(os.path.join(src, name + ".json")) as f:
            m = json.load(f)
        summary = {k: m["summary"][k] for k in SUMMARY_FIELDS if k in m["summary"]}
        summary["file"] = summary["file"].split(" ")[0]
        keys = {k: [shape, role_letter(m["roles"][k]), dtype_letter(m["expected_dtype_in_file"][k])]
                for k, shape in m["keys"].items()}
        packed = {"name": name, "file": summary["file"], "summary": summary, "keys": keys}
        path = os.path.join(out, name + ".json.gz")
        data = json.dumps(packed, separators=(",", ":"), sort_keys=False).encode()

        def fill(f, data=data):  # mtime=0: byte-identical output on every run
            with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as gz:
                gz.write(data)

        write_file(path, fill)
        print(f"{path}: {len(keys)} keys, {os.path.getsize(path)} bytes")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, help="folder of the full manifests (<name>.json each)")
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    build(args.src, args.out)
