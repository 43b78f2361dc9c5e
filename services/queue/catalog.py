"""Which handlers exist: workers register theirs in the database; this caches the list."""

from __future__ import annotations

import asyncio
import time

from fairlane_server.queue.store import HandlerSpec, RequestStore


class HandlerCatalog:
    def __init__(self, store: RequestStore, *, max_age_seconds: float) -> None:
        self._store = store
        self._max_age = max_age_seconds
        self._specs: dict[str, HandlerSpec] = {}
        self._loaded_at = float("-inf")
        self._lock = asyncio.Lock()

    async def get(self, name: str) -> HandlerSpec | None:
        """The handler's spec; an unknown name reloads the list at most once per max_age."""
        spec = self._specs.get(name)
        if spec is not None or time.monotonic() - self._loaded_at < self._max_age:
            return spec
        async with self._lock:
            if time.monotonic() - self._loaded_at >= self._max_age:
                self._specs = await self._store.handler_specs()
                self._loaded_at = time.monotonic()
        return self._specs.get(name)
