"""The edit language of counterfactual curricula: pure edits of a curriculum, named by external pool ids.

An :class:`Edit` is one change of a base curriculum (remove, keep, duplicate, move, swap, reverse, replace,
truncate); :func:`parse_edit` / :func:`parse_scenario` read them from text (``"remove:12,40;reverse"``, as on the
command line) and :func:`apply_edits` applies them in order. Edits know curricula and pool ids, never a
simulator: the questions asked about edited curricula live in :mod:`simfluence.counterfactual.queries` and
:mod:`simfluence.counterfactual.search`.

Every edit that moves examples keeps every batch's size (:func:`move_all`): training used batches of a fixed
size, and a simulator fitted on them knows nothing of a batch of 100. An edit naming an example that the base
curriculum does not contain is an error, never a silent zero change.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from simfluence.curriculum import Curriculum
from simfluence.errors import CurriculumError
from simfluence.ids import IdIndex

_EDIT_KINDS = ("remove", "keep", "duplicate", "move", "swap", "reverse", "replace", "truncate")


@dataclass(frozen=True)
class Edit:
    """One pure edit of a curriculum, naming pool examples by their external ids.

    Build them with :func:`parse_edit` (``"remove:12,40"``, ``"duplicate:5@10"``, ``"move:5@100"``,
    ``"swap:3,7"``, ``"reverse"``, ``"keep:1,2,3"``, ``"replace:3>9"``, ``"truncate:50"``; ids are pool ids,
    numbers after ``@`` and the arguments of swap / truncate are steps) or directly, e.g.
    ``Edit("remove", (12, 40))``. :meth:`apply` resolves the ids with the pool ids of a run set or fitted
    simulator.

    What each edit does:

    - ``remove:ID,...`` drops every occurrence (those batches shrink); ``keep:ID,...`` drops every other example;
    - ``duplicate:ID`` doubles every occurrence in place; ``duplicate:ID@T`` adds one occurrence to step T's batch
      (it grows by one);
    - ``move:ID@T`` moves **every** occurrence of ID to step T, ``move:ID#K@T`` only its K-th occurrence (K = 1,
      2, ... in curriculum order); ``Edit("move", (ID, T))`` / ``Edit("move", (ID, T, K))``. Moves keep every
      batch's size (:func:`move_all`): the moved occurrences fill step T's batch from its first slot (and the
      following steps when there are more of them than it holds; the last entries of the curriculum when even
      those run out), and the entries in between shift over by one slot per moved occurrence;
    - ``swap:A,B`` exchanges two steps' batches, ``reverse`` reverses their order, ``truncate:T`` keeps the first T
      steps, ``replace:OLD>NEW`` puts NEW wherever OLD was.
    """

    kind: str
    args: tuple = ()

    def __post_init__(self) -> None:
        if self.kind not in _EDIT_KINDS:
            raise CurriculumError(f"unknown edit {self.kind!r}; choose from {', '.join(_EDIT_KINDS)}")

    def apply(self, curriculum: Curriculum, pool: IdIndex) -> Curriculum:
        """The edited copy of ``curriculum`` (pool positions), resolving example ids with ``pool``.

        An example that must occur in the curriculum (remove, keep, move, replace's old id, duplicate without a
        step) and does not is a ``CurriculumError`` naming it.
        """
        args = self.args
        if self.kind in ("swap", "reverse", "truncate"):
            if self.kind == "swap":
                return curriculum.swap_batches(args[0], args[1])
            return curriculum.reverse() if self.kind == "reverse" else curriculum.truncate(args[0])
        present = curriculum.counts(len(pool)) > 0

        def occurring(example_id) -> int:
            position = pool.position(example_id)
            if not present[position]:
                raise CurriculumError(f"{self}: pool id {pool.ids[position]!r} does not occur in the base curriculum")
            return position

        if self.kind == "remove":
            return curriculum.remove([occurring(i) for i in args])
        if self.kind == "keep":
            return curriculum.keep_only([occurring(i) for i in args])
        if self.kind == "duplicate":
            if len(args) > 1:
                return curriculum.duplicate(pool.position(args[0]), step=args[1])
            return curriculum.duplicate(occurring(args[0]))
        if self.kind == "move":
            example = occurring(args[0])
            entries = np.flatnonzero(curriculum.ids == example)
            if len(args) > 2:
                occurrence = int(args[2])
                if not 1 <= occurrence <= entries.size:
                    raise CurriculumError(f"{self}: pool id {args[0]!r} occurs {entries.size} times in the base "
                                          f"curriculum, there is no occurrence {occurrence}")
                entries = entries[occurrence - 1: occurrence]
            return _move_entries(curriculum, entries, args[1])
        return curriculum.replace(occurring(args[0]), pool.position(args[1]))

    def __str__(self) -> str:
        if self.kind in ("remove", "keep", "swap"):
            return f"{self.kind}:{','.join(map(str, self.args))}"
        if self.kind == "move" and len(self.args) > 2:
            return f"move:{self.args[0]}#{self.args[2]}@{self.args[1]}"
        if self.kind in ("duplicate", "move"):
            return f"{self.kind}:{self.args[0]}" + (f"@{self.args[1]}" if len(self.args) > 1 else "")
        if self.kind == "replace":
            return f"replace:{self.args[0]}>{self.args[1]}"
        if self.kind == "truncate":
            return f"truncate:{self.args[0]}"
        return self.kind


def parse_edit(text: str) -> Edit:
    """Parse ``kind[:arguments]`` (see :class:`Edit`); example ids stay text, steps become ints."""
    kind, _, rest = text.strip().partition(":")
    kind = kind.strip()
    try:
        if kind in ("remove", "keep"):
            args = tuple(part.strip() for part in rest.split(",") if part.strip())
            if not args:
                raise ValueError
        elif kind == "swap":
            args = tuple(int(part) for part in rest.split(",") if part.strip())
            if len(args) != 2:
                raise ValueError
        elif kind in ("duplicate", "move"):
            example, _, step = rest.partition("@")
            occurrence = ()
            if kind == "move" and "#" in example:
                example, _, number = example.partition("#")
                occurrence = (int(number),)
            if not example.strip():
                raise ValueError
            args = (example.strip(),) + ((int(step),) if step.strip() else ())
            if kind == "move" and len(args) != 2:
                raise ValueError
            args += occurrence
        elif kind == "replace":
            old, _, new = rest.partition(">")
            if not old.strip() or not new.strip():
                raise ValueError
            args = (old.strip(), new.strip())
        elif kind == "truncate":
            args = (int(rest),)
        elif kind == "reverse" and not rest.strip():
            args = ()
        else:
            raise CurriculumError(f"unknown edit {text!r}; choose from {', '.join(_EDIT_KINDS)}")
    except ValueError:
        raise CurriculumError(f"cannot parse edit {text!r} (examples: remove:12,40 duplicate:5@10 move:5@100 "
                              "move:5#2@100 swap:3,7 reverse keep:1,2 replace:3>9 truncate:50)") from None
    return Edit(kind, args)


def parse_scenario(text: str) -> list[Edit]:
    """Edits separated by ``;`` (``"remove:12,40;reverse"``)."""
    edits = [parse_edit(part) for part in text.split(";") if part.strip()]
    if not edits:
        raise CurriculumError(f"scenario {text!r} has no edits")
    return edits


def apply_edits(curriculum: Curriculum, edits: Sequence[Edit | str], pool: IdIndex) -> Curriculum:
    """Apply edits in order (strings are parsed with :func:`parse_edit`), resolving ids with ``pool``."""
    for edit in edits:
        curriculum = (parse_edit(edit) if isinstance(edit, str) else edit).apply(curriculum, pool)
    return curriculum


def move_all(curriculum: Curriculum, examples: int | Sequence[int], to_step: int) -> Curriculum:
    """Move every occurrence of the pool positions ``examples`` to ``to_step`` (1-based), keeping every batch's size.

    The moved occurrences are taken out of the sequence of all entries (step by step, each batch in its order) and
    put back, in their order, as one block that starts at the first slot of ``to_step``'s batch, or that ends at the
    last slot of the curriculum when it would not fit after that slot; the sequence is then cut into batches of the
    original sizes. So the examples and their counts are unchanged, every batch keeps its size, the other entries
    keep their order, and each moved occurrence shifts the entries between its old and new place by one slot (one
    entry crosses each batch boundary in between). ``to_step = n_steps`` moves them to the end: with batches of 8,
    123 occurrences fill the last 16 steps (not one batch of 123); ``to_step = 1`` moves them to the start.
    """
    examples = np.atleast_1d(np.asarray(examples, dtype=np.int64))
    return _move_entries(curriculum, np.flatnonzero(np.isin(curriculum.ids, examples)), to_step)


def _move_entries(curriculum: Curriculum, entries: np.ndarray, to_step: int) -> Curriculum:
    """The entries at indices ``entries`` of ``curriculum.ids`` moved to ``to_step`` as :func:`move_all` says."""
    to_step = int(to_step)
    if not 1 <= to_step <= curriculum.n_steps:
        raise CurriculumError(f"cannot move to step {to_step}: step {to_step} outside 1..{curriculum.n_steps}")
    moved = np.zeros(curriculum.ids.size, dtype=bool)
    moved[entries] = True
    rest = curriculum.ids[~moved]
    start = min(int(curriculum.offsets[to_step - 1]), rest.size)
    ids = np.concatenate([rest[:start], curriculum.ids[moved], rest[start:]])
    return Curriculum(curriculum.offsets, ids, curriculum.n_pool)
