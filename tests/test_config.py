"""MUSEConfig is the one home of every default: each module's keyword defaults are the config's fields."""

import dataclasses
import inspect

import pytest

from muse_pyramid import (
    AttentionMixer,
    BiMamba,
    FeaturePyramid,
    MUSEConfig,
    MUSEHead,
    ResMambaBlock,
    ScaleAggregator,
)

# module -> {its parameter: the MUSEConfig field it takes its default from}
SHARED = {
    MUSEHead: {f.name: f.name for f in dataclasses.fields(MUSEConfig)},
    ResMambaBlock: {k: k for k in ("mixer", "dropout", "d_state", "d_conv", "expand", "dt_rank", "num_heads")},
    BiMamba: {k: k for k in ("d_state", "d_conv", "expand", "dt_rank")},
    AttentionMixer: {"num_heads": "num_heads"},
    FeaturePyramid: {"scales": "scales"},
    ScaleAggregator: {"mode": "aggregation"},
}


@pytest.mark.parametrize("module", list(SHARED), ids=lambda m: m.__name__)
def test_module_defaults_are_the_configs(module):
    params = inspect.signature(module.__init__).parameters
    defaults = MUSEConfig()
    for param, field in SHARED[module].items():
        assert params[param].default == getattr(defaults, field), f"{module.__name__}({param}=...)"


def test_a_default_head_is_built_from_the_default_config():
    head = MUSEHead()
    assert head.config == MUSEConfig()
    assert [b.drop.p for b in head.blocks] == pytest.approx([0.0, MUSEConfig.dropout / 3, 2 * MUSEConfig.dropout / 3,
                                                             MUSEConfig.dropout])
    assert MUSEHead.from_config(MUSEConfig(depth=2, d_state=8)).blocks[1].mixer.d_state == 8
