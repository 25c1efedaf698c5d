"""Structured mode: prompt/answer rows, completions from a generation server, feature rewards,
and the GRPO update (engine-math.md §8, vllm-integration.md §7).

What lives here, in the order a step uses it:

    groups.py     Group / FeatSeq (what the parts pass on), StructuredError, right-padding
    rollout.py    rows -> prompt ids, token budgets, stop ids -> server requests -> Groups
    multiturn.py  rows with `remaining_turns`: each completion continues its own conversation
    scoring.py    frozen feature pass over the groups' sequences -> rewards (rewards.py)
    loss.py       the GRPO / DAPO loss: pure functions of tensors
    update.py     the step's backward passes over micro-batches of completions
    server.py     finding, checking and syncing weights to the generation server
    stepper.py    StructuredStepper: the Stepper (stepper.py) composed from the above

May import: torch, the engine's shared modules (config, data, features, rewards, advantages,
stepper) and rollout/ (client, launcher, prefetch, weight sync, capabilities). Never train.py,
strided/ or ebft_tui. rollout.py and multiturn.py run in the async producer thread: they touch
the tokenizer and the server client, never the model.
"""

from ebft_engine.structured.groups import FeatSeq, Group, StructuredError
from ebft_engine.structured.stepper import StructuredStepper

__all__ = ["FeatSeq", "Group", "StructuredError", "StructuredStepper"]
