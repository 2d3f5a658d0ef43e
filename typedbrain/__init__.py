"""typedbrain: SpeechBrain's ``Brain`` training loop, typed, with a strict phase machine.

Importing this package has no side effects: it sets no torch flag, adds no logging handler and
patches nothing.
"""

from typedbrain._brain import BatchT as BatchT
from typedbrain._brain import Brain as Brain
from typedbrain._brain import HparamsT as HparamsT
from typedbrain._brain import PredT as PredT
from typedbrain._data import DataSource as DataSource
from typedbrain._data import LoaderKwargs as LoaderKwargs
from typedbrain._distributed import if_main_process as if_main_process
from typedbrain._distributed import run_on_main as run_on_main
from typedbrain._epochs import EpochCounter as EpochCounter
from typedbrain._epochs import EpochCounterWithStopper as EpochCounterWithStopper
from typedbrain._errors import ConfigurationError as ConfigurationError
from typedbrain._errors import HookContractError as HookContractError
from typedbrain._errors import NonFiniteLossError as NonFiniteLossError
from typedbrain._errors import PhaseTransitionError as PhaseTransitionError
from typedbrain._errors import ReentrantCallError as ReentrantCallError
from typedbrain._errors import RunOptionsError as RunOptionsError
from typedbrain._errors import TypedBrainError as TypedBrainError
from typedbrain._hparams import Hparams as Hparams
from typedbrain._options import Precision as Precision
from typedbrain._options import RunOptions as RunOptions
from typedbrain._options import RunOptionsDict as RunOptionsDict
from typedbrain._phases import TRANSITIONS as TRANSITIONS
from typedbrain._phases import Phase as Phase
from typedbrain._phases import PhaseMachine as PhaseMachine
from typedbrain._phases import PhaseObserver as PhaseObserver
from typedbrain._phases import Stage as Stage
from typedbrain._protocols import CheckpointerLike as CheckpointerLike
from typedbrain._protocols import OptimizerFactory as OptimizerFactory
from typedbrain._protocols import Stateful as Stateful
from typedbrain._state import TrainingProgress as TrainingProgress
from typedbrain._version import __version__ as __version__

__all__ = [
    "TRANSITIONS",
    "BatchT",
    "Brain",
    "CheckpointerLike",
    "ConfigurationError",
    "DataSource",
    "EpochCounter",
    "EpochCounterWithStopper",
    "HookContractError",
    "Hparams",
    "HparamsT",
    "LoaderKwargs",
    "NonFiniteLossError",
    "OptimizerFactory",
    "Phase",
    "PhaseMachine",
    "PhaseObserver",
    "PhaseTransitionError",
    "Precision",
    "PredT",
    "ReentrantCallError",
    "RunOptions",
    "RunOptionsDict",
    "RunOptionsError",
    "Stage",
    "Stateful",
    "TrainingProgress",
    "TypedBrainError",
    "__version__",
    "if_main_process",
    "run_on_main",
]
