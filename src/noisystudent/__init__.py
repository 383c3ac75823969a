"""Noisy Student self-training for image classifiers (Xie et al., CVPR 2020).

Importing the package changes nothing in the process (no environment variable, no file read).
To let noisystudent choose the CPU thread count for a machine shared with other processes, call
:func:`configure_cpu` first, before anything imports torch; the command line and
:func:`run_pipeline` do so themselves (docs/user-guide.md, "Using the Python API").
"""

from .config.schema import Config, load_config
from .runtime.cpu import configure as configure_cpu
from .runtime.errors import CheckpointError, ConfigError, DataError, NoisyStudentError
from .runtime.version import package_version

__version__ = package_version()

__all__ = ["Config", "load_config", "run_pipeline", "configure_cpu", "NoisyStudentError", "ConfigError",
           "DataError", "CheckpointError", "__version__"]


def run_pipeline(*args, **kwargs):
    """Run the whole loop; see :func:`noisystudent.pipeline.run_pipeline`. Chooses the CPU threads
    (:func:`configure_cpu`) before the pipeline's modules load torch."""
    configure_cpu()
    from .pipeline import run_pipeline as _run

    return _run(*args, **kwargs)
