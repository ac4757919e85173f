"""Partial loading of a Hugging Face safetensors checkpoint: only the tensors a role needs.

A role loads only its weights (DESIGN §7): the encoder the vision tower, prefill and decode the
language model. The input stays an HF checkpoint directory, single-file (``model.safetensors``)
or sharded (``model.safetensors.index.json`` + shards); ``safetensors.safe_open`` reads one
tensor at a time from the memory-mapped file, so tensors of other parts are never read.

* :class:`Checkpoint` — which file holds each tensor, under the model's module names
  (checkpoint keys renamed by the family's rules, as transformers' ``conversion_mapping`` does);
  :meth:`Checkpoint.load_into` assigns a submodule's tensors.
* :class:`MissingPart` — stands in for a submodule that was not loaded; using it names the part.
* :class:`MissingWeightsError` — the checkpoint holds no tensor at all of a part the process needs
  (a vision-only or LM-only checkpoint given to the wrong role): a configuration error naming
  ``EPD_MODEL``, so the service prints one line and exits 2.
* :func:`build_empty` — constructs a module as ``from_pretrained`` would (default dtype set,
  no weight init) but without touching its parameter memory, for the tensors to be assigned.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from epd.config import ConfigError

__all__ = [
    "SINGLE_FILE", "INDEX_FILE", "Checkpoint", "MissingPart", "MissingWeightsError", "PartNotLoadedError",
    "build_empty",
]

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class PartNotLoadedError(RuntimeError):
    """An operation needs weights of a part this model was loaded without."""


class MissingWeightsError(ConfigError):
    """The checkpoint directory (``EPD_MODEL``) holds no tensor of a part a role needs.

    Message: ``EPD_MODEL: <dir> has no <part> weights (needed by role <roles>)``. A
    :class:`~epd.config.ConfigError`, so a service entry point prints it as one line and exits 2.
    """

    def __init__(self, directory: Path, part: str, needed_by: Iterable[str] = ()) -> None:
        roles = " or ".join(needed_by)
        suffix = f" (needed by role {roles})" if roles else ""
        super().__init__(f"EPD_MODEL: {directory} has no {part} weights{suffix}")
        self.directory, self.part = directory, part


class MissingPart(nn.Module):
    """Placeholder for a submodule left out of a partial load; holds no parameters.

    Calling it raises :class:`PartNotLoadedError`; reading an attribute it lacks raises an
    ``AttributeError`` naming the part, so code that reaches into it fails with a clear message.
    """

    def __init__(self, part: str, loaded: Iterable[str]) -> None:
        super().__init__()
        self.part = part
        self.loaded = tuple(sorted(loaded))

    def message(self) -> str:
        part, loaded = self.__dict__.get("part"), self.__dict__.get("loaded", ())  # safe before __init__ ran
        return f"the {part!r} weights were not loaded (this model holds: {', '.join(loaded) or 'none'})"

    def forward(self, *args, **kwargs):
        raise PartNotLoadedError(self.message())

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            raise AttributeError(f"{name!r}: {self.message()}") from None

    def extra_repr(self) -> str:
        return f"part={self.part!r}"


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_empty(factory: Callable[[], nn.Module], dtype: torch.dtype, *, meta: bool = False) -> nn.Module:
    """Construct ``factory()`` for loading: default dtype ``dtype``, weight init skipped.

    With ``meta=False`` the module lives on the CPU: buffers computed in ``__init__`` (rotary
    ``inv_freq``, non-persistent, absent from checkpoints) get their real values, while
    parameters are ``torch.empty`` storage that is never written before
    :meth:`Checkpoint.load_into` replaces it (so it never becomes resident). With ``meta=True``
    nothing is allocated at all (a skeleton whose parts are swapped in afterwards).
    Follows what ``PreTrainedModel.from_pretrained`` does (``transformers.initialization.no_init_weights``
    and the default dtype set to the load dtype).
    """
    from transformers.initialization import no_init_weights

    with _default_dtype(dtype), no_init_weights(), torch.device("meta" if meta else "cpu"):
        return factory()


class Checkpoint:
    """A safetensors checkpoint directory: tensor names (as module names) → file and key.

    Args:
        model_dir: directory with ``model.safetensors`` or ``model.safetensors.index.json``.
        renames: ``(pattern, replacement)`` regex pairs; the first whose pattern matches a
            checkpoint key rewrites it into the module name (keys no pattern matches are
            taken as they are).

    Raises:
        FileNotFoundError: neither file exists (``pytorch_model.bin`` checkpoints are not read).
        ValueError: two checkpoint keys map to one module name.
    """

    def __init__(self, model_dir: str | Path, renames: Iterable[tuple[str, str]] = ()) -> None:
        self.directory = Path(model_dir)
        rules = [(re.compile(p), r) for p, r in renames]
        self._where: dict[str, tuple[str, str]] = {}  # module name -> (file name, checkpoint key)
        for key, file in self._weight_map().items():
            name = key
            for pattern, repl in rules:
                if pattern.search(key):
                    name = pattern.sub(repl, key, count=1)
                    break
            if name in self._where:
                raise ValueError(f"{self.directory}: keys {self._where[name][1]!r} and {key!r} both map to {name!r}")
            self._where[name] = (file, key)

    def _weight_map(self) -> dict[str, str]:
        index = self.directory / INDEX_FILE
        if index.is_file():
            return dict(json.loads(index.read_text())["weight_map"])
        single = self.directory / SINGLE_FILE
        if single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                return dict.fromkeys(f.keys(), SINGLE_FILE)
        raise FileNotFoundError(f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors is read)")

    def names(self, prefix: str = "") -> list[str]:
        """Module names of the checkpoint's tensors under ``prefix`` (``""``: all), sorted."""
        return sorted(n for n in self._where if n.startswith(prefix))

    def load_into(
        self,
        module: nn.Module,
        prefix: str,
        *,
        device: torch.device,
        dtype: torch.dtype,
        ignore: tuple[str, ...] = (),
        part: str = "",
        needed_by: Iterable[str] = (),
    ) -> int:
        """Assign the tensors named ``prefix.*`` to ``module``'s parameters and persistent buffers.

        Reads only those tensors; floating-point ones are cast to ``dtype``; each lands on
        ``device`` and becomes the module's storage (``load_state_dict(assign=True)``: no copy
        into preallocated memory). Buffers the checkpoint does not hold (non-persistent) stay
        as constructed. A tensor already in ``dtype`` on the CPU stays a view of safetensors'
        private memory map of the file (as with ``from_pretrained``): its pages become resident
        when first read, and the file's other tensors never do.

        Args:
            module: the submodule, built with :func:`build_empty`.
            prefix: its module name in the full model, e.g. ``"model.visual"``.
            device, dtype: where and in which floating dtype the tensors live.
            ignore: regexes of checkpoint names under ``prefix`` to skip (stale buffers).
            part, needed_by: what the module is (``"vision"``) and which roles load it, for
                :class:`MissingWeightsError`.

        Returns:
            Bytes of the tensors assigned.

        Raises:
            MissingWeightsError: the checkpoint has no tensor at all under ``prefix``.
            ValueError: a tensor of ``module`` is missing from the checkpoint, or the checkpoint
                has a tensor under ``prefix`` that ``module`` lacks (names the first few).
        """
        lead = prefix + "."
        wanted = set(module.state_dict(keep_vars=True))
        have = {n[len(lead) :] for n in self.names(lead) if not any(re.search(p, n) for p in ignore)}
        if wanted and not have:
            raise MissingWeightsError(self.directory, part or prefix, needed_by)
        missing, unexpected = sorted(wanted - have), sorted(have - wanted)
        if missing or unexpected:
            raise ValueError(
                f"{self.directory}: {prefix}: {len(missing)} tensors missing {missing[:5]}, "
                f"{len(unexpected)} unexpected {unexpected[:5]}"
            )
        state = dict(self._read([lead + n for n in sorted(wanted)], device, dtype))
        module.load_state_dict({n[len(lead) :]: t for n, t in state.items()}, strict=True, assign=True)
        return sum(t.numel() * t.element_size() for t in state.values())

    def _read(self, names: list[str], device: torch.device, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = defaultdict(list)
        for n in names:
            by_file[self._where[n][0]].append(n)
        for file, group in sorted(by_file.items()):
            with safe_open(self.directory / file, framework="pt") as f:
                for n in group:
                    t = f.get_tensor(self._where[n][1])
                    yield n, t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
