"""Fault injection for the crash-safety tests, and only for them: a test that puts this folder on PYTHONPATH
(``tests.helpers.faults``) makes Python import this file at start-up, which adds a batch hook to extract's stream
(``pinterest_cls.embed.streaming.BATCH_HOOKS``, empty in every other run). Production code reads none of this.

- ``PINTEREST_CLS_KILL_AFTER_BATCH=N``: kill -9 the process right after the Nth batch's rows are written, before
  they are committed;
- ``PINTEREST_CLS_SIGNAL_AFTER_BATCH=N:SIG``: send signal SIG right after the Nth batch's rows are written, to the
  process group (DataLoader workers included, as Ctrl-C or SLURM would) when the process leads it;
- ``PINTEREST_CLS_BATCH_DELAY_S=S``: sleep S seconds after each batch (a SLURM job is then still running when it is
  requeued or reaches its time limit);
- ``PINTEREST_CLS_HOLD_UNTIL=PATH``: after the first batch, wait until PATH exists (at most 300 s): the run holds its
  rows for as long as a test needs, on however slow a machine.
"""

import os
import signal
import time

KILL, SIGNAL = "PINTEREST_CLS_KILL_AFTER_BATCH", "PINTEREST_CLS_SIGNAL_AFTER_BATCH"
DELAY = "PINTEREST_CLS_BATCH_DELAY_S"
HOLD = "PINTEREST_CLS_HOLD_UNTIL"


def _install() -> None:
    kill = int(os.environ.get(KILL, "0") or 0)
    delay = float(os.environ.get(DELAY, "0") or 0)
    at, _, sig = (os.environ.get(SIGNAL) or "0:0").partition(":")
    hold = os.environ.get(HOLD)
    if not kill and not delay and not int(at) and not hold:
        return

    def on_batch(batch: int) -> None:
        if batch == kill:
            os.kill(os.getpid(), signal.SIGKILL)
        if batch == int(at):
            if os.getpgrp() == os.getpid():
                os.killpg(os.getpgrp(), int(sig))
            else:
                os.kill(os.getpid(), int(sig))
        time.sleep(delay)
        deadline = time.time() + 300
        while hold and batch == 1 and not os.path.exists(hold) and time.time() < deadline:
            time.sleep(0.1)

    from pinterest_cls.embed import streaming

    streaming.BATCH_HOOKS.append(on_batch)


_install()
