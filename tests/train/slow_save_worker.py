"""`mistral-jax sft ARGS` (or dpo) whose checkpoint save of one step stalls in its commit (before orbax renames the
step's temporary directory into place), so tests/train/test_sft_cli.py can SIGKILL it mid-save.

argv: PROGRAM (sft or dpo) STEP MARKER then the program's flags. At STEP's commit the worker writes the temporary
directory's path to MARKER and sleeps; the step's arrays and items are all written by then, only the commit is
missing.
"""

import asyncio
import pathlib
import sys

from orbax.checkpoint._src.path import atomicity

from train import dpo, sft


def main() -> int:
    program, step, marker, argv = sys.argv[1], sys.argv[2], pathlib.Path(sys.argv[3]), sys.argv[4:]
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self):
        if self._final_path.name == step:  # the step's directory (its items commit inside it)
            marker.write_text(str(self._tmp_path))
            await asyncio.sleep(600)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
    return {"sft": sft.main, "dpo": dpo.main}[program](argv)


if __name__ == "__main__":
    sys.exit(main())
