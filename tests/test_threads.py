"""The torch thread count: --num_threads, then OMP_NUM_THREADS, then the usable cores per local rank."""

import pytest
import torch
from helpers.finetune_runs import run_finetune_fast, write_sample_subset

import alpaca.core.threads
from alpaca.core.threads import _parse_cpu_list, choose_num_threads


def test_explicit_count_wins_over_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert choose_num_threads(5) == (5, "--num_threads")
    assert choose_num_threads(0) == (3, "OMP_NUM_THREADS")


def test_without_omp_num_threads_the_usable_cores_are_shared_by_local_ranks(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(alpaca.core.threads, "usable_cores", lambda: 8)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert choose_num_threads(0)[0] == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    count, why = choose_num_threads(0)
    assert count == 4 and "2 local ranks" in why
    monkeypatch.setattr(alpaca.core.threads, "usable_cores", lambda: 500)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert choose_num_threads(0)[0] == alpaca.core.threads.MAX_DEFAULT_THREADS


def test_usable_cores_is_within_the_affinity_mask():
    assert 1 <= alpaca.core.threads.usable_cores() <= len(__import__("os").sched_getaffinity(0))


def test_bad_counts_are_errors_naming_the_setting(monkeypatch):
    with pytest.raises(ValueError, match="--num_threads"):
        choose_num_threads(-1)
    monkeypatch.setenv("OMP_NUM_THREADS", "four")
    with pytest.raises(ValueError, match="OMP_NUM_THREADS='four'"):
        choose_num_threads(0)


def test_cpu_list_format():
    assert _parse_cpu_list("0-1,4\n") == [0, 1, 4]


def test_finetune_py_takes_num_threads(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    data = write_sample_subset(tmp_path / "data.json", 8)
    run_finetune_fast(tiny_llama, data, tmp_path / "out", max_steps=1, num_threads=1)
    assert "torch threads: 1 (--num_threads)" in capsys.readouterr().out
    assert torch.get_num_threads() == 1


def _v1_tree(tmp_path, quota: str, period: str = "100000", where: str = "docker/abc"):
    folder = tmp_path / "cgroup" / "cpu,cpuacct" / where
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text(quota + "\n")
    (folder / "cpu.cfs_period_us").write_text(period + "\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"12:memory:/{where}\n4:cpu,cpuacct:/{where}\n0::/\n")
    return tmp_path / "cgroup", proc


@pytest.mark.parametrize(("quota", "expected"), [("150000", 2), ("50000", 1), ("400000", 4), ("-1", None)])
def test_cgroup_v1_quota_is_read(tmp_path, quota, expected):
    """A container on cgroup v1 (cpu.cfs_quota_us, as this project's machines have) limits the default
    thread count as cgroup v2's cpu.max does; -1 is no limit."""
    from alpaca.core.threads import _cgroup_cpu_quota

    root, proc = _v1_tree(tmp_path, quota)
    assert _cgroup_cpu_quota(root, proc) == expected


def test_cgroup_v2_cpu_max_wins_and_max_is_no_limit(tmp_path):
    from alpaca.core.threads import _cgroup_cpu_quota

    root, proc = _v1_tree(tmp_path, "100000")
    (root / "cpu.max").write_text("250000 100000\n")
    assert _cgroup_cpu_quota(root, proc) == 3
    (root / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_quota(root, proc) is None
    assert _cgroup_cpu_quota(tmp_path / "nothing", tmp_path / "none") is None
