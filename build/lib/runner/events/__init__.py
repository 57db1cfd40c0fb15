"""The run's event log, its sinks, and the budgets enforced from it."""

from runner.events.budgets import BudgetExceeded, Budgets
from runner.events.clip import clip, clip_text
from runner.events.log import Event, EventLog, EventSink

__all__ = ["BudgetExceeded", "Budgets", "Event", "EventLog", "EventSink", "clip", "clip_text"]
