"""`load(path)`: pick the reader for a checkpoint path (or an sft run directory) and build the parameter pytree."""

from __future__ import annotations

import contextlib
import pathlib

import jax.numpy as jnp

from mistral_jax.checkpoints import consolidated, hf, hf_layout, orbax, run_dir
from mistral_jax.checkpoints.errors import CheckpointError
from mistral_jax.config import DTYPES, ModelConfig
from mistral_jax.errors import UserError
from mistral_jax.paths import CHECKPOINT_HINT, as_path, is_url

# Checkpoint files that are read from local disk only, told apart by name: a URL naming one fails before any
# network access.
LOCAL_FILE_SUFFIXES = {".gguf": "a GGUF file", ".safetensors": "a safetensors file", ".json": "a JSON file",
                       ".bin": "a pickled checkpoint", ".pt": "a pickled checkpoint", ".pth": "a pickled checkpoint"}
LOCAL_FORMATS = "Hugging Face, Mistral consolidated and GGUF checkpoints"


def check_url(path) -> None:
    """A CheckpointError for a URL whose name says it is a local-only format (model.gguf, ...); any other URL
    may be an orbax checkpoint (or an sft run directory) and is left to the reader."""
    if is_url(path):
        what = LOCAL_FILE_SUFFIXES.get(pathlib.PurePosixPath(str(path)).suffix.lower())
        if what is not None:
            raise CheckpointError(f"{path} is {what}: only orbax checkpoints are read from a URL ({LOCAL_FORMATS} "
                                  f"are read from local disk); {CHECKPOINT_HINT}")


def read(path) -> tuple[ModelConfig, dict]:
    """(config, transformers-named tensors) for any supported checkpoint path (local: not an orbax URL)."""
    check_url(path)
    if is_url(path):
        raise CheckpointError(f"{path} is not an orbax checkpoint: only orbax checkpoints are read from a URL "
                              f"({LOCAL_FORMATS} are read from local disk); {CHECKPOINT_HINT}")
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    if hf.is_hf_dir(path):
        return hf.read(path)
    if consolidated.is_consolidated_dir(path):
        return consolidated.read(path)
    from mistral_jax.checkpoints import gguf  # imports the gguf package: only for GGUF files

    if path.suffix == ".gguf" or gguf.is_gguf(path):
        return gguf.read(path)
    raise CheckpointError(
        f"{path} is not a checkpoint this version reads: expected a Hugging Face model directory "
        "(config.json + *.safetensors), a Mistral consolidated directory (params.json + consolidated.safetensors) "
        "or a llama.cpp .gguf file"
    )


def load(path, dtype: str = "float32", *, mesh=None, quantize: str | None = None, adapter=None,
         **config_overrides) -> tuple[ModelConfig, dict]:
    """(config, params) from a checkpoint, or from an sft run directory (its latest step, LoRA merged; the
    tokenizer it trained with is `run_dir.tokenizer_source(path)`). Parameters are stored in `dtype`, which is
    also the compute dtype unless `config_overrides` says otherwise (e.g. dtype="float32", compute in bfloat16).

    Weights stream leaf by leaf onto the device (host memory stays near one copy of the model); with a
    `mesh` (sharding.make_mesh) each leaf goes straight to its sharding, every process building only the
    shards it addresses. scan_layers=False (in config_overrides) returns the unscanned layout that
    inference prefers (model/layer_layout.py), split leaf by leaf as it loads. quantize="int8": the
    large matmul weights in int8 (model/quant.py), each quantized as it is read (Hugging Face, consolidated,
    GGUF) or once restored (orbax, run directories); a quantized orbax checkpoint restores as it is.
    adapter: a LoRA merged into the weights (before any quantize): a Hugging Face PEFT directory, an sft run
    directory trained with --lora-rank, or a `load_adapter` result; one made for another base is refused.
    """
    from mistral_jax.model import quant
    from mistral_jax.model.layer_layout import unstack_layers

    scan_layers = config_overrides.pop("scan_layers", True)
    if dtype not in DTYPES:
        raise UserError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if quantize is not None:
        quant.check_mode(quantize)
    check_url(path)
    if run_dir.is_run_dir(path):
        config, params = _load_run(path, dtype, mesh, config_overrides)
    else:
        config, params = _load_scanned(path, dtype, mesh, config_overrides, quantize if adapter is None else None)
    if adapter is not None:
        params = merge_adapter(config, params, adapter, mesh)
    if quantize is not None and config.quant == "none":
        config, params = quant.quantize(config, params, quantize)
        if mesh is not None:
            from mistral_jax import sharding

            params = sharding.shard_params(config, params, mesh)
    if scan_layers:
        return config, params
    return unstack_layers(config, params, donate=True)


def _load_run(path, dtype: str, mesh, config_overrides) -> tuple[ModelConfig, dict]:
    """A run directory's latest params (float32, LoRA merged) cast to `dtype`, where they are."""
    import jax

    config, params = run_params(path, mesh)
    config = config.replace(**{"dtype": dtype, "param_dtype": dtype, **config_overrides})
    return config, jax.tree.map(lambda x: x.astype(DTYPES[dtype]), params)


def _load_scanned(path, dtype: str, mesh, config_overrides, quantize: str | None) -> tuple[ModelConfig, dict]:
    from mistral_jax import sharding
    from mistral_jax.model import quant

    overrides = {"dtype": dtype, "param_dtype": dtype, **config_overrides}
    if orbax.is_orbax_dir(path):  # local or a URL (gs://...)
        config = orbax.read_config(path).replace(**overrides)
        if quantize is not None:
            quant.quantized_config(config, quantize)  # refuses a quantized checkpoint before reading it
        shardings = sharding.param_shardings(config, mesh) if mesh is not None else None
        return config, orbax.restore(path, orbax.abstract_params(config, shardings))
    config, tensors = read(path)
    config = config.replace(**overrides)
    target = config if quantize is None else quant.quantized_config(config, quantize)
    shardings = sharding.param_shardings(target, mesh) if mesh is not None else None

    def put(leaf_path, array):
        return jnp.asarray(array) if mesh is None else sharding.put(array, hf_layout.get_path(shardings, leaf_path))

    def place(leaf_path, array):
        if quantize is None or leaf_path[-1] not in quant.CONTRACTED:
            return put(leaf_path, array)
        qvalue, scale = quant.quantize_array(leaf_path[-1], array)  # one float leaf on the host at a time
        scale_path = leaf_path[:-1] + (leaf_path[-1] + quant.SCALE_SUFFIX,)
        return quant.QArray(put(leaf_path, qvalue), put(scale_path, scale))

    params = hf_layout.to_params(config, tensors, dtype, source=str(path), place=place)
    return target, quant.split_scales(params) if quantize is not None else params


def run_params(path, mesh=None):
    """(config, params) of a run's latest checkpoint, LoRA adapters merged, on `mesh` (sharded as
    `mistral_jax.sharding` places parameters) or, without one, on the host's first device.

    The config is the trained model's with float32 weights and compute. A LoRA run's base is read with `load`,
    whatever its format; the run and that base may be URLs (gs://...).
    """
    from mistral_jax import sharding

    output = as_path(path)
    info = run_dir.run_info(output)
    if run_dir.lora_spec(info) is not None:
        config, adapter = run_adapter(output, mesh)
        _, base = load(info["checkpoint"], "float32", mesh=mesh)
        return config, merge_adapter(config, base, adapter, mesh, donate=True)
    config = run_dir.model_config(output).replace(dtype="float32", remat=False)
    shardings = sharding.param_shardings(config, mesh) if mesh is not None else None
    with _latest(output) as (manager, step):
        return config, run_dir.restore_trainable(manager, step, orbax.abstract_params(config, shardings))


@contextlib.contextmanager
def _latest(output):
    """(read-only checkpoint manager, latest step) of a run, closed after the block."""
    manager = run_dir.checkpoint_manager(output, read_only=True)
    try:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{output / run_dir.CHECKPOINTS_DIR} holds no complete checkpoint")
        yield manager, step
    finally:
        manager.close()


def run_adapter(path, mesh=None):
    """(the trained model's config, float32, and its lora.Adapter) of an sft LoRA run's latest checkpoint, the
    adapters on `mesh` (sharded as the trainer places them) or on the host's first device. No base is read."""
    import jax

    from mistral_jax import lora, sharding
    from mistral_jax.model.transformer import param_shapes

    output = as_path(path)
    info = run_dir.run_info(output)
    spec = run_dir.lora_spec(info)
    if spec is None:
        raise UserError(f"{path} is a full fine-tune (trained without --lora-rank): it holds no LoRA adapter")
    config = run_dir.model_config(output).replace(dtype="float32", remat=False)
    abstract = jax.eval_shape(lambda: lora.init(param_shapes(config), spec, jax.random.key(0)))
    placed = lora.shardings(config, mesh, abstract) if mesh is not None else None
    with _latest(output) as (manager, step):
        weights = run_dir.restore_trainable(manager, step, sharding.abstract_arrays(abstract, placed))
    return config, lora.Adapter(weights, spec.scale, source=f"{path} (an sft LoRA run on {info['checkpoint']})")


def load_adapter(path, config: ModelConfig, *, mesh=None):
    """A lora.Adapter for `config`'s model from a Hugging Face PEFT directory or an sft LoRA run directory
    (local, or a run on a URL); one made for another base is refused with one line naming what differs."""
    from mistral_jax import lora
    from mistral_jax.checkpoints import peft

    if isinstance(path, lora.Adapter):
        adapter = path
    elif run_dir.is_run_dir(path):
        _, adapter = run_adapter(path, mesh)
    elif not is_url(path) and peft.is_peft_dir(path):
        adapter = peft.read(path, config)
    else:
        raise CheckpointError(f"{path} is not an adapter: expected a Hugging Face PEFT directory "
                              f"({peft.CONFIG_FILE} + {peft.WEIGHTS_FILE}) or an sft run directory trained with "
                              "--lora-rank")
    adapter.check_fits(config)
    return adapter


def merge_adapter(config: ModelConfig, params, adapter, mesh=None, *, donate: bool = False):
    """`params` (scanned or not) with `adapter` (a path or a lora.Adapter, see load_adapter) merged into its
    float weights: the adapted leaves are new arrays, the rest shared; on a `mesh` each merged weight is
    computed shard by shard where it stays (donate: the base's adapted leaves are freed)."""
    import jax

    from mistral_jax import lora, sharding

    adapter = load_adapter(adapter, config, mesh=mesh)
    if mesh is None:
        return lora.apply(config, params, adapter)
    shardings = sharding.param_shardings(config, mesh)
    merge = jax.jit(lambda b, a: lora.apply(config, b, a), out_shardings=shardings,
                    donate_argnums=0 if donate else ())
    return merge(params, adapter)
