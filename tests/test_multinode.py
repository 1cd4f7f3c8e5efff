"""A real multi-node Ray cluster on this machine (issue 15): a head and three worker nodes, each its own raylet
process with its own resources (ray.cluster_utils.Cluster, what Ray's own tests use), `pidray upscale` through
RAY_ADDRESS, model work on more than one node, and one worker node killed mid-job. Marked slow."""

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from jobs.manifest import MANIFEST_NAME, read_manifest
from pipeline.storage import Location

from conftest import ROOT

pytestmark = pytest.mark.slow
N_IMAGES = 72  # batches of 16: more batches than actors, so every actor gets some


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "resources": {"head": 1}})  # coordinates only
    workers = [c.add_node(num_cpus=2, resources={f"worker{i}": 1}) for i in range(3)]
    c.wait_for_nodes()
    yield c, workers
    c.shutdown()


def _images(folder, n=N_IMAGES):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(folder / f"img{i:02d}.png")


def _job(cluster, src, dst, *extra):
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    return subprocess.Popen([sys.executable, "-m", "pidray.cli", "upscale", str(src), str(dst), "--ray",
                             "--diffuse-actors", "3", "--no-progress", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _node_ids():
    import ray

    return {n["NodeID"][:12] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0}


def _check_complete(dst):
    rows = read_manifest(Location(str(dst)))
    assert sorted(r["key"] for r in rows) == [f"img{i:02d}.png" for i in range(N_IMAGES)]  # one row each
    assert all(r["status"] == "ok" and (r["out_h"], r["out_w"]) == (96, 128) for r in rows), [r["error"] for r in rows]
    files = sorted(p.name for p in dst.iterdir())
    assert files == sorted([MANIFEST_NAME] + [f"img{i:02d}.png" for i in range(N_IMAGES)])  # no duplicate, no temp
    return rows


def test_model_work_spreads_over_nodes_and_survives_a_dead_node(cluster, tmp_path):
    import ray

    c, workers = cluster
    ray.init(address=c.address, log_to_driver=False)
    workers_ids = _node_ids()
    assert len(workers_ids) == 3

    _images(tmp_path / "in")
    job = _job(c, tmp_path / "in", tmp_path / "out")
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err
    rows = _check_complete(tmp_path / "out")
    nodes = {r["node"] for r in rows}
    assert len(nodes) >= 2 and nodes <= workers_ids, nodes  # three 1-CPU actors cannot fit one 2-CPU node

    job = _job(c, tmp_path / "in", tmp_path / "out2")
    deadline = time.time() + 300
    while time.time() < deadline and len(list((tmp_path / "out2").glob("img*.png"))) < 3:
        time.sleep(0.2)
    assert job.poll() is None, "the job finished before a node could be killed mid-job"
    mine = ray.get_runtime_context().get_node_id()  # the node this test's driver talks to stays
    victim = next(w for w in workers if w.unique_id != mine)
    c.remove_node(victim, allow_graceful=False)  # the raylet and every worker on it: SIGKILL
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    rows = _check_complete(tmp_path / "out2")
    after = {r["node"] for r in rows}
    assert len(_node_ids()) == 2 and len(after) >= 2, after
    ray.shutdown()
