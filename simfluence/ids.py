"""External ids of pool and test examples, and their internal positions.

Users name examples by the ids they logged (ints or strings); arrays, curricula and loss columns use
positions ``0..n-1``. :class:`IdIndex` is the one place that turns one into the other, with an error that
names the id at fault. An id matches by value, or by its text when the types differ (``"7"`` finds 7,
as a CSV round trip would write it), provided the texts are unambiguous.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from simfluence.errors import UnknownIdError


class IdIndex:
    """Positions of external ids (``"pool"`` or ``"test"`` ids of a run set or a fitted simulator).

    Parameters
    ----------
    ids : the external ids in position order.
    what : ``"pool"`` or ``"test"`` (used in error messages).
    """

    def __init__(self, ids: Sequence[Any], what: str) -> None:
        self.ids = list(ids)
        self.what = what
        self._by_value = {value: position for position, value in enumerate(self.ids)}
        texts = [str(value) for value in self.ids]
        self._by_text = {text: position for position, text in enumerate(texts)} if len(set(texts)) == len(texts) \
            else {}

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, value: Any) -> bool:
        return self._find(value) is not None

    def _find(self, value: Any) -> int | None:
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, (bool, float)):
            return None
        try:
            found = self._by_value.get(value)
        except TypeError:  # unhashable
            return None
        if found is None:
            found = self._by_text.get(str(value))
        return found

    def position(self, value: Any) -> int:
        """Position of one id; ``UnknownIdError`` naming it when it is not known."""
        found = self._find(value)
        if found is None:
            raise UnknownIdError(f"unknown {self.what} id {value!r}")
        return found

    def positions(self, values: Iterable[Any] | str) -> np.ndarray:
        """(n,) int64 positions of ids (a comma-separated string is split into ids)."""
        if isinstance(values, str):
            values = [part.strip() for part in values.split(",") if part.strip()]
        return np.array([self.position(value) for value in values], dtype=np.int64)

    def ids_of(self, positions: Iterable[int]) -> list:
        """External ids at the given positions."""
        return [self.ids[int(position)] for position in positions]
