"""The configured backends, by name, made once at start-up and closed at shutdown."""

from __future__ import annotations

from collections.abc import Mapping

from toolchain_service.backends.base import ChatBackend
from toolchain_service.backends.budget import ByteBudget
from toolchain_service.config import BackendSettings
from toolchain_service.errors import NotFoundError


def build_backend(name: str, settings: BackendSettings, budget: ByteBudget | None = None) -> ChatBackend:
    """A backend; `budget`: the process's cap on bytes its streams hold for their callers."""
    if settings.kind == "local":
        from toolchain_service.backends.local_model import LocalModelBackend  # noqa: PLC0415

        return LocalModelBackend(name, settings, budget)
    from toolchain_service.backends.openai_http import OpenAIHTTPBackend  # noqa: PLC0415

    return OpenAIHTTPBackend(name, settings, budget)


class BackendRegistry:
    def __init__(
        self, backends: Mapping[str, ChatBackend], default: str, budget: ByteBudget | None = None
    ) -> None:
        self._backends = dict(backends)
        self.default = default
        #: The cap the backends' streams share (max_buffered_bytes), when they were built with one.
        self.budget = budget

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, BackendSettings], default: str, budget: ByteBudget | None = None
    ) -> BackendRegistry:
        return cls({name: build_backend(name, s, budget) for name, s in settings.items()}, default, budget)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._backends))

    def all(self) -> list[ChatBackend]:
        return list(self._backends.values())

    def resolve(self, name: str) -> ChatBackend:
        backend = self._backends.get(name or self.default)
        if backend is None:
            raise NotFoundError(f"no backend named {name!r}; configured backends: {', '.join(self.names())}")
        return backend

    def resolve_model(self, backend: ChatBackend, model: str) -> str:
        """The model to call: the requested one (if the backend allows it) or its default."""
        allowed = backend.info.models
        if not model:
            return backend.info.default_model or (allowed[0] if allowed else "default")
        if allowed and model not in allowed:
            raise NotFoundError(
                f"backend {backend.name!r} does not offer model {model!r}; available: {', '.join(allowed)}"
            )
        return model

    def any_ready(self) -> bool:
        return any(b.is_ready() for b in self._backends.values())

    async def start(self) -> None:
        for backend in self._backends.values():
            await backend.start()

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()
