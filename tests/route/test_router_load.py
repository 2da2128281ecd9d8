"""How Router.from_pretrained loads: its steps timed, the live weights in one allocation, components not copied."""

from __future__ import annotations

import pytest
import torch
from route_fixtures import merged_checkpoint

from mmer.checkpoint.decoupled import load_decoupled
from mmer.route.router import Router


@pytest.fixture(scope="module")
def merged(demo_models, tmp_path_factory):
    return merged_checkpoint(demo_models, tmp_path_factory)


def test_the_load_reports_each_step_it_took_in_order(merged):
    router = Router.from_pretrained(merged, device="cpu")
    steps = ["open", "map", "models", "first switch", "check"]
    assert list(router.load_seconds) == list(router.load_cpu_seconds) == steps
    assert all(t >= 0 for t in [*router.load_seconds.values(), *router.load_cpu_seconds.values()])


def test_the_live_weights_share_one_allocation_and_components_are_views_that_never_write_back(merged):
    router = Router.from_pretrained(merged, device="cpu")
    assert len({t.untyped_storage().data_ptr() for t in router.live.values()}) == 1
    model = router.use("vision")
    live = {t.untyped_storage().data_ptr() for t in router.live.values()}
    name, param = next((n, p) for n, p in model.named_parameters() if p.untyped_storage().data_ptr() not in live)
    stored = router.ckpt.component_reader("vision")
    key = next(k for k in stored.tensors if name.endswith(k) or k.endswith(name))
    assert param.data_ptr() == stored.get(key, copy=False).data_ptr()  # the file's mapping itself, not a copy
    before = stored.get(key).clone()
    param.data.add_(1.0)  # a user editing a component in place changes this router only
    with load_decoupled(merged) as fresh:
        assert torch.equal(fresh.component_reader("vision").get(key), before)
    assert torch.equal(param.detach(), before + 1.0)
