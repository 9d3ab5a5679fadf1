"""What a front-end holds of the engine process it is connected to: the connection itself, and the
model that engine serves as the front-end needs it (`ModelView`, read once per request)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from api.engine.images.recipe import Recipe
from api.engine.model.served import Served
from api.remote import wire
from api.remote.messages import ModelOffer


@dataclass(frozen=True)
class ModelView:
    """One model the engine serves, as a front-end needs it: read once per request, so the pixels,
    the labels and the version in an answer all belong to the model that produced its scores."""

    epoch: int  # which engine process (connection) offered it
    generation: int
    served: Served
    recipe: Recipe
    reduce_to: int | None
    ship_decoded_bytes: int
    described: dict[str, Any]

    @classmethod
    def offered(cls, epoch: int, offer: ModelOffer) -> ModelView:
        return cls(
            epoch,
            offer.generation,
            offer.served,
            offer.recipe,
            offer.reduce_to,
            offer.ship_decoded_bytes,
            offer.described,
        )

    def prepares_like(self, other: ModelView) -> bool:
        """Pixels prepared for `other` are right for this model, and its labels are the same."""
        return self.recipe == other.recipe and self.served.class_names == other.served.class_names


@dataclass(frozen=True)
class Connection:
    """One engine process, as this front-end is connected to it."""

    sock: socket.socket
    board: wire.Board
    index: int  # this front-end's row on the board
    pid: int
