"""Blockwise attention (attention="flash") and Pallas splash attention (attention="splash", interpret mode on the
CPU) equal the exact one, forward and gradients, and flash's memory is linear."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.model.attention import FLASH_MIN_KEYS, attend, attention_kernel, attention_mask
from mistral_jax.model.flash_attention import flash_attention
from mistral_jax.model.splash_attention import splash_attention

T = 300  # not a multiple of the blocks: the padded tail must stay invisible


def _rows():
    """Two rows: left padding, and two packed examples whose positions restart."""
    pos0 = np.concatenate([np.full(40, -1), np.arange(T - 40)])
    pos1 = np.concatenate([np.arange(150), np.arange(T - 150)])
    segments = np.stack([np.ones(T, int), np.concatenate([np.ones(150, int), np.full(T - 150, 2)])])
    return jnp.asarray(np.stack([pos0, pos1]), jnp.int32), jnp.asarray(segments, jnp.int32)


def _qkv(heads=4, kv_heads=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(2, T, heads, d))
    k, v = (rng.normal(size=(2, kv_heads, T, d)) for _ in range(2))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _close(got, want, rtol=1e-5):
    """max |got - want| <= rtol * max |want|, the suite's parity rule."""
    got, want = np.asarray(got), np.asarray(want)
    assert np.max(np.abs(got - want)) <= rtol * np.max(np.abs(want)), np.max(np.abs(got - want))


@pytest.mark.parametrize(("window", "causal_blocks", "heads"), [
    (None, False, 4), (None, True, 4), (64, False, 4), (64, True, 4),  # grouped query heads
    (64, True, 2),  # one query head per KV head
])
def test_flash_equals_exact_forward_and_gradients(window, causal_blocks, heads):
    positions, segments = _rows()
    q, k, v = _qkv(heads=heads)
    real = np.asarray(positions) >= 0  # padding queries see no key: their outputs are unused either way
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real[:, :, None, None]
    mask = attention_mask(positions, positions, window, segments, segments)

    def exact(q, k, v):
        return attend(q, k, v, mask)

    def flash(q, k, v):
        return flash_attention(q, k, v, positions, positions, window, segments, segments,
                               causal_blocks=causal_blocks, block=64)

    _close(jax.jit(flash)(q, k, v)[real], jax.jit(exact)(q, k, v)[real])
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(q, k, v)
             for f in (exact, flash)]  # jitted: one program each rather than the blockwise loops run eagerly
    for want, got in zip(*grads):
        _close(got, want)
    if window is not None:  # the window does change the answer: the parity above is not vacuous
        full = attention_mask(positions, positions, None, segments, segments)
        assert np.max(np.abs(np.asarray(attend(q, k, v, full) - exact(q, k, v))[real])) > 1e-2


def test_splash_equals_exact_forward_and_gradients():
    """Splash in interpret mode (index masks: CausalMask, LocalMask; segment ids for packing and padding), grouped
    query heads, a length that is no multiple of its 128-row blocks: forward causal and windowed, gradients
    windowed (the same kernels' VJP either way)."""
    positions, segments = _rows()
    q, k, v = _qkv()
    real = np.asarray(positions) >= 0
    for window in (None, 64):
        mask = attention_mask(positions, positions, window, segments, segments)
        _close(jax.jit(splash_attention, static_argnums=4)(q, k, v, positions, window, segments)[real],
               attend(q, k, v, mask)[real])
    weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32) * real[:, :, None, None]
    kernels = (lambda q, k, v: attend(q, k, v, mask), lambda q, k, v: splash_attention(q, k, v, positions, 64,
                                                                                       segments))
    grads = [jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * weights), argnums=(0, 1, 2)))(q, k, v)
             for f in kernels]  # jitted: the interpreted kernel's grid as one program, not op by op
    for want, got in zip(*grads):
        _close(got, want)


def test_splash_model_logits_and_generation_equal_the_exact_path():
    """A tiny Mistral (window 8) through splash: logits without a cache; generation, whose first prefill chunk
    runs splash, the chunks reading the ring cache flash, and the decode steps the einsums."""
    config = mj.ModelConfig.from_preset("tiny-mistral", n_layers=1, attention="xla")
    params = mj.init_params(config, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 128), 0, config.vocab_size))
    splash = config.replace(attention="splash")
    programs = {c.attention: str(jax.make_jaxpr(lambda p, c=c: mj.logits(c, p, tokens))(params))
                for c in (config, splash)}
    assert "pallas_call" in programs["splash"] and "pallas_call" not in programs["xla"]  # the kernel runs, only here
    _close(mj.logits(splash, params, tokens), mj.logits(config, params, tokens))
    prompts = [tokens[0, :40].tolist(), tokens[0, :13].tolist()]
    assert mj.generate(splash, params, prompts, 3) == mj.generate(config, params, prompts, 3)


def test_flash_reads_a_cache_and_a_chunk_as_the_exact_path():
    """Keys that are not the queries (a cached prefix, then the chunk), without causal block skipping."""
    positions, _ = _rows()
    q, k, v = _qkv()
    k_pos = jnp.concatenate([positions - 300, positions], axis=1)  # an older prefix before each row
    keys, values = (jnp.concatenate([x[:, :, ::-1], x], axis=2) for x in (k, v))
    mask = attention_mask(positions, k_pos, 200)
    real = np.asarray(positions) >= 0
    _close(jax.jit(flash_attention, static_argnums=5, static_argnames="block")(q, keys, values, positions, k_pos, 200,
                                                                              block=64)[real],
           attend(q, keys, values, mask)[real])


@pytest.mark.parametrize("preset", ["tiny-mistral", "tiny-mixtral"])
def test_model_logits_equal_the_exact_path(preset):
    config = mj.ModelConfig.from_preset(preset, max_seq_len=2048)
    params = mj.init_params(config, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, 512), 0, config.vocab_size))
    _close(mj.logits(config.replace(attention="flash"), params, tokens), mj.logits(config, params, tokens))


def test_the_default_takes_flash_for_long_sequences_with_the_same_logits():
    """attention="auto": exact below FLASH_MIN_KEYS keys, flash from there (cuDNN on a GPU in bfloat16); a tiny
    model's logits on FLASH_MIN_KEYS (12k) tokens, the first length that takes flash, equal the exact path's."""
    config = mj.ModelConfig.from_preset("tiny-llama", n_layers=1, n_heads=2, n_kv_heads=1, head_dim=32,
                                        max_seq_len=16384)
    assert config.attention == "auto" and FLASH_MIN_KEYS <= 16384
    assert [attention_kernel(config, n) for n in (FLASH_MIN_KEYS - 1, FLASH_MIN_KEYS)] == ["xla", "flash"]
    half = config.replace(dtype="bfloat16")
    assert [attention_kernel(half, 16384, "gpu"), attention_kernel(config, 16384, "gpu")] == ["cudnn", "flash"]
    assert attention_kernel(config.replace(attention="xla"), 16384) == "xla"
    params = mj.init_params(config, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (1, FLASH_MIN_KEYS), 0, config.vocab_size))
    _close(mj.logits(config, params, tokens), mj.logits(config.replace(attention="xla"), params, tokens))


def test_chunked_prefill_generates_as_the_exact_path():
    """Prefill chunks read the cache through flash too (keys = cached slots + the chunk)."""
    config = mj.ModelConfig.from_preset("tiny-mistral", max_seq_len=2048)
    params = mj.init_params(config, jax.random.key(0))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (300,), 0, config.vocab_size))
    prompts = [tokens.tolist(), tokens[:77].tolist()]
    flash = config.replace(attention="flash")
    assert mj.generate(flash, params, prompts, 4, prefill_chunk=64) == mj.generate(config, params, prompts, 4,
                                                                                    prefill_chunk=64)


def test_train_step_memory_grows_linearly():
    """The compiled gradient's temporary memory at 4x the length grows about 4x with flash (not 16x)."""
    config = mj.ModelConfig.from_preset("tiny-llama", max_seq_len=8192, attention="flash", n_layers=1)
    params = mj.init_params(config, jax.random.key(0))

    def temp_bytes(cfg, length):
        tokens = jnp.zeros((1, length), jnp.int32)
        positions = jnp.arange(length, dtype=jnp.int32)[None]

        def loss(p):
            return jnp.mean(mj.forward(cfg, p, tokens, positions).logits[..., 0])

        return jax.jit(jax.grad(loss)).lower(params).compile().memory_analysis().temp_size_in_bytes

    flash = temp_bytes(config, 4096) / temp_bytes(config, 1024)
    exact = temp_bytes(config.replace(attention="xla"), 4096) / temp_bytes(config.replace(attention="xla"), 1024)
    assert flash <= 5 and exact > 8, (flash, exact)  # the exact path's scores grow with T squared
