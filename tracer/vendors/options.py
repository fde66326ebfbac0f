"""The build options and the facts about each model that need no vendor code, torch-free: the command line, the
sweep and a run served from the trace cache (tracer.core.cache) read them without importing torch or transformers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tracer.core.errors import FlopdiffError
from tracer.core.models import model

HUB = "hub:"  # --vendor-dir hub:ORG/NAME: the only way flopdiff reaches the network (code and config, no weights)


def parse_impl(text: str, flag: str) -> str | dict[str, str]:
    """An --attn/--experts value: 'sdpa', or 'text_config=flex_attention,vision_config=sdpa' (one per sub-config)."""
    if "=" not in text:
        return text
    try:
        return dict(part.split("=", 1) for part in text.split(","))
    except ValueError:
        raise FlopdiffError(f"{flag} {text!r}: expected NAME or SUBCONFIG=NAME[,SUBCONFIG=NAME...]") from None


@dataclass(frozen=True)
class BuildOptions:
    """How to load and instantiate the vendor model. `attn` / `experts` take one value or {sub_config: value}
    (None: the vendor's default). `mode`: "fake" (no weights, no compute) or "real" (random weights).
    `attn_plugins`: user attention functions (tracer.capture.attention), each usable by its name in `attn`."""

    attn: str | dict[str, str] | None = None
    experts: str | dict[str, str] | None = None
    dtype: str = "bfloat16"             # a torch dtype's name: the weights are built in it
    device: str = "cpu"
    mode: str = "fake"
    vendor_dir: str | None = None
    trust_remote_code: bool = False
    attn_plugins: tuple[str, ...] = ()  # [NAME=]module:function, registered as attention implementations


def implementations(attn: str | dict[str, str] | None) -> set[str]:
    """The attention implementation names an --attn value chooses."""
    return set(attn.values()) if isinstance(attn, dict) else {attn} if attn else set()


def attention_parts(name: str, options: BuildOptions) -> dict[str, str]:
    """The attention implementation of each analytic part the options choose ({"decoder": ..., "vision": ...}), and
    the experts implementation where the model has the choice ("experts": what carries their GEMMs and does their
    bookkeeping), from the model's row (tracer.core.models): --attn NAME is every part's, SUBCONFIG=NAME text_config's
    the decoder's and vision_config's the vision tower's, unless the vendor code fixes the tower's (deepseek-ocr:
    SAM and CLIP call scaled_dot_product_attention themselves)."""
    m = model(name)
    attn = options.attn or m.decoder_attn
    pick = lambda value, sub, default: value if isinstance(value, str) else value.get(sub, value.get("", default))  # noqa: E731
    parts = {"decoder": pick(attn, "text_config", m.decoder_attn),
             "vision": m.vision_attn or pick(attn, "vision_config", "sdpa")}
    if m.experts_choice:  # transformers' own default where the row names none
        parts["experts"] = pick(options.experts or m.default_experts or "grouped_mm", "text_config",
                                m.default_experts or "grouped_mm")
    return parts


def resolve_vendor_dir(vendor_dir: str | None, trust_remote_code: bool) -> str | None:
    """--vendor-dir as the local folder it names: itself, or for `hub:ORG/NAME` the snapshot of that repository's
    *.py and *.json files (its path names the repository and its commit, so the trace cache tells two repositories
    apart, and the analytic model reads the config of the code that runs). The hub is asked only after the
    --trust-remote-code check, once per process. A plain `ORG/NAME` that is no folder is an error: a typo must
    not send a request. Without --trust-remote-code it is left as given: the vendor adapter refuses it first."""
    if vendor_dir is None or not trust_remote_code:
        return vendor_dir
    if not vendor_dir.startswith(HUB):
        folder = Path(vendor_dir)
        if folder.is_dir():
            return str(folder.resolve())
        hint = f" (to fetch it from the Hugging Face hub, pass --vendor-dir {HUB}{vendor_dir})" \
            if vendor_dir.count("/") == 1 else ""
        raise FlopdiffError(f"--vendor-dir {vendor_dir}: no such folder{hint}")
    return _snapshot(vendor_dir[len(HUB):])


@functools.cache
def _snapshot(repo: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return str(Path(snapshot_download(repo, allow_patterns=["*.py", "*.json"])).resolve())
    except Exception as exc:  # offline, unknown repo, no huggingface_hub: say which and what to do
        raise FlopdiffError(f"--vendor-dir {HUB}{repo}: fetching {repo} from the hub failed "
                            f"({exc.__class__.__name__}); download its *.py and *.json files and pass the folder") from None
