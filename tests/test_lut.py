"""The float (half-code) forms of the LUT equal the code-domain reference on every code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deploy_kit.errors import ConfigError
from deploy_kit.lut import ActivationQuant, LayerLUT, LUTActivation, lut_float_numpy

QUANTS = [ActivationQuant(0.0113601, 0), ActivationQuant(0.0230501, 0), ActivationQuant(0.1, 3),
          ActivationQuant(1.7e-3, 128), ActivationQuant(0.5, 255 // 2), ActivationQuant(0.03125, 0, 0, 127)]
LUTS = [LayerLUT(2, 5, 9, 14, 20), LayerLUT(0, 1, 2, 3, 3), LayerLUT(10, 43, 67, 92, 125), LayerLUT(3, 100, 200, 254, 255)]


@pytest.mark.parametrize("quant", QUANTS, ids=lambda q: f"s{q.scale:g}_z{q.zero_point}")
@pytest.mark.parametrize("lut", LUTS, ids=lambda l: l.describe().replace(" ", "_"))
def test_float_forms_equal_code_form_on_every_code(quant, lut):
    if lut.tmax > quant.qmax:
        pytest.skip("tmax above this quantization's qmax")
    codes = np.arange(quant.qmin, quant.qmax + 1)
    expected = quant.value(lut.apply_codes(codes, quant.zero_point))
    x = quant.value(codes)
    np.testing.assert_array_equal(lut_float_numpy(x, lut, quant), expected)
    torch_out = LUTActivation(lut, quant)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(torch_out, expected)


def test_code_form_is_the_table():
    lut = LayerLUT(2, 5, 9, 14, 20)
    out = lut.apply_codes(np.arange(256), 0)
    assert list(out[:3]) == [0, 0, 0] and set(out[3:10]) == {5} and set(out[10:21]) == {14}
    assert list(out[21:]) == list(range(21, 256))


def test_illegal_codes_are_rejected():
    with pytest.raises(ConfigError, match="t1 < v1 < t2 < v2 <= tmax"):
        LayerLUT(5, 4, 9, 12, 20)
