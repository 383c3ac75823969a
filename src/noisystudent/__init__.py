"""Noisy Student self-training for image classifiers (Xie et al., CVPR 2020)."""

# First, before anything imports torch: OpenMP reads its wait policy once, when torch loads.
from .runtime import cpu as _cpu

_cpu.configure()

from .config.schema import Config, load_config
from .runtime.errors import CheckpointError, ConfigError, DataError, NoisyStudentError

def _installed_version() -> str:
    """The version pyproject.toml gives, as the installed package's metadata records it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("noisystudent")
    except PackageNotFoundError:  # imported from a source tree that was never installed
        return "0+unknown"


__version__ = _installed_version()

__all__ = ["Config", "load_config", "run_pipeline", "NoisyStudentError", "ConfigError", "DataError",
           "CheckpointError", "__version__"]


def run_pipeline(*args, **kwargs):
    """Run the whole loop; see :func:`noisystudent.pipeline.run_pipeline`."""
    from .pipeline import run_pipeline as _run

    return _run(*args, **kwargs)
