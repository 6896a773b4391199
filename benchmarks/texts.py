"""Realistic request texts: windows of a fixed passage of plain English prose (written for this
suite), so that every run sends the same words and the vocabulary look-ups, out-of-vocabulary
rates and sentence ends are those of ordinary text rather than of random ids."""

from __future__ import annotations

import random

PASSAGE = """
The meeting of the county board was held on Tuesday evening in the old court house, and most of
the people who came had something to say about the new road. Some of them wanted it built before
the end of the year, while others said that the money should be spent on the schools first. The
chairman listened for a long time and then asked the engineer to explain the plans again. He said
that the road would run along the river for about two miles and then turn north toward the town.
It would cost more than the board had expected, but the state had agreed to pay half of the cost
if the work began in the spring. A farmer who lived near the river asked what would happen to his
land, and the engineer told him that the state would buy the part it needed at a fair price. When
the vote was taken, the members agreed to go ahead with the plan, but they also asked for a report
on the schools by the next meeting. After the meeting, a small group stayed behind to talk with
the chairman. They were worried about the families who would have to move, and they wanted to
know whether the town could help them find new homes. The chairman said that he did not have an
answer yet, but he promised that no one would be forced to leave before the end of the summer.
Later that week the local paper printed a long story about the meeting, and for several days the
road was the only thing that anyone in town seemed to talk about. In the end, the work began in
April, and by the following fall the first cars were driving along the river to the market.
"""

WORDS = PASSAGE.split()


def short_texts(count: int, seed: int = 0, lo: int = 5, hi: int = 20) -> list[str]:
    """``count`` texts of ``lo``..``hi`` consecutive words of the passage, each ending in a space
    (the next whole word is predicted, as after a keyboard's space bar)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        n = rng.randint(lo, hi)
        start = rng.randrange(0, len(WORDS) - n)
        texts.append(" ".join(WORDS[start : start + n]) + " ")
    return texts


def long_words(n: int) -> list[str]:
    """The first ``n`` words of the passage repeated end to end."""
    reps = n // len(WORDS) + 1
    return (WORDS * reps)[:n]


def long_text(n: int) -> str:
    return " ".join(long_words(n)) + " "
