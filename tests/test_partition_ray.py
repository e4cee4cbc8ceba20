"""``build --ray ADDRESS --partitions N`` on a real local Ray cluster of two nodes (``ray.cluster_utils.Cluster``: a
head and a second raylet on this machine, the way Ray tests itself), with two partitions SIGKILLed mid-way on their
first attempt: one kills its own build process (the task raises and is retried), one kills the Ray worker running
it (Ray retries a lost task). Both resume from their finished shards; the merged set is byte-identical to an
uninterrupted partitioned build. The cluster is always shut down, and no Ray process outlives the test.
"""

from __future__ import annotations

import json
import time

import psutil
import pytest

from megatron_solo.format.tokens import SoloTokenizer, train_sentencepiece
from megatron_solo.preprocess.build import KILL_AT_RECORD_ENV, KILL_ONCE_ENV, build
from megatron_solo.preprocess.merge import merge
from megatron_solo.preprocess.partition import Partition
from tests.test_partition import CORPUS, _cli_build_args, _tree, cfg_for, documents_by_id, run_cli, write_mixed_corpus

ray = pytest.importorskip("ray")
RAY_DAEMONS = ("raylet", "gcs_server", "ray::", "default_worker.py", "log_monitor.py", "dashboard")


def _ray_processes() -> set[int]:
    out = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(d in cmd for d in RAY_DAEMONS):
            out.add(p.info["pid"])
    return out


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    return train_sentencepiece([CORPUS], tmp_path_factory.mktemp("tok") / "solo.model", 1000, extend=True)


@pytest.fixture
def cluster():
    from ray.cluster_utils import Cluster

    before = _ray_processes()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 80 << 20,
                                                      "include_dashboard": False})  # fmt: skip
    try:
        c.add_node(num_cpus=1, object_store_memory=80 << 20)
        yield c
    finally:
        c.shutdown()
        deadline = time.monotonic() + 30
        while (left := _ray_processes() - before) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"Ray processes outlived the cluster: {left}"


def test_ray_partitions_killed_mid_way_are_retried_byte_identical(cluster, tok_path, tmp_path):
    tok = SoloTokenizer(tok_path)
    d = tmp_path / "corpus"
    specs, n = write_mixed_corpus(d)
    ref = tmp_path / "ref"  # the uninterrupted partitioned build
    mans = [build(cfg_for(ref, specs, tok_path, partition=f"{k}/2")) for k in range(2)]
    merge(ref)
    a, b = 0, 1
    assert min(len(m["shards"]) for m in mans) >= 2
    kill = {k: mans[k]["shards"][1]["records"][0] + 1 for k in (a, b)}  # inside each one's second shard
    env = {KILL_AT_RECORD_ENV: f"{a}:{kill[a]},{b}:{kill[b]}:parent", KILL_ONCE_ENV: str(tmp_path / "once")}
    out = tmp_path / "ray"
    args = _cli_build_args(out, specs, tok_path) + ["--partitions", "2", "--ray", cluster.address, "--retries", "2"]
    r = run_cli(args, env, timeout=420)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "once").iterdir()) == sorted(
        f"killed_{m['build']['build_key']}_{kill[k]}" for k, m in ((a, mans[a]), (b, mans[b]))
    )  # fmt: skip  (both kills happened: the first attempts died)
    for k in (a, b):
        assert f"partition {k}/2: resume: kept 1 verified shard(s)" in r.stderr, r.stderr[-3000:]
    assert f"from {n:,} records" in r.stdout
    assert _tree(out) == _tree(ref)
    merged = json.loads((out / "manifest.json").read_text())
    assert [s["path"] for s in merged["merged"]["sets"]] == [Partition(k, 2).name for k in range(2)]
    assert len(documents_by_id(out, tok)) == n
