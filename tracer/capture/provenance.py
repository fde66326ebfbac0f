"""Provenance: where each recorded op comes from. The module call stack (forward hooks on every module, with call
indices: `model.vision_tower#1...` is the second call) and the first source line outside torch and flopdiff, in
the vendor's own files when it has some. The recorder (tracer.capture.recorder) asks both for every op it records.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.nn.modules import module as nn_module

from tracer.capture.instruments import Instrument
from tracer.core.modulepaths import ROOT, call_path

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_TRACER_DIR = os.path.dirname(os.path.dirname(__file__)) + os.sep  # the tracer package: every flopdiff frame
_STDLIB_DIR = os.path.dirname(os.__file__) + os.sep


class ModuleStack:
    """Tracks which module is running via global forward hooks, with per-parent call indices."""

    def __init__(self, names: dict[int, str], instrument: Instrument | None = None):
        self.names = names
        self.instrument = instrument  # told of every named module call (tracer.capture.instruments)
        self.frames: list[tuple[str, str, str, dict[str, int]]] = []  # (path, qualified, class, child calls)
        self.root_calls: dict[str, int] = {}
        self._snapshot: tuple[dict[str, tuple[str, str]], str, str, str] | None = None

    def push(self, module, *_):
        self._snapshot = None
        path = self.names.get(id(module))
        if path is None or path == "":
            self.frames.append(("", "", "", {}))
            return
        calls = self.frames[-1][3] if self.frames else self.root_calls
        k = calls.get(path, 0)
        calls[path] = k + 1
        parent_q = next((f[1] for f in reversed(self.frames) if f[0]), "")
        parent_p = next((f[0] for f in reversed(self.frames) if f[0]), "")
        qualified = call_path(parent_q, parent_p, path, k)
        self.frames.append((path, qualified, type(module).__qualname__, {}))
        if self.instrument is not None:
            self.instrument.enter_module(path, qualified)

    def pop(self, *_):
        self._snapshot = None
        if self.frames:
            path = self.frames.pop()[0]
            if self.instrument is not None and path:
                self.instrument.exit_module()

    def snapshot(self) -> tuple[dict[str, tuple[str, str]], str, str, str]:
        """(nn_module_stack, path, qualified path, class) of the innermost module; cached between hooks, as
        every op of one module shares it (node metas share the stack dict: read-only by contract)."""
        if self._snapshot is None:
            stack = {p: (q, c) for p, q, c, _ in self.frames if p}
            inner = next(((p, q, c) for p, q, c, _ in reversed(self.frames) if p), (ROOT, ROOT, ""))
            self._snapshot = (stack, *inner)
        return self._snapshot


@contextmanager
def module_hooks(stack: ModuleStack) -> Iterator[None]:
    pre = nn_module.register_module_forward_pre_hook(stack.push)
    try:
        post = nn_module.register_module_forward_hook(stack.pop, always_call=True)
    except TypeError:  # torch < 2.1 has no always_call
        post = nn_module.register_module_forward_hook(stack.pop)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


class SourceLocator:
    """Maps the Python stack at dispatch time to `file:line` strings (cached per code file)."""

    def __init__(self, vendor_roots: Iterable[str]):
        self.vendor_roots = tuple(os.path.abspath(r) + os.sep for r in vendor_roots)
        self._rel: dict[str, str] = {}

    def _relative(self, filename: str) -> str:
        rel = self._rel.get(filename)
        if rel is None:
            rel = filename
            parts = Path(filename).parts
            if "site-packages" in parts:
                rel = "/".join(parts[parts.index("site-packages") + 1:])
            else:
                for root in self.vendor_roots:
                    if filename.startswith(root):  # the vendor's own file name: its folder is the user's
                        rel = filename[len(root):]
                        break
            self._rel[filename] = rel
        return rel

    def locate(self) -> tuple[str, str, str]:
        """(source, vendor_source, vendor_function) of the op being recorded."""
        source = vendor = function = ""
        frame = sys._getframe(2)
        while frame is not None and not vendor:
            fn = frame.f_code.co_filename
            if not source and not fn.startswith((_TORCH_DIR, _TRACER_DIR, _STDLIB_DIR)) and not fn.startswith("<"):
                source = f"{self._relative(fn)}:{frame.f_lineno}"
            if fn.startswith(self.vendor_roots):
                vendor = f"{self._relative(fn)}:{frame.f_lineno}"
                function = frame.f_code.co_name
            frame = frame.f_back
        return source, vendor, function
