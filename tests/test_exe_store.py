"""The executable store (kunjax.runtime.exe_store): a warm start loads compiled executables without
tracing, lowering or compiling; a stale or corrupted entry is rejected and compiled again."""

import os
import shutil

import jax
import numpy as np
import pytest

from kunjax.control.request import SamplingParams
from kunjax.control.scheduler import SchedulerConfig
from kunjax.runtime import compile_stats, exe_store
from kunjax.runtime.engine import EngineConfig, LLMEngine, single_device_mesh
from kunjax.runtime.executables import EMBED, ExeKey, StepExecutables

CONFIG = EngineConfig(num_pages=32, max_model_len=128,
                      scheduler=SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=32, max_prefill_rows=2))
KEY = ExeKey(EMBED, 2, 32)


@pytest.fixture
def store_dir(tmp_path):
    d = str(tmp_path / exe_store.SUBDIR)
    exe_store.configure(d)
    yield d
    exe_store.configure(None)


def fresh_exes(model):
    """A new StepExecutables, as a restarted process has: nothing compiled in memory."""
    return StepExecutables(model.config, single_device_mesh(jax.devices()[0]), np.float32, CONFIG.page_size)


def counts():
    return compile_stats.compile_count(), compile_stats.trace_count(), compile_stats.lowering_count()


def test_warm_start_compiles_and_traces_nothing(host_model, store_dir):
    prompts = [[5, 6, 7], list(range(10, 30))]  # one prefill step of 2 rows, then 2-row decode steps
    cold = LLMEngine(host_model, CONFIG, executables=fresh_exes(host_model))
    want = [o.token_ids for o in cold.generate(prompts, SamplingParams(max_tokens=4))]
    assert exe_store.stats()["saved"] > 0 and os.listdir(store_dir)
    before, hits = counts(), exe_store.stats()["hits"]
    warm = LLMEngine(host_model, CONFIG, executables=fresh_exes(host_model))
    pools = warm.stage.pools[0]
    got = [o.token_ids for o in warm.generate(prompts, SamplingParams(max_tokens=4))]
    assert counts() == before  # no compile, no trace, no lowering: start-up and the whole run
    assert all(p.is_deleted() for p in pools)  # a loaded layer executable still donates (updates in place)
    assert exe_store.stats()["hits"] - hits == warm.exes.num_compiled > 0
    assert got == want


def _write(model, store_dir, **built_with):
    """Saves KEY's executable as a store built with `built_with` changed would (another jax, ...)."""
    writer = exe_store.ExecutableStore(store_dir)
    writer._built_with.update(built_with)
    exes = fresh_exes(model)
    compiled = exes._jit[EMBED].lower(*exes._abstract(KEY)).compile()
    writer.save(exes._identity(KEY), compiled)
    return exes._identity(KEY)


@pytest.mark.parametrize("field, value", [("jax", "0.0.1"), ("jaxlib", "0.0.1"), ("kunjax_source", "0" * 64),
                                          ("xla_flags", "--xla_cpu_other"), ("platform_version", "other")])
def test_stale_entry_rejected_and_recompiled(host_model, store_dir, field, value):
    _write(host_model, store_dir, **{field: value})
    jax.clear_caches()  # so that compiling again in this process reaches XLA (and is counted)
    rejected, compiles = exe_store.stats()["rejected"], compile_stats.compile_count()
    exes = fresh_exes(host_model)
    assert exes.compile([KEY]) == 1
    assert exe_store.stats()["rejected"] == rejected + 1
    assert compile_stats.compile_count() == compiles + 1  # compiled again, not loaded
    # ... and the fresh compile replaced the stale file: the next start loads it.
    hits = exe_store.stats()["hits"]
    fresh_exes(host_model).compile([KEY])
    assert exe_store.stats()["hits"] == hits + 1 and compile_stats.compile_count() == compiles + 1


def test_entry_of_another_config_rejected(host_model, store_dir):
    """A file holding another model's executable where this one's belongs (copied, renamed) is not used."""
    import dataclasses

    other = dataclasses.replace(host_model.config, rms_norm_eps=host_model.config.rms_norm_eps * 2)
    exes = fresh_exes(host_model)
    store = exe_store.current()
    theirs = StepExecutables(other, exes.mesh, np.float32, CONFIG.page_size)
    theirs.compile([KEY])
    shutil.copy(store.path(theirs._identity(KEY)), store.path(exes._identity(KEY)))
    rejected = exe_store.stats()["rejected"]
    assert exes.compile([KEY]) == 1 and exe_store.stats()["rejected"] == rejected + 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupted_entry_rejected_and_recompiled(host_model, store_dir, damage):
    what = _write(host_model, store_dir)
    path = exe_store.current().path(what)
    blob = bytearray(open(path, "rb").read())
    if damage == "flip":
        blob[-100] ^= 0xFF
    elif damage == "truncate":
        blob = blob[:len(blob) // 2]
    else:
        blob = bytearray(b"not an executable")
    open(path, "wb").write(bytes(blob))
    jax.clear_caches()
    rejected, compiles = exe_store.stats()["rejected"], compile_stats.compile_count()
    exes = fresh_exes(host_model)
    exes.compile([KEY])
    assert exe_store.stats()["rejected"] == rejected + 1 and compile_stats.compile_count() == compiles + 1
    tokens = np.arange(2 * 32, dtype=np.int32).reshape(2, 32) % host_model.config.vocab_size
    embed = jax.device_put(host_model.params["embed"], exes.embed_sh)
    np.testing.assert_array_equal(np.asarray(exes.get(KEY)(embed, jax.device_put(tokens, exes.rep))),
                                  np.asarray(host_model.params["embed"])[tokens])


def test_background_compiler_shutdown_waits_for_one_executable_not_the_whole_job():
    """A job can hold dozens of keys (a pool ladder's shapes); a SIGTERM'd server waited 17 s for
    one to finish. Shutdown now waits only for the executable being compiled."""
    import threading

    from kunjax.runtime.executables import BackgroundCompiler

    started, release = threading.Event(), threading.Event()
    compiled = []

    class SlowExes:  # compiles one key at a time, the first only when released
        def compile(self, keys):
            started.set()
            release.wait(10)
            compiled.extend(keys)
            return len(keys)

    done = []
    bg = BackgroundCompiler()
    bg.submit(SlowExes(), list(range(50)), on_done=lambda: done.append(True))
    bg.submit(SlowExes(), list(range(50, 60)))
    assert started.wait(10)
    stopper = threading.Thread(target=bg.shutdown)
    stopper.start()
    stopper.join(0.2)
    assert stopper.is_alive()  # the executable compiling now is waited for
    release.set()
    stopper.join(10)
    assert not stopper.is_alive() and bg.idle()
    assert compiled == [0] and not done  # the rest of the job and the queued one dropped, no on_done
