"""The distillation engine: pure jit-compiled steps over a run axis, one trainer, one epoch loop.

    step        StepSpec, TrainState, the forward passes of student and teacher(s), the loss
    adapters    the modules a feature loss trains beside the student
    groups      several runs' step at once: single, vmapped, shared backbone (Layout)
    evaluation  eval-mode outputs in fixed-shape batches, the validation figures
    teachers    loading teachers, ensembles, grouping by architecture
    store       a run's work directory: records, orbax checkpoints, best model, test score
    trainer     the compiled programs, mesh, shardings and placed data of one call
    loop        train_runs / train_and_evaluate: resume, group, train, record

The names below are the engine's library surface; the modules hold the rest.
"""

from kdjax.engine.loop import EngineOptions, recipe_key, train_and_evaluate, train_runs  # noqa: F401
from kdjax.engine.step import StepSpec, TrainState, hparams_for, network_view, train_step  # noqa: F401
from kdjax.engine.store import NonFiniteLossError, ResumeMismatchError, Run, RunResult  # noqa: F401
from kdjax.engine.teachers import Teacher, ensemble, from_variables, load_teacher  # noqa: F401
