"""typedbrain: SpeechBrain's ``Brain`` training loop, typed, with a strict phase machine.

Importing this package has no side effects: it sets no torch flag, adds no logging handler and
patches nothing.
"""

from typedbrain._brain import BatchT as BatchT
from typedbrain._brain import Brain as Brain
from typedbrain._brain import HparamsT as HparamsT
from typedbrain._brain import PredT as PredT
from typedbrain._checkpoint import Checkpointer as Checkpointer
from typedbrain._checkpoint import average_checkpoints as average_checkpoints
from typedbrain._ckpt_hooks import mark_as_loader as mark_as_loader
from typedbrain._ckpt_hooks import mark_as_saver as mark_as_saver
from typedbrain._ckpt_hooks import register_checkpoint_hooks as register_checkpoint_hooks
from typedbrain._cli_args import HelpRequested as HelpRequested
from typedbrain._cli_args import ParsedArguments as ParsedArguments
from typedbrain._cli_args import parse_arguments as parse_arguments
from typedbrain._cli_args import parse_arguments_or_exit as parse_arguments_or_exit
from typedbrain._cli_args import run_options_help as run_options_help
from typedbrain._config import LoadedHparams as LoadedHparams
from typedbrain._config import load_hparams as load_hparams
from typedbrain._config import split_run_options as split_run_options
from typedbrain._data import DataSource as DataSource
from typedbrain._data import LoaderKwargs as LoaderKwargs
from typedbrain._data import Shard as Shard
from typedbrain._data import make_dataloader as make_dataloader
from typedbrain._data import position_loader as position_loader
from typedbrain._data import set_loader_epoch as set_loader_epoch
from typedbrain._distributed import all_gather_object as all_gather_object
from typedbrain._distributed import all_reduce_mean as all_reduce_mean
from typedbrain._distributed import all_reduce_sum as all_reduce_sum
from typedbrain._distributed import barrier as barrier
from typedbrain._distributed import broadcast_object as broadcast_object
from typedbrain._distributed import get_rank as get_rank
from typedbrain._distributed import get_world_size as get_world_size
from typedbrain._distributed import if_main_process as if_main_process
from typedbrain._distributed import is_distributed as is_distributed
from typedbrain._distributed import main_process_only as main_process_only
from typedbrain._distributed import run_on_main as run_on_main
from typedbrain._epochs import EpochCounter as EpochCounter
from typedbrain._epochs import EpochCounterWithStopper as EpochCounterWithStopper
from typedbrain._errors import ArgumentsError as ArgumentsError
from typedbrain._errors import CheckpointError as CheckpointError
from typedbrain._errors import CheckpointWarning as CheckpointWarning
from typedbrain._errors import ConfigurationError as ConfigurationError
from typedbrain._errors import CorruptCheckpointError as CorruptCheckpointError
from typedbrain._errors import DistributedError as DistributedError
from typedbrain._errors import HookContractError as HookContractError
from typedbrain._errors import HparamsError as HparamsError
from typedbrain._errors import HparamsProblem as HparamsProblem
from typedbrain._errors import NonFiniteLossError as NonFiniteLossError
from typedbrain._errors import OverrideError as OverrideError
from typedbrain._errors import PhaseTransitionError as PhaseTransitionError
from typedbrain._errors import PlaceholderError as PlaceholderError
from typedbrain._errors import ReentrantCallError as ReentrantCallError
from typedbrain._errors import ResumeWarning as ResumeWarning
from typedbrain._errors import RunOptionsError as RunOptionsError
from typedbrain._errors import TrainingInterruptedError as TrainingInterruptedError
from typedbrain._errors import TrainLogError as TrainLogError
from typedbrain._errors import TypedBrainError as TypedBrainError
from typedbrain._errors import UnsafeCheckpointError as UnsafeCheckpointError
from typedbrain._experiment import create_experiment_directory as create_experiment_directory
from typedbrain._hparams import Hparams as Hparams
from typedbrain._launch import LaunchInfo as LaunchInfo
from typedbrain._launch import detect_launch as detect_launch
from typedbrain._launch import device_for as device_for
from typedbrain._launch import init_distributed as init_distributed
from typedbrain._launch import shutdown_distributed as shutdown_distributed
from typedbrain._loader_workers import seed_worker as seed_worker
from typedbrain._manifest import INTRA_EPOCH_CKPT_FLAG as INTRA_EPOCH_CKPT_FLAG
from typedbrain._manifest import Checkpoint as Checkpoint
from typedbrain._manifest import CheckpointFile as CheckpointFile
from typedbrain._manifest import JsonValue as JsonValue
from typedbrain._manifest import verify_checkpoint as verify_checkpoint
from typedbrain._options import Precision as Precision
from typedbrain._options import RunOptions as RunOptions
from typedbrain._options import RunOptionsDict as RunOptionsDict
from typedbrain._phases import TRANSITIONS as TRANSITIONS
from typedbrain._phases import Phase as Phase
from typedbrain._phases import PhaseMachine as PhaseMachine
from typedbrain._phases import PhaseObserver as PhaseObserver
from typedbrain._phases import Stage as Stage
from typedbrain._protocols import CheckpointerLike as CheckpointerLike
from typedbrain._protocols import CheckpointInfo as CheckpointInfo
from typedbrain._protocols import OptimizerFactory as OptimizerFactory
from typedbrain._protocols import Stateful as Stateful
from typedbrain._sampler import Positionable as Positionable
from typedbrain._sampler import ResumableSampler as ResumableSampler
from typedbrain._state import TrainingProgress as TrainingProgress
from typedbrain._train_log import FileTrainLogger as FileTrainLogger
from typedbrain._train_log import JsonlTrainLogger as JsonlTrainLogger
from typedbrain._train_log import LogEntry as LogEntry
from typedbrain._train_log import ScalarWriter as ScalarWriter
from typedbrain._train_log import StatValue as StatValue
from typedbrain._train_log import TensorboardTrainLogger as TensorboardTrainLogger
from typedbrain._train_log import TrainLogger as TrainLogger
from typedbrain._train_log import format_stat as format_stat
from typedbrain._train_log import read_jsonl_log as read_jsonl_log
from typedbrain._typed_hparams import load_typed_hparams as load_typed_hparams
from typedbrain._typed_hparams import structure_hparams as structure_hparams
from typedbrain._version import __version__ as __version__

__all__ = [
    "INTRA_EPOCH_CKPT_FLAG",
    "TRANSITIONS",
    "ArgumentsError",
    "BatchT",
    "Brain",
    "Checkpoint",
    "CheckpointError",
    "CheckpointFile",
    "CheckpointInfo",
    "CheckpointWarning",
    "Checkpointer",
    "CheckpointerLike",
    "ConfigurationError",
    "CorruptCheckpointError",
    "DataSource",
    "DistributedError",
    "EpochCounter",
    "EpochCounterWithStopper",
    "FileTrainLogger",
    "HelpRequested",
    "HookContractError",
    "Hparams",
    "HparamsError",
    "HparamsProblem",
    "HparamsT",
    "JsonValue",
    "JsonlTrainLogger",
    "LaunchInfo",
    "LoadedHparams",
    "LoaderKwargs",
    "LogEntry",
    "NonFiniteLossError",
    "OptimizerFactory",
    "OverrideError",
    "ParsedArguments",
    "Phase",
    "PhaseMachine",
    "PhaseObserver",
    "PhaseTransitionError",
    "PlaceholderError",
    "Positionable",
    "Precision",
    "PredT",
    "ReentrantCallError",
    "ResumableSampler",
    "ResumeWarning",
    "RunOptions",
    "RunOptionsDict",
    "RunOptionsError",
    "ScalarWriter",
    "Shard",
    "Stage",
    "StatValue",
    "Stateful",
    "TensorboardTrainLogger",
    "TrainLogError",
    "TrainLogger",
    "TrainingInterruptedError",
    "TrainingProgress",
    "TypedBrainError",
    "UnsafeCheckpointError",
    "__version__",
    "all_gather_object",
    "all_reduce_mean",
    "all_reduce_sum",
    "average_checkpoints",
    "barrier",
    "broadcast_object",
    "create_experiment_directory",
    "detect_launch",
    "device_for",
    "format_stat",
    "get_rank",
    "get_world_size",
    "if_main_process",
    "init_distributed",
    "is_distributed",
    "load_hparams",
    "load_typed_hparams",
    "main_process_only",
    "make_dataloader",
    "mark_as_loader",
    "mark_as_saver",
    "parse_arguments",
    "parse_arguments_or_exit",
    "position_loader",
    "read_jsonl_log",
    "register_checkpoint_hooks",
    "run_on_main",
    "run_options_help",
    "seed_worker",
    "set_loader_epoch",
    "shutdown_distributed",
    "split_run_options",
    "structure_hparams",
    "verify_checkpoint",
]
