"""Set-up shared by every DataLoader's worker processes (training, evaluation, labeling)."""

from __future__ import annotations

import signal


def ignore_sigterm_in_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a scheduler signals the whole process group; workers must
    not die of it, or the main process fails before it can write its pre-emption checkpoint. The
    main process shuts its workers down itself."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
