"""Observers of the round loop: they see a run's rounds go by and change nothing in them.

The progress bar, the trackers (tracking.py) and the privacy ledger (privacy.py) are observers; the ledger's one
say is `before_round` raising `StopRun` when the next round would spend more than the privacy budget.
"""

from __future__ import annotations

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..core.errors import FedloraError


class StopRun(FedloraError):
    """Raised by an observer's `before_round`: the run ends after the round before (evaluated and checkpointed)."""


class Observer:
    """A no-op observer; subclasses override what they watch."""

    def run_started(self, first: int, rounds: int) -> None:
        """The run starts (or resumes) at round `first` of `rounds`."""

    def before_round(self, rnd: int) -> None:
        """Round `rnd` is about to start; raise StopRun to end the run before it."""

    def clients(self, what: str, done: int, total: int) -> None:
        """A transport's progress through a round's clients."""

    def after_round(self, record: dict) -> None:
        """Round `record["round"]` ended; an observer may add its own key to the record before it is written."""

    def close(self) -> None:
        """The run ended (an exception on its way out means it failed)."""


class Observers(Observer):
    """Several observers as one, called in order."""

    def __init__(self, *observers: Observer) -> None:
        self.members = [o for o in observers if o is not None]

    def run_started(self, first: int, rounds: int) -> None:
        """Tell every observer."""
        for o in self.members:
            o.run_started(first, rounds)

    def before_round(self, rnd: int) -> None:
        """Ask every observer (the first StopRun ends the run)."""
        for o in self.members:
            o.before_round(rnd)

    def clients(self, what: str, done: int, total: int) -> None:
        """Tell every observer."""
        for o in self.members:
            o.clients(what, done, total)

    def after_round(self, record: dict) -> None:
        """Tell every observer, in order (the ledger first: the trackers then see its epsilon)."""
        for o in self.members:
            o.after_round(record)

    def close(self) -> None:
        """Close every observer, also when one fails to close."""
        errors = []
        for o in self.members:
            try:
                o.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Observers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressBar(Observer):
    """A rounds bar and a clients bar on the console (rich)."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn())

    def run_started(self, first: int, rounds: int) -> None:
        """Show both bars."""
        self.progress.start()
        self.rounds = self.progress.add_task("rounds", total=rounds, completed=first - 1)
        self.client_bar = self.progress.add_task("clients", total=1)

    def clients(self, what: str, done: int, total: int) -> None:
        """Move the clients bar."""
        self.progress.update(self.client_bar, description=what, completed=done, total=total)

    def after_round(self, record: dict) -> None:
        """Advance the rounds bar, with the round's headline numbers."""
        self.progress.update(self.rounds, advance=int(record["round"] > 0), description=describe(record))

    def close(self) -> None:
        """Stop drawing."""
        self.progress.stop()


def describe(record: dict) -> str:
    """One line of a round's record: its headline metrics and epsilon."""
    mean = record.get("summary", {}).get("mean", {})
    shown = ", ".join(f"{k}={mean[k]:.3f}" for k in ("accuracy", "rouge1", "loss") if k in mean)
    if "privacy" in record:
        eps = record["privacy"]["epsilon"]
        shown += f"{', ' if shown else ''}epsilon={'inf' if eps is None else f'{eps:.3g}'}"
    return f"round {record['round']}" + (f": {shown}" if shown else "")
