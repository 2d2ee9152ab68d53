"""Time the training step train_flax.py runs, in this process: compile it, run it, print the step times.

    python benchmarks/train_step_time.py [--model vit_small_patch16_224] [--dtype bfloat16] [--batch 16]
        [--steps 5] [--cache DIR]

The step is vit_train's own (loop.build_model, loop.state_spec, loop.jit_steps: AdamW, 1000 classes, one
CPU device, the run's defaults), on random parameters (drawn from their shapes, no init to compile) and a
random uint8 batch, the state donated step to step as in a run. Prints one line per step and a last line
of JSON: {'model', 'dtype', 'batch', 'compile_s', 'step_ms' (each, wall), 'median_ms', 'cpu_ms'
(each: the process's CPU seconds over the step, all threads: less sensitive to other jobs on the cores than
the wall clock), 'median_cpu_ms', 'img_per_s',
'load_avg' (the 1-minute load average before and after)}. `--cache DIR` keeps XLA's compiled programs there
(jax's persistent compilation cache), so that a process timed from the outside spends its time stepping,
not compiling. On a shared machine pair it with the other dtype in the same window and compare ratios.
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--model', default='vit_small_patch16_224')
    ap.add_argument('--dtype', default='bfloat16', choices=('float32', 'bfloat16'))
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--steps', type=int, default=5)
    ap.add_argument('--cache', help='jax persistent compilation cache folder')
    a = ap.parse_args(argv)
    import jax
    if a.cache:
        jax.config.update('jax_compilation_cache_dir', a.cache)
        jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
        jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    import numpy as np
    from vit_train import config, loop, sharding, weights
    load0 = os.getloadavg()[0]
    fields = dict(model=a.model, batch_size=a.batch, dtype=a.dtype, workdir='/tmp/train-step-time-unused')
    args = config.resolve(config.from_python(fields))
    mesh = sharding.make_mesh(sharding.parse_mesh(args.mesh, 1), devices=jax.devices()[:1])
    model, _, size = loop.build_model(args, 1000, None)
    st = loop.state_spec(model, args, mesh)
    mean, std, _ = weights.normalization(args, None)
    train_step, _ = loop.jit_steps(model, st, mesh, args, mean, std)
    rng = np.random.default_rng(0)
    draw = lambda s: jax.device_put(np.asarray(0.02 * rng.standard_normal(s.shape), s.dtype), s.sharding)
    params = jax.tree.map(draw, st.abstract['params'])
    state = dict(params=params, opt_state=jax.jit(st.init_opt)(params),
                 step=jax.device_put(np.int32(0), st.shardings['step']))
    specs = loop.batch_specs(a.batch, size, mesh, args, True)
    batch = dict(image=rng.integers(0, 256, specs['image'].shape, np.uint8),
                 label=rng.integers(0, 1000, (a.batch,), np.int32), weight=np.ones((a.batch,), np.float32),
                 unreadable=np.zeros((a.batch,), np.int32))
    batch = {k: jax.device_put(v, specs[k].sharding) for k, v in batch.items()}
    lr, ema = np.float32(1e-4), np.float32(0.0)
    t = time.perf_counter()
    compiled = train_step.lower(state, batch, lr, ema).compile()
    compile_s = time.perf_counter() - t
    state, m = compiled(state, batch, lr, ema)   # warm-up
    jax.block_until_ready(m)
    times, cpu = [], []
    for i in range(a.steps):
        t, c = time.perf_counter(), time.process_time()
        state, m = compiled(state, batch, lr, ema)
        jax.block_until_ready(m)
        times.append(1e3 * (time.perf_counter() - t))
        cpu.append(1e3 * (time.process_time() - c))
        print(f'step {i}: {times[-1]:.0f} ms wall, {cpu[-1]:.0f} ms cpu, loss {float(m["loss"]):.4f}', flush=True)
    med = float(np.median(times))
    print(json.dumps(dict(model=a.model, dtype=a.dtype, batch=a.batch, compile_s=round(compile_s, 2),
                          step_ms=[round(x, 1) for x in times], median_ms=round(med, 1),
                          cpu_ms=[round(x, 1) for x in cpu], median_cpu_ms=round(float(np.median(cpu)), 1),
                          img_per_s=round(a.batch / med * 1e3, 3), load_avg=[load0, os.getloadavg()[0]])))
    return 0


if __name__ == '__main__':
    sys.exit(main())
