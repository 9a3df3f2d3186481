"""Checkpointing a training job's whole state in one call.

``TrainingState`` bundles a model, its optimizers, the step, every rank's RNG
state and any other ``Stateful`` (a data-loader position) into one object that
``distcp.save`` / ``distcp.load`` take as a single value::

    state = TrainingState(model, optimizer, extras={"sampler": sampler})
    distcp.save({"app": state}, checkpoint_id=path)
    distcp.load({"app": state}, checkpoint_id=path)   # on any number of ranks
"""

from distcp.training.resumable_sampler import ResumableSampler
from distcp.training.rng_state import RNGState
from distcp.training.training_state import TrainingState

__all__ = ["RNGState", "ResumableSampler", "TrainingState"]
