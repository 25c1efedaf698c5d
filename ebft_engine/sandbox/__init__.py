"""Run model-written code (pass@1) inside an OS-level jail; see docs/security.md for the threat model.

`run_program` runs one program, `run_programs` several in parallel (pass@1 scoring);
`require_backend` says which jail works here (bubblewrap, else util-linux unshare) or raises
`SandboxUnavailable` with how to get one; `UNSAFE` is the explicit opt-out behind
`--unsafe-exec` (rlimits and a timeout, no boundary).

May import: the standard library only (boot.py and unshare_init.py even run inside the jail,
without ebft_engine); never torch or the rest of the engine, which calls it from eval.py.
"""

from ebft_engine.sandbox.backends import (
    UNSAFE,
    UNSAFE_NOTICE,
    UNSAFE_WARNING,
    Backend,
    SandboxUnavailable,
    detect_backend,
    probe,
    require_backend,
)
from ebft_engine.sandbox.runner import SandboxResult, humaneval_program, run_program, run_programs

__all__ = ["UNSAFE", "UNSAFE_NOTICE", "UNSAFE_WARNING", "Backend", "SandboxResult", "SandboxUnavailable",
           "detect_backend", "humaneval_program", "probe", "require_backend", "run_program", "run_programs"]
