"""Every seed the toolkit derives from a run's seed, in one function.  docs/DESIGN.md 2.

A derived seed is a function of (run seed, step, use, rank) only, so a restarted run draws what an uninterrupted
one would.  The formulas are the ones earlier runs used (changing one would change every table after it).
"""

from __future__ import annotations

USES = ("rollout", "score_teachers", "probe", "optimizer")


def derive_seed(seed: int, step: int, use: str, rank: int = 0) -> int:
    """The seed of ``use`` at loop / policy step ``step``:

    * ``rollout``: the sampling seed of loop step n, ``seed * 100003 + n`` (rows are further seeded per problem);
    * ``score_teachers``: the seed of ``--retrieval random`` at loop step n, ``seed + n``;
    * ``probe``: the engine/trainer probe after a weight load at loop step n, ``seed + n``;
    * ``optimizer``: every random draw of optimizer step ``step`` on ``rank`` (dropout ...),
      ``(seed * 1000003 + step * 7919 + rank * 104729) mod (2^63 - 1)``.
    """
    if use == "rollout":
        return seed * 100_003 + step
    if use in ("score_teachers", "probe"):
        return seed + step
    if use == "optimizer":
        return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)
    raise ValueError(f"unknown seed use {use!r} (one of {', '.join(USES)})")
