"""What the command lines (``scripts/train.py``, ``study.py``, ``unlearn.py``) share: validation of the
composed config before anything is written, and one-line errors with a nonzero exit status.

* :class:`ValidateConfig` is a Hydra callback (``conf/hydra/default.yaml``). Its ``on_run_start``
  runs the primary config's validator (:data:`VALIDATORS`) after composition and *before* Hydra
  creates the run directory; a bad value prints ``error: <one line>`` to stderr and exits with 2.
  In a multirun each job's config is validated by the script itself, before any work.
* :func:`validate_or_exit` does the same from inside a script.
* :func:`report_errors` turns a :class:`~tensorcurv.experiments.config.ConfigError` or a Hydra override error of
  the compose API (exit 2), or a failed run (:class:`~tensorcurv.experiments.runner.RunFailed`, exit 1),
  raised by the script's body into that one line.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from hydra.experimental.callback import Callback

from tensorcurv.experiments.config import ConfigError, validate_train
from tensorcurv.experiments.study_config import validate_study
from tensorcurv.experiments.unlearn_config import validate_unlearn

#: primary config name -> its validator
VALIDATORS: dict[str, Callable[[Any], Any]] = {
    "train": validate_train,
    "study": validate_study,
    "unlearn": validate_unlearn,
}
CONFIG_ERROR_EXIT = 2
RUN_FAILED_EXIT = 1


def fail(message: str, code: int) -> None:
    """Print ``error: <message>`` (one line) to stderr and exit with ``code``."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr, flush=True)
    sys.exit(code)


def validate_or_exit(primary: str, cfg: Any) -> Any:
    """``VALIDATORS[primary](cfg)``, or the one-line error and exit status 2."""
    try:
        return VALIDATORS[primary](cfg)
    except ConfigError as e:
        fail(str(e), CONFIG_ERROR_EXIT)


@contextmanager
def report_errors() -> Iterator[None]:
    """Within: a ConfigError exits with 2, a failed run (``RunFailed``) with 1, each as one line."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from tensorcurv.experiments.runner import RunFailed

    try:
        yield
    except (ConfigError, ConfigCompositionException, OverrideParseException) as e:  # compose-API overrides
        fail(str(e), CONFIG_ERROR_EXIT)
    except RunFailed as e:
        fail(str(e), RUN_FAILED_EXIT)


class ValidateConfig(Callback):
    """Hydra callback: validate the composed config before the run directory exists."""

    def on_run_start(self, config: Any, config_name: str | None = None, **kwargs: Any) -> None:
        if config_name in VALIDATORS:
            from hydra.core.hydra_config import HydraConfig

            HydraConfig.instance().set_config(config)  # as the job will (${hydra:...} in user keys)
            validate_or_exit(config_name, config)
