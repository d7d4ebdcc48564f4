"""The models one server serves, by name: the decoder (if any) and the batched encoders and image classifiers.

Every front (gRPC, KServe v2, HTTP) resolves a request's model name here, so all
of them answer an unknown or ambiguous name, or a model of the wrong kind, alike:

    resolve("", kind)      the only model of that kind; none or several: an error naming the choices
    resolve(name, kind)    that model; unknown: NOT_FOUND listing the served names; another kind: INVALID_ARGUMENT
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence, Union

from server.contract import KIND_DECODER, KINDS, ModelCard
from server.encoders import DOES, BatchedModel
from server.errors import InvalidRequestError, NotFoundError
from server.images import ImageLimits


@dataclass(frozen=True)
class DecoderModel:
    """The decoder's entry: served by the engine (server/engine.py) through GenerationService."""

    name: str
    card: ModelCard
    kind: str = KIND_DECODER


Model = Union[DecoderModel, BatchedModel]


class ServedModels:
    """`image_limits`: how every front decodes the images it is sent (server/images.py), the server's settings."""

    def __init__(self, decoder: Optional[DecoderModel], batched: Sequence[BatchedModel] = (),
                 image_limits: ImageLimits = ImageLimits(max_bytes=4 * 1024 * 1024, max_pixels=4096 * 4096)):
        models = ([decoder] if decoder is not None else []) + list(batched)
        names = [m.name for m in models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"two model dirs are both named {', '.join(repeated)}; every model served needs "
                             "a name of its own (the card's name)")
        self.decoder = decoder
        self.image_limits = image_limits
        self.batched: dict[str, BatchedModel] = {m.name: m for m in batched}
        self._models: dict[str, Model] = {m.name: m for m in models}

    @property
    def names(self) -> list[str]:
        """Every name served, the decoder first, then in the order the model dirs were given."""
        return list(self._models)

    def of_kind(self, kind: str) -> list[Model]:
        return [m for m in self._models.values() if m.kind == kind]

    def describe(self) -> str:
        return ", ".join(f"{m.name} ({m.kind})" for m in self._models.values()) or "none"

    def get(self, name: str) -> Model:
        try:
            return self._models[name]
        except KeyError:
            raise NotFoundError(f"model {name[:100]!r} is not served here; this server serves "
                                f"{self.describe()}") from None

    def default(self) -> Model:
        """What an empty name means where any kind will do (GetModelInfo): the decoder, or the only model."""
        if self.decoder is not None:
            return self.decoder
        if len(self._models) == 1:
            return next(iter(self._models.values()))
        raise InvalidRequestError("name", f"is empty and this server serves several models: {self.describe()}; "
                                          "name one")

    def resolve(self, name: str, kind: str, field: str = "model") -> Model:
        """The model a request names (empty: the only one of `kind`), checked to be of `kind`."""
        if kind not in KINDS:
            raise ValueError(f"unknown model kind {kind!r}")
        if not name:
            candidates = self.of_kind(kind)
            if len(candidates) == 1:
                return candidates[0]
            if not candidates:
                raise NotFoundError(f"no model here {DOES[kind]}; this server serves {self.describe()}")
            raise InvalidRequestError(field, f"is empty and {len(candidates)} {kind} models are served here: "
                                             f"{', '.join(m.name for m in candidates)}; name one")
        model = self.get(name)
        if model.kind != kind:
            others = ", ".join(m.name for m in self.of_kind(kind)) or "none is served"
            raise InvalidRequestError(field, f"{name[:100]!r} {DOES[model.kind]}; this call needs a model that "
                                             f"{DOES[kind]} (served: {others})")
        return model

    # ---- lifecycle of the batched models (the decoder's engine is the app's) ----

    def start(self) -> None:
        for model in self.batched.values():
            model.start()

    def begin_drain(self) -> None:
        for model in self.batched.values():
            model.begin_drain()

    def wait_idle(self, timeout: Optional[float]) -> bool:
        """True once every batched model is idle; `timeout` bounds the whole wait."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for model in self.batched.values():
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            if not model.wait_idle(left):
                return False
        return True

    def stop(self) -> None:
        for model in self.batched.values():
            model.stop()
