"""The functions behind lesson 2's figures and widget: every setting the widget offers must work."""

import pytest
import torch
from matplotlib.figure import Figure
from scipy.stats import norm

import qlora_ref
from qlora_ref.plots.codebooks import (
    bin_masses,
    blockwise_mae,
    code_usage,
    levels_of,
    plot_bin_masses,
    plot_codebook_levels,
    plot_equal_mass_slabs,
    resolve_codes,
    unit_values,
)

NF4_SCALE = norm.ppf(0.9677083)


@pytest.fixture(scope="module")
def normal():
    return torch.randn(64 * 512, generator=torch.Generator().manual_seed(0))


def test_levels_of_merges_signed_zeros():
    assert levels_of(qlora_ref.nf4_codebook()).numel() == 16
    assert levels_of(qlora_ref.fp4_codebook()).numel() == 15
    assert levels_of(qlora_ref.int4_codebook()).numel() == 15


def test_resolve_codes_accepts_names_pairs_and_dicts():
    assert list(resolve_codes("nf4")) == ["nf4"]
    assert list(resolve_codes([("mine", torch.linspace(-1, 1, 16))])) == ["mine"]
    assert list(resolve_codes({"a": qlora_ref.fp4_codebook()})) == ["a"]
    with pytest.raises(ValueError, match="16 entries"):
        resolve_codes({"short": torch.zeros(15)})
    with pytest.raises(ValueError, match="quant_type must be one of"):
        resolve_codes(["af4"])


@pytest.mark.parametrize("name", ["int4", "fp4", "nf4"])
def test_bin_masses_sum_to_one(name):
    levels, masses = bin_masses(qlora_ref.codebook_4bit(name), NF4_SCALE)
    assert levels.numel() == masses.numel()
    assert float(masses.sum()) == pytest.approx(1.0, abs=1e-12)
    assert (masses > 0).all()


def test_nf4_bins_are_near_equal_mass_under_its_own_scaling():
    _, masses = bin_masses(qlora_ref.nf4_codebook(), NF4_SCALE)
    assert float(masses.min()) > 0.05 and float(masses.max()) < 0.075
    _, uniform = bin_masses(qlora_ref.int4_codebook(), NF4_SCALE)
    assert float(uniform.max() - uniform.min()) > float(masses.max() - masses.min())


@pytest.mark.parametrize("name", ["int4", "fp4", "nf4"])
def test_blockwise_mae_equals_quantize_4bit(normal, name):
    packed, state = qlora_ref.quantize_4bit(normal, blocksize=64, quant_type=name)
    expected = (normal.double() - qlora_ref.dequantize_4bit(packed, state).double()).abs().mean().item()
    assert blockwise_mae(normal, qlora_ref.codebook_4bit(name), 64) == pytest.approx(expected, rel=1e-12)


def test_code_usage_counts_every_value_once(normal):
    levels, usage = code_usage(normal, qlora_ref.fp4_codebook(), 64)
    assert levels.numel() == 15 and float(usage.sum()) == pytest.approx(1.0)
    # one value per block is the block's absmax and lands exactly on +1 or -1
    assert float(usage[0] + usage[-1]) >= 1 / 64


def test_unit_values_are_in_unit_range(normal):
    unit = unit_values(normal * 3, 128)
    assert float(unit.abs().max()) == 1.0


@pytest.mark.parametrize("blocksize", [32, 4096])
@pytest.mark.parametrize("with_data", [False, True])
def test_plot_codebook_levels_every_widget_setting(normal, blocksize, with_data):
    codes = [("int4", qlora_ref.int4_codebook()), ("fp4", qlora_ref.fp4_codebook()), ("nf4", qlora_ref.nf4_codebook(0.99))]
    fig, info = plot_codebook_levels(codes, data=normal if with_data else None, blocksize=blocksize)
    assert isinstance(fig, Figure) and len(fig.axes) == 3
    assert {name: levels.numel() for name, levels in info["levels"].items()} == {"int4": 15, "fp4": 15, "nf4": 16}
    if with_data:
        assert info["unit"].numel() == normal.numel()
        assert info["mae"]["nf4"] > 0
    else:
        assert info["sigma"] == pytest.approx(1 / NF4_SCALE)


def test_nf4_beats_int4_and_fp4_on_normal_data(normal):
    _, info = plot_codebook_levels(data=normal)
    assert info["mae"]["nf4"] < info["mae"]["int4"] < info["mae"]["fp4"]


def test_the_offset_moves_nf4s_levels():
    _, a = plot_codebook_levels({"nf4": qlora_ref.nf4_codebook(0.9677083)})
    _, b = plot_codebook_levels({"nf4": qlora_ref.nf4_codebook(0.99)})
    assert not torch.equal(a["levels"]["nf4"], b["levels"]["nf4"])


def test_plot_bin_masses_with_and_without_usage(normal):
    fig, (levels, masses) = plot_bin_masses(qlora_ref.nf4_codebook(), NF4_SCALE)
    assert isinstance(fig, Figure) and levels.numel() == 16
    fig, _ = plot_bin_masses(qlora_ref.nf4_codebook(), NF4_SCALE, usage=code_usage(normal, qlora_ref.nf4_codebook()))
    assert isinstance(fig, Figure)
    with pytest.raises(ValueError, match="same code"):
        plot_bin_masses(qlora_ref.nf4_codebook(), NF4_SCALE, usage=code_usage(normal, qlora_ref.fp4_codebook()))


def test_invalid_blocksize_is_refused(normal):
    with pytest.raises(ValueError, match="blocksize must be one of"):
        plot_codebook_levels(data=normal, blocksize=100)


def test_equal_mass_slabs_each_hold_one_sixteenth():
    fig, edges = plot_equal_mass_slabs(16)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    assert len(edges) == 17 and edges[0] == -float("inf") and edges[-1] == float("inf")
    assert norm.cdf(edges[1:]) - norm.cdf(edges[:-1]) == pytest.approx([1 / 16] * 16, abs=1e-12)
    assert len(fig.axes[0].collections) == 16  # one filled slab each
    with pytest.raises(ValueError, match="at least 2"):
        plot_equal_mass_slabs(1)
