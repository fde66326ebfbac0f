"""`--workload-config FILE`: the workload knobs read from the user's own inference configuration (a Hydra / OmegaConf
YAML laid out like `conf/model/deepseek_ocr/infer/*.yaml`), so that one file drives the vendor run and flopdiff.

    preprocess: {base_size: 1024, image_size: 640, crop_mode: true}   # -> --base-size, --tile-size, --crop-mode
    decoder_prompt: "<image>\\n<|grounding|>Convert the document to markdown. "   # -> --prompt (with --tokenizer)
    max_new_tokens: 20                                                 # -> --decode-steps

A flag given on the command line wins over the file (`--text-tokens` over `decoder_prompt`: the count given); keys
the file lacks keep their defaults; other keys are the vendor's and are left alone. Interpolations are resolved
within the file. A value of the wrong type, or an interpolation that does not resolve, is one line naming the file
and the key.
"""

from __future__ import annotations

import argparse
from typing import Any

from omegaconf import OmegaConf

from tracer.core.errors import FlopdiffError

#: file key -> (the flag's dest, its spellings, the type it takes)
KEYS: dict[str, tuple[str, tuple[str, ...], type]] = {
    "preprocess.base_size": ("base_size", ("--base-size",), int),
    "preprocess.image_size": ("tile_size", ("--tile-size",), int),
    "preprocess.crop_mode": ("crop_mode", ("--crop-mode", "--no-crop-mode"), bool),
    "decoder_prompt": ("prompt", ("--prompt", "--text-tokens"), str),
    "max_new_tokens": ("decode_steps", ("--decode-steps",), int),
}


def apply(args: argparse.Namespace, argv: list[str]) -> str:
    """Fill the flags the command line left unset from `args.workload_config`; a note line saying what it took."""
    path = getattr(args, "workload_config", None)
    if not path:
        return ""
    where = f"--workload-config {path}"
    try:
        cfg = OmegaConf.load(path)
    except FileNotFoundError:
        raise FlopdiffError(f"{where}: no such file") from None
    except Exception as exc:  # the YAML parser and OmegaConf raise several types
        raise FlopdiffError(f"{where}: not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    took = []
    for key, (dest, spellings, kind) in KEYS.items():
        try:
            value: Any = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        except Exception as exc:  # an interpolation to a key the file lacks, a resolver it has not
            raise FlopdiffError(f"{where}: {key}: {' '.join(str(exc).split())[:160]}") from None
        if value is None or any(a == s or a.startswith(s + "=") for a in argv for s in spellings):
            continue
        if type(value) is not kind:
            raise FlopdiffError(f"{where}: {key} = {value!r}: must be {kind.__name__ if kind is not bool else 'true or false'}")
        setattr(args, dest, value)
        took.append(f"{dest} {value!r}" if kind is str else f"{dest} {str(value).lower()}")
    return f"{where}: " + (", ".join(took) if took else "nothing taken (the command line gave every knob it has)")
