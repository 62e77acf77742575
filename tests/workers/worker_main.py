"""`python -m tests.workers.worker_main worker ...`: the real Celery worker, with one seam
for the tests: while the file named by INFINI_TEST_KILL_MARKER exists, the first process
to commit a checkpoint removes the file and kills itself with SIGKILL, as an OOM kill
or a lost machine would (nothing after it runs: no cleanup, no ack)."""

import os
import signal
import sys

from celery import signals


@signals.worker_process_init.connect
def _arm(**_):
    """In each forked child (the main process must stay without torch)."""
    from workers import service

    marker, save_checkpoint = os.environ.get("INFINI_TEST_KILL_MARKER"), service.save_checkpoint
    if not marker:
        return

    def save_then_die(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        try:
            os.unlink(marker)
        except FileNotFoundError:
            return
        os.kill(os.getpid(), signal.SIGKILL)

    service.save_checkpoint = save_then_die


if __name__ == "__main__":
    from workers.celery_app import app

    app.worker_main(sys.argv[1:])
