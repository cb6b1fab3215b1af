"""One phase of the self-test in a process of its own: ``python -m lenet_gpu.selftest.child CONTEXT.json``.

The runner starts it with the phase's environment (NUMBA_ENABLE_CUDASIM=1 for the Numba simulator must
be set before numba is imported, hence a process per phase) and a hard time limit; the phase writes its
results to the file named in the context as it goes, so whatever finished survives a crash or a kill.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .common import PhaseRecorder, describe_exception


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ctx = json.loads(Path(argv[0]).read_text())
    rec = PhaseRecorder(ctx["phase"], Path(ctx["result_path"]), ctx["budget_s"])
    from .phases import PHASE_FUNCS

    try:
        if os.environ.get("LENET_GPU_SELFTEST_STALL") == ctx["phase"]:  # tests: a phase that hangs after one case
            rec.add("before the stall", "pass")
            rec.flush(force=True)
            time.sleep(3600)
        PHASE_FUNCS[ctx["phase"]](ctx, rec)
    except BaseException as e:  # noqa: BLE001 - a crashing phase is recorded, and the runner goes on
        rec.crash = describe_exception(e, 16)
        rec.finish()
        print(f"phase {ctx['phase']} crashed:\n{rec.crash}", file=sys.stderr)
        return 1
    rec.finish()
    return 0


if __name__ == "__main__":
    sys.exit(main())
