"""The hot path outside the network, measured on the CPU: what `pidray doctor --smoke` writes as `hot_path`."""

import json

import torch

from pipeline.doctor import hot_path
from pipeline.doctor.common import tiny_config


def test_device_path_draws_copies_and_syncs_nothing_per_step():
    res = hot_path.per_step_traffic(tiny_config())
    assert set(res["per_case"]) == {f"{p}, batch {b}" for p in ("1 tile", "2x2 tiles") for b in (1, 2, 4)}
    assert res["host_rng_draws_per_step"] == 0
    assert res["host_to_device_copies_per_step"] == 0
    assert res["device_to_host_syncs_per_step"] == 0


def test_the_counter_sees_host_noise(monkeypatch):
    """The control: noise drawn on the host and copied over every step, as before, is counted."""
    from pipeline.model.sampler import GeneratorNoise
    from pipeline.stages.diffuse import DiffuseStage

    def host_noise(self, plan, seed):
        src = GeneratorNoise((plan.n_tiles, 3, *plan.tile_out), torch.Generator().manual_seed(seed))
        return lambda draw: src(draw).to(self.device)

    monkeypatch.setattr(DiffuseStage, "_noise", host_noise)
    res = hot_path.per_step_traffic(tiny_config())
    assert res["host_rng_draws_per_step"] >= 1 and res["host_to_device_copies_per_step"] >= 1


def test_the_counter_sees_a_sync():
    with hot_path.HostTraffic() as mode:
        x = torch.ones(3, device="meta")
        torch.zeros(2).to("meta")
        try:
            x.sum().item()
        except RuntimeError:  # meta has no values: the read fails, and is counted
            pass
    assert mode.counts["host_to_device_copies"] == 1 and mode.counts["device_to_host_syncs"] == 1


def test_autotune_keys_do_not_depend_on_the_batch():
    res = hot_path.autotune_key_sets()
    print(json.dumps(res))
    sets = res["autotune_key_sets"]
    assert set(sets) == {"1", "2", "4"} and len(set(sets.values())) == 1 and sets["1"] > 4
    assert res["autotune_keys_equal_across_batches"] and res["autotune_keys_all_batches"] == sets["1"]
    assert res["row_count_keys_before_all_batches"] > res["row_count_keys_before"]["1"]  # what keying on rows did


def test_tile_buckets_give_few_shapes():
    res = hot_path.tile_shapes()
    print(
        json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "tile_shapes"} for k, v in res["tile_buckets"].items()})
    )
    assert len(res["image_sizes"]) == 20
    assert set(res["distinct_tile_shapes"]) == {"flux-2k", "flux-2kto4k-v1.5"}
    assert all(n <= 6 for n in res["distinct_tile_shapes"].values())
    for name in ("flux-2k", "flux-2kto4k-v1.5"):  # what the buckets cost, against the even split
        assert res["tile_buckets"][f"{name} (even split)"]["shapes"] > res["distinct_tile_shapes"][name]
        assert res["tile_buckets"][name]["diffused_per_output_px"] <= 1.2  # six shapes chosen together, not 3 sides
