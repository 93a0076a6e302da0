"""One process of tests/test_multihost.py: joins the run, generates on the global mesh, process 0 writes.

Configured by environment (set by the test): XLA_FLAGS / JAX_PLATFORMS for the fake CPU devices,
MISTRAL_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID for jax.distributed. argv: preset, mesh, out file.
"""

import json
import sys

import jax
import numpy as np

from mistral_jax import distributed
from mistral_jax.sharding import make_mesh, parse_mesh

PROMPTS = [[1, 2, 3, 4, 5], [7, 8]]
NEW_TOKENS = 10


def main(preset: str, mesh_text: str, out_path: str) -> None:
    assert distributed.initialize(), "expected a multi-process run"
    import mistral_jax as mj  # after initialize: nothing may touch the devices before it

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    config = mj.ModelConfig.from_preset(preset)
    # Every process builds the same host copy, as it would read the same checkpoint, then keeps only
    # the shards its own devices hold.
    host_params = jax.tree.map(np.asarray, mj.init_params(config, jax.random.key(0)))
    mesh = make_mesh(**parse_mesh(mesh_text))
    params = mj.shard_params(config, host_params, mesh)
    local = {shard.device for leaf in jax.tree.leaves(params) for shard in leaf.addressable_shards}
    assert local <= set(jax.local_devices())
    tokens = mj.generate(config, params, PROMPTS, NEW_TOKENS, mesh=mesh)
    streamed = np.stack(list(mj.generate_stream(config, params, PROMPTS, NEW_TOKENS, mesh=mesh)), axis=1).tolist()
    if distributed.is_main_process():
        with open(out_path, "w") as f:
            json.dump({"generate": tokens, "stream": streamed}, f)


if __name__ == "__main__":
    main(*sys.argv[1:4])
