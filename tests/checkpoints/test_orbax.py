"""Our orbax format: convert any checkpoint, restore it exactly; clear errors for directories that are not one."""

import pathlib
import shutil

import jax
import numpy as np
import pytest

import mistral_jax as mj
from mistral_jax.checkpoints import orbax
from mistral_jax.checkpoints.errors import CheckpointError

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures" / "hf"


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    config, params = mj.load(FIXTURES / "mixtral_top2")
    path = orbax.write(config, params, tmp_path_factory.mktemp("orbax") / "ckpt")
    return config, params, path


def test_round_trip_is_exact(converted):
    config, params, path = converted
    config2, params2 = mj.load(path)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2)):
        np.testing.assert_array_equal(a, b)


def test_restore_in_bfloat16(converted):
    _, params, path = converted
    config, restored = mj.load(path, dtype="bfloat16")
    assert config.param_dtype == "bfloat16"
    assert all(leaf.dtype == jax.numpy.bfloat16 for leaf in jax.tree.leaves(restored))
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):  # float32's values, rounded once
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(jax.numpy.bfloat16))


def test_refuses_to_overwrite(converted, tmp_path):
    config, params, path = converted
    with pytest.raises(FileExistsError):
        orbax.write(config, params, path)


def test_directory_without_params_is_not_a_checkpoint(converted, tmp_path):
    _, _, path = converted
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(path / orbax.CONFIG_FILE, broken / orbax.CONFIG_FILE)
    with pytest.raises(CheckpointError, match="not an orbax checkpoint"):
        mj.load(broken)
    (broken / orbax.PARAMS_DIR).mkdir()
    with pytest.raises(CheckpointError, match="not a readable orbax checkpoint"):
        mj.load(broken)


def test_bucket_urls_are_kept_as_urls():
    """orbax reads and writes gs:// itself: the path must reach it unmangled (pathlib would make gs:/)."""
    assert str(orbax.as_path("gs://bucket/runs/ckpt")) == "gs://bucket/runs/ckpt"
    assert orbax.as_path("relative/dir").is_absolute()
