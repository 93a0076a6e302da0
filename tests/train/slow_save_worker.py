"""`mistral-jax sft ARGS` whose checkpoint save of one step stalls in its commit (before orbax renames the step's
temporary directory into place), so tests/train/test_sft_cli.py can SIGKILL it mid-save.

argv: STEP MARKER then sft's flags. At STEP's commit the worker writes the temporary directory's path to MARKER
and sleeps; the step's arrays and items are all written by then, only the commit is missing.
"""

import asyncio
import pathlib
import sys

from orbax.checkpoint._src.path import atomicity

from train import sft


def main() -> int:
    step, marker, argv = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
    finalize = atomicity.AtomicRenameTemporaryPath.finalize

    async def slow_finalize(self):
        if self._final_path.name == step:  # the step's directory (its items commit inside it)
            marker.write_text(str(self._tmp_path))
            await asyncio.sleep(600)
        return await finalize(self)

    atomicity.AtomicRenameTemporaryPath.finalize = slow_finalize
    return sft.main(argv)


if __name__ == "__main__":
    sys.exit(main())
