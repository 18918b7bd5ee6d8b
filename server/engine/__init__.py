"""The engine: requests' jobs in, through one model thread, scored prompts and tokens out.

Its parts, in the order a job meets them: jobs (what goes in and out; outputs: what a job asks its
passes to extract), admission (the bounded,
fair queue), sequences (the backend's sequences, and how a job ends), planner (prefix reuse and
shared passes), prefill (prompt passes), decode (generation), loop (the model thread and the
event loop's side), model_thread (the thread itself, which also loads the model and runs the
probes); prefix_cache and fair_queue are the data structures they use.
"""

from server.engine.jobs import (
    Cancelled,
    EngineHooks,
    Origin,
    PromptJob,
    PromptResult,
    PromptScored,
    QueueFull,
    TokenEvent,
    job_cost,
)
from server.engine.loop import Engine, Events
from server.engine.outputs import Outputs

__all__ = [
    "Cancelled",
    "Engine",
    "EngineHooks",
    "Events",
    "Origin",
    "Outputs",
    "PromptJob",
    "PromptResult",
    "PromptScored",
    "QueueFull",
    "TokenEvent",
    "job_cost",
]
