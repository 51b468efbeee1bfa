"""The adapter registry of a many-adapter deployment (Ray Serve model multiplexing, deploy/ray/multiplex_app.py):
which adapters may be loaded on demand, by name. The operator's list, never the client's: a request
names an adapter, and only a name listed here is loaded; a client never gives a path.

The registry is a file or a folder:

* a ``.json`` file (a list of adapter objects) or a ``.toml`` file (``[[adapters]]`` tables): the
  entries of ``TFB_ADAPTERS`` (name; adapter folder or hub id, or a published name; task, labels,
  sigma, anchor, calibration...), each checked as ``TFB_ADAPTERS`` checks them;
* a folder: every sub-folder holding an ``adapter_config.json`` is an adapter named after the
  sub-folder; an optional ``tfb.json`` beside it sets its other fields (task, labels, sigma, anchor...).

It is read at start (a bad registry: :class:`RegistryError` naming the file and the entry, and the
deployment does not start) and read again when it changes (its modification time, polled at most
every ``poll_s``); a registry that turns bad later is refused with an error in the log, and the last
good one stays in force.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from app.settings import AdapterSpec, Settings, parse_adapters
from tfb_core.data.loading import is_local_adapter
from tfb_core.data.tasks import get_task

log = logging.getLogger("app")

#: a registry folder's adapter: a sub-folder with this file (peft's)
ADAPTER_FILE = "adapter_config.json"
#: the other fields of a registry folder's adapter (task, labels, sigma, anchor, calibration...)
FIELDS_FILE = "tfb.json"


class RegistryError(ValueError):
    """A registry that cannot be used: the message names the file and the entry."""


class NotInRegistryError(KeyError):
    """A request named an adapter the registry does not list."""

    def __str__(self) -> str:
        return str(self.args[0])


class Registry:
    """The adapters that may be loaded, by name (:meth:`get`), re-read when the file changes.

    ``settings``: the server's (an entry's fields not given are the server's, as in ``TFB_ADAPTERS``);
    ``reserved``: names served otherwise (the replica's start-up adapters), which an entry may not take."""

    def __init__(self, path: str | os.PathLike[str], settings: Settings, reserved: set[str] | frozenset[str] = frozenset(),
                 poll_s: float = 2.0) -> None:
        self.path = Path(path).expanduser()
        self.settings = settings
        self.reserved = frozenset(reserved)
        self.poll_s = poll_s
        self.entries: dict[str, AdapterSpec] = {}
        #: why the last re-read was refused (None: the file in force is the one on disk)
        self.error: str | None = None
        self.reloads = 0
        self._stamp: Any = None
        self._checked = 0.0
        self._lock = threading.Lock()
        try:
            stamp = self._stamp_now()  # before the read: a change while it reads is read again
        except OSError:
            stamp = None  # missing: the read says so
        self.entries = self._read()  # at start: a bad registry raises
        self._stamp, self._checked = stamp, time.monotonic()

    @property
    def label(self) -> str:
        """How a client's error names it: the file's or folder's name, not where it is on the server."""
        return f"the adapter registry ({self.path.name})"

    # --- queries ----------------------------------------------------------------------------------
    def get(self, name: str) -> AdapterSpec:
        """The entry of ``name`` (the registry re-read first if it changed); :class:`NotInRegistryError`
        naming the registry if it is not listed."""
        self.refresh()
        spec = self.entries.get(name)
        if spec is None:
            raise NotInRegistryError(f"adapter {name!r} is not in {self.label}: this deployment loads only the "
                                     "adapters its operator lists there")
        return spec

    def names(self) -> list[str]:
        self.refresh()
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        self.refresh()
        return name in self.entries

    # --- reading ----------------------------------------------------------------------------------
    def refresh(self, force: bool = False) -> bool:
        """Read the registry again if it changed since it was read (checked at most every ``poll_s``
        unless ``force``). True if a new registry is in force; a bad one is refused (logged, kept in
        :attr:`error`), the last good one stays."""
        now = time.monotonic()
        if not force and now - self._checked < self.poll_s:
            return False
        with self._lock:
            self._checked = now
            try:
                stamp = self._stamp_now()
            except OSError as exc:
                return self._refuse(f"{self.path}: {exc}")
            if stamp == self._stamp:
                return False
            try:
                entries = self._read()
            except RegistryError as exc:
                self._stamp = stamp  # not read again until it changes again
                return self._refuse(str(exc))
            added, removed = sorted(set(entries) - set(self.entries)), sorted(set(self.entries) - set(entries))
            self.entries, self._stamp, self.error = entries, stamp, None
            self.reloads += 1
            log.info("adapter registry %s re-read: %d adapters (%d added, %d removed)", self.path, len(entries),
                     len(added), len(removed))
            return True

    def _refuse(self, reason: str) -> bool:
        self.error = reason
        log.error("adapter registry not re-read, the last good one stays in force: %s", reason)
        return False

    def _stamp_now(self) -> Any:
        """What changes when the registry does: the file's (size, mtime), or the folder's and its entries'."""
        st = self.path.stat()
        if not self.path.is_dir():
            return (st.st_size, st.st_mtime_ns)
        parts = [(str(self.path), st.st_mtime_ns)]
        for sub in sorted(self.path.iterdir()):
            for f in (sub / FIELDS_FILE, sub / ADAPTER_FILE):
                if f.is_file():
                    parts.append((str(f), f.stat().st_mtime_ns))
        return tuple(parts)

    def _raw(self) -> list[Any]:
        if not self.path.exists():
            raise RegistryError(f"adapter registry {self.path}: no such file or folder")
        if self.path.is_dir():
            out = []
            for sub in sorted(self.path.iterdir()):
                if not (sub / ADAPTER_FILE).is_file():
                    continue
                entry: dict[str, Any] = {"name": sub.name, "adapter": str(sub)}
                fields = sub / FIELDS_FILE
                if fields.is_file():
                    try:
                        extra = json.loads(fields.read_text())
                    except ValueError as exc:
                        raise RegistryError(f"adapter registry {fields}: not JSON: {exc}") from None
                    if not isinstance(extra, dict):
                        raise RegistryError(f"adapter registry {fields}: expected a JSON object")
                    entry.update({k: v for k, v in extra.items() if k not in ("name", "adapter", "path")})
                out.append(entry)
            return out
        if self.path.suffix not in (".json", ".toml"):
            raise RegistryError(f"adapter registry {self.path}: expected a .json or .toml file, or a folder")
        try:
            raw = parse_adapters(str(self.path))
        except ValueError as exc:
            raise RegistryError(f"adapter registry {self.path}: {exc}") from None
        if not isinstance(raw, list):
            raise RegistryError(f"adapter registry {self.path}: expected a list of adapters (JSON) or [[adapters]] "
                                "tables (TOML)")
        return raw

    def _read(self) -> dict[str, AdapterSpec]:
        raw = self._raw()
        out: dict[str, AdapterSpec] = {}
        for i, item in enumerate(raw, 1):
            where = f"adapter registry {self.path}: entry {i}" + (
                f" ({item.get('name')!r})" if isinstance(item, dict) and item.get("name") else "")
            try:
                spec = TypeAdapter(AdapterSpec).validate_python(item)
            except ValidationError as exc:
                reasons = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ())) or 'entry'}: {e['msg']}"
                                    for e in exc.errors())
                raise RegistryError(f"{where}: {reasons}") from None
            if spec.name in out:
                raise RegistryError(f"{where}: the name {spec.name!r} is listed twice")
            if spec.name in self.reserved:
                raise RegistryError(f"{where}: {spec.name!r} is the name of an adapter every replica serves from "
                                    "start-up; give the registry's adapter another name")
            if spec.adapter is not None and is_local_adapter(spec.adapter) and not Path(spec.adapter).expanduser().is_dir():
                raise RegistryError(f"{where}: adapter folder {spec.adapter!r} does not exist")
            for f in ("anchor", "calibration"):
                value = getattr(spec, f)
                if value is not None and not Path(value).expanduser().is_file():
                    raise RegistryError(f"{where}: {f} file {value!r} does not exist")
            try:
                cfg = self.settings.adapter_config(spec).with_defaults()
                get_task(cfg.task, cfg.labels)  # what it classifies (or generates) is known now, not at its load
            except ValueError as exc:  # TaskError too
                raise RegistryError(f"{where}: {exc}") from None
            out[spec.name] = spec
        if not out:
            raise RegistryError(f"adapter registry {self.path}: it lists no adapter")
        return out
