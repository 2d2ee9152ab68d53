"""benchmarks/bench_vs_timm.py's pure parts, no benchmark run: /proc/cpuinfo's model and flags, the load average
sampled through a round (fake clock and load), a round refused for load instead of giving a ratio, each case's
share of the matmul peak, and the --json report as one strict-JSON object."""
import importlib.util
import itertools
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('bench_vs_timm', os.path.join(ROOT, 'benchmarks', 'bench_vs_timm.py'))
bt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bt)

EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model\t\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512vl
processor\t: 1
model name\t: AMD EPYC 9B14
flags\t\t: fpu sse2 avx avx2 fma avx512f avx512dq avx512_bf16 avx512vl
"""
SAPPHIRE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8481C
flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile amx_int8
"""
ARM = """processor\t: 0
BogoMIPS\t: 243.75
Features\t: fp asimd bf16 i8mm
CPU part\t: 0xd40
"""


@pytest.mark.parametrize('text,model,flags', [
    (EPYC, 'AMD EPYC 9B14', ['avx2', 'avx512f', 'avx512_bf16']),
    (SAPPHIRE, 'Intel(R) Xeon(R) Platinum 8481C', ['avx2', 'avx512f', 'avx512_bf16', 'avx512_fp16', 'amx_bf16',
                                                   'amx_int8', 'amx_tile']),
    (ARM, '0xd40', []),
    ('', 'unknown', []),
])
def test_cpuinfo_gives_the_model_name_and_the_matmul_flags(text, model, flags):
    """The first 'model name' (not x86's numeric 'model' line before it) and, of the flags, avx2/avx512f/
    avx512_bf16/avx512_fp16 in that order then every amx_* sorted."""
    assert bt.cpu_info(text) == dict(model=model, flags=flags)


def test_the_machine_line_names_model_cores_flags_and_a_missing_amx():
    line = bt.machine_line(dict(bt.cpu_info(EPYC), cores=2))
    assert line == 'machine: AMD EPYC 9B14, 2 cores; flags: avx2 avx512f avx512_bf16, no amx'
    assert 'no amx' not in bt.machine_line(dict(bt.cpu_info(SAPPHIRE), cores=8))


def test_the_load_monitor_samples_on_entry_and_exit_with_its_own_clock():
    loads, clock = iter([0.5, 3.25]), iter([100.0, 112.5])
    with bt.LoadMonitor(every=0, loadavg=lambda: (next(loads), 0, 0), clock=lambda: next(clock)) as mon:
        pass
    assert mon.samples == [(0.0, 0.5), (12.5, 3.25)]
    assert mon.record() == dict(max=3.25, samples=[[0.0, 0.5], [12.5, 3.25]])


def test_the_load_monitor_samples_while_the_round_runs():
    """A peak of load in the middle of a round (not at its ends) is what refuses it."""
    import threading
    seen = threading.Event()
    loads = itertools.chain([1.0, 9.0], itertools.repeat(1.0))

    def loadavg():
        value = next(loads)
        if value == 9.0:
            seen.set()
        return value, 0.0, 0.0
    with bt.LoadMonitor(every=0.001, loadavg=loadavg, clock=itertools.count().__next__) as mon:
        assert seen.wait(5)
    assert mon.max == 9.0 and mon.samples[0] == (0, 1.0) and mon.samples[-1][1] == 1.0
    assert [t for t, _ in mon.samples] == sorted(t for t, _ in mon.samples)


@pytest.mark.parametrize('load,cores,ratio,refused', [
    (1.9, 2, 1.25, False),
    (2.0, 2, 1.25, False),            # at the core count: counted
    (2.01, 2, None, True),            # above it: refused
    (float('nan'), 2, None, True),    # never sampled: refused
    (15.0, 16, 1.25, False),
])
def test_a_round_above_the_core_count_gives_no_ratio(load, cores, ratio, refused):
    assert bt.round_ratio(5.0, 4.0, load, cores) == (ratio, refused)


def test_a_failed_side_gives_no_ratio_but_is_not_refused():
    assert bt.round_ratio(float('nan'), 4.0, 1.0, 2) == (None, False)


def _round(ratio, load):
    r, refused = bt.round_ratio(ratio, 1.0, load, 2)
    return dict(ratio=r, refused=refused, load=dict(max=load))


def test_the_ratio_cell_counts_the_quiet_rounds_and_says_loaded_when_none_was():
    assert bt.ratio_cell([_round(1.1, 1.0), _round(1.3, 1.5), _round(1.2, 1.9)], 2) == '1.20 (1.10-1.30)'
    assert bt.ratio_cell([_round(1.1, 1.0), _round(9.9, 7.5)], 2) == '1.10 (1.10-1.10) +1 loaded'
    assert bt.ratio_cell([_round(1.1, 7.5), _round(1.2, 3.04)], 2) == 'loaded (3.0/2)'
    assert bt.ratio_cell([], 2) == 'n/a'


def test_the_peak_is_the_larger_framework_and_time_per_dtype():
    runs = dict(before={'jax/float32': 190.0, 'torch/float32': 200.0, 'jax/bfloat16': 350.0,
                        'torch/bfloat16': float('nan'), 'load': dict(max=1.0, samples=[])},
                after={'jax/float32': 204.0, 'torch/float32': 150.0, 'jax/bfloat16': 300.0,
                       'torch/bfloat16': 412.0, 'load': dict(max=1.0, samples=[])})
    assert bt.peak_of(runs) == dict(float32=204.0, bfloat16=412.0)
    # no bf16 instructions: the float32 GEMM on widened operands is the faster bf16 product
    slow = {'before': {'jax/float32': 180.0, 'torch/float32': 183.0, 'jax/bfloat16': 108.0, 'torch/bfloat16': 1.0}}
    assert bt.peak_of(slow) == dict(float32=183.0, bfloat16=183.0)


def _row(dtype='bfloat16', loads=(1.0, 1.5)):
    """A case measured over two rounds as measure_round records them (flax 20 and 24 img/s, timm 16)."""
    rounds = []
    for i, (fx, load) in enumerate(zip((20.0, 24.0), loads)):
        ratio, refused = bt.round_ratio(fx, 16.0, load, 2)
        rounds.append(dict(flax=dict(times=[8 / fx] * 2, flops=8 * 9e9, compile_s=2.0, peak_mib=900.0),
                           timm=dict(times=[0.5, 0.5], compile_s=0.1, peak_mib=700.0),
                           rates=dict(flax=fx, timm=16.0), load=dict(max=load, samples=[[0, load]]),
                           ratio=ratio, refused=refused))
    return dict(case=dict(name='swin_t_infer_bf16', model='swin_tiny_patch4_window7_224', mode='infer',
                          dtype=dtype, batch=8), rounds=rounds)


def test_each_case_gives_its_gflops_and_share_of_its_dtypes_peak():
    s = bt.case_summary(_row(), dict(float32=200.0, bfloat16=400.0), 2)
    assert s['flops_per_image'] == 9e9
    assert s['flax']['img_s'] == 22.0 and s['flax']['spread'] == [20.0, 24.0]
    assert s['flax']['gflops'] == pytest.approx(198.0) and s['flax']['share'] == pytest.approx(198.0 / 400)
    assert s['timm']['gflops'] == pytest.approx(144.0) and s['timm']['share'] == pytest.approx(0.36)
    assert s['ratio'] == '1.38 (1.25-1.50)'
    f32 = bt.case_summary(_row('float32'), dict(float32=200.0, bfloat16=400.0), 2)
    assert f32['flax']['share'] == pytest.approx(198.0 / 200)


def test_a_loaded_case_still_prints_its_rates_and_shares_but_no_ratio():
    row = _row(loads=(4.0, 3.5))
    row['summary'] = bt.case_summary(row, dict(float32=200.0, bfloat16=400.0), 2)
    assert row['summary']['ratio'] == 'loaded (3.5/2)' and row['summary']['ratios'] == []
    line = bt.summarise(row, dict(float32=200.0, bfloat16=400.0), 2, [])
    assert 'loaded (3.5/2)' in line and '49.5%' in line and '1.38' not in line


def test_the_json_report_is_one_strict_object_with_every_measurement():
    mach = dict(bt.cpu_info(EPYC), cores=2)
    peaks = dict(before={'jax/float32': 190.0, 'torch/float32': float('nan'), 'jax/bfloat16': 350.0,
                         'torch/bfloat16': 400.0, 'load': dict(max=0.5, samples=[[0.0, 0.5]])})
    row = _row(loads=(1.0, 4.0))
    row['summary'] = bt.case_summary(row, bt.peak_of(peaks), 2)
    rep = bt.report(mach, dict(rounds=2, quick=False), peaks, [row], [])
    back = json.loads(json.dumps(rep, allow_nan=False))        # strict JSON: NaN written as null
    assert set(back) == {'machine', 'settings', 'peak', 'cases', 'compile'}
    assert back['machine'] == dict(model='AMD EPYC 9B14', flags=['avx2', 'avx512f', 'avx512_bf16'], cores=2)
    assert back['peak']['gflops'] == dict(float32=190.0, bfloat16=400.0)
    assert back['peak']['before']['torch/float32'] is None
    case = back['cases'][0]
    assert [r['refused'] for r in case['rounds']] == [False, True]
    assert case['rounds'][1]['ratio'] is None and case['rounds'][1]['load']['samples'] == [[0, 4.0]]
    assert case['rounds'][0]['flax']['times'] == [0.4, 0.4]    # every timed step kept
    assert case['summary']['ratio'] == '1.25 (1.25-1.25) +1 loaded'
