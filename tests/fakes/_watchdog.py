"""The parent-pid watchdog the engine uses too: if the launcher dies, take our group down."""

from __future__ import annotations

import os
import signal
import threading
import time


def start(interval_s: float = 0.1) -> None:
    parent = int(os.environ.get("EBFT_PARENT_PID") or 0)
    if not parent:
        return

    def loop() -> None:
        while True:
            if os.getppid() != parent:
                try:
                    os.killpg(os.getpgrp(), signal.SIGTERM)
                    time.sleep(2.0)
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                finally:
                    os._exit(1)
            time.sleep(interval_s)

    threading.Thread(target=loop, daemon=True, name="parent-watchdog").start()
