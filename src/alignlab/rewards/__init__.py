"""Rewards: the registry (``registry.py``), built-in scorers, reward models, the code sandbox."""


class RewardValues(list):
    """A reward's values plus ``metrics`` it wants logged; to every other caller a plain list.

    Lives here, away from the registry (which imports torch), so a user reward running in a
    memory-limited worker can return one cheaply.
    """

    def __init__(self, values=(), metrics=None) -> None:
        super().__init__(values)
        self.metrics: dict[str, float] = dict(metrics or {})
