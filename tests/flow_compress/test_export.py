"""Export to TorchScript and ONNX: artifacts reload and match the eager model, failures are typed.

Real registered architectures at 32 px on real images (scikit-learn's bundled handwritten
digits, upsampled to 32x32 and normalised like a vision model's input).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from flow_compress.arch.models import build_model
from flow_compress.config import ExportConfig
from flow_compress.errors import ExportError, ExportParityError
from flow_compress.export import get_exporter, list_exporters
from flow_compress.export.onnx import export_onnx
from flow_compress.export.parity import check_parity, export_model
from flow_compress.export.torchscript import export_torchscript

SIZE = 32

pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated")


def digits(n: int) -> torch.Tensor:
    """``n`` real 8x8 digit images as a normalised (n, 3, 32, 32) float batch."""
    # Read scikit-learn's bundled file directly: importing sklearn.datasets costs seconds.
    spec = importlib.util.find_spec("sklearn")
    assert spec is not None and spec.submodule_search_locations
    csv = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    pixels = np.loadtxt(csv, delimiter=",", max_rows=n)[:, :64]
    images = torch.from_numpy(pixels.reshape(n, 8, 8)).float() / 16.0
    x = nn.functional.interpolate(images[:, None], size=(SIZE, SIZE), mode="bilinear")
    x = (x - 0.5) / 0.25
    return x.repeat(1, 3, 1, 1).contiguous()


def model(name: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = build_model(name, 10, input_size=SIZE)
    head = [mod for mod in m.modules() if isinstance(mod, nn.Linear)][-1]
    # torchvision initialises some heads at ~1e-2 scale (MobileNetV3), which makes logits so
    # small that any parity check would pass; a trained head has logits of order one.
    nn.init.normal_(head.weight, std=0.5)
    return m.eval()


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return digits(24)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    return model("resnet18")


@pytest.fixture(scope="module")
def exported(resnet: nn.Module, inputs: torch.Tensor, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("export")
    resnet.train()  # export must not depend on, nor change, the caller's mode
    records = export_model(resnet, inputs, out, ExportConfig(parity_samples=20))
    assert resnet.training
    resnet.eval()
    return out, records


def test_export_model_writes_both_formats_and_parity_passes(exported) -> None:
    out, records = exported
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.ts"]
    assert [r.format for r in records] == ["torchscript", "onnx"]
    for r in records:
        assert r.passed
        assert r.samples == 20
        assert 0.0 <= r.max_abs_diff <= 1e-3


def test_onnx_is_one_checked_file_with_named_dynamic_batch(exported) -> None:
    out, _ = exported
    proto = onnx.load(str(out / "model.onnx"))
    onnx.checker.check_model(proto, full_check=True)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert all(
        init.data_location == onnx.TensorProto.DEFAULT for init in proto.graph.initializer
    ), "weights must be embedded, not external data"
    (inp,) = proto.graph.input
    (outp,) = proto.graph.output
    assert inp.name == "input" and outp.name == "logits"
    batch_in = inp.type.tensor_type.shape.dim[0]
    batch_out = outp.type.tensor_type.shape.dim[0]
    assert batch_in.dim_param and not batch_in.dim_value
    assert batch_out.dim_param and not batch_out.dim_value
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == [3, SIZE, SIZE]


def test_onnx_runs_at_other_batch_sizes_and_matches_eager(
    exported, resnet: nn.Module, inputs: torch.Tensor
) -> None:
    out, _ = exported
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = inputs[:batch]
        got = session.run(["logits"], {"input": x.numpy()})[0]
        with torch.no_grad():
            ref = resnet(x).numpy()
        assert got.shape == (batch, 10)
        assert np.abs(ref).max() > 0.1, "logits must be of a size where parity means something"
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_torchscript_reloads_and_matches_eager(
    exported, resnet: nn.Module, inputs: torch.Tensor
) -> None:
    out, _ = exported
    loaded = torch.jit.load(str(out / "model.ts"))
    x = inputs[:5]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), resnet(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", list_exporters())
def test_every_registered_format_exports_and_matches_eager(
    fmt: str, resnet: nn.Module, inputs: torch.Tensor, tmp_path: Path
) -> None:
    cfg = ExportConfig(formats=(fmt,), parity_samples=7)
    (record,) = export_model(resnet, inputs, tmp_path, cfg)
    assert (record.format, record.passed, record.samples) == (fmt, True, 7)
    assert [p.name for p in tmp_path.iterdir()] == [get_exporter(fmt).file]
    run = get_exporter(fmt).load(tmp_path / get_exporter(fmt).file)
    with torch.no_grad():
        torch.testing.assert_close(run(inputs[:3]), resnet(inputs[:3]), atol=1e-3, rtol=1e-3)


def test_mobilenet_v3_onnx_parity_passes(tmp_path: Path, inputs: torch.Tensor) -> None:
    # Hardswish, squeeze-excitation and depthwise convolutions through the ONNX exporter (its
    # TorchScript trace is verified against eager in test_latency).
    cfg = ExportConfig(formats=("onnx",), parity_samples=9)
    (record,) = export_model(model("mobilenet_v3_small"), inputs, tmp_path, cfg)
    assert (record.format, record.passed, record.samples) == ("onnx", True, 9)
    assert record.max_abs_diff <= 1e-3
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"], "only the requested format"


def test_parity_failure_raises_for_both_formats(exported, inputs: torch.Tensor) -> None:
    out, _ = exported
    other = model("resnet18", seed=1)
    with pytest.raises(ExportParityError) as ts_err:
        check_parity("torchscript", out / "model.ts", other, inputs[:6], atol=1e-3)
    with pytest.raises(ExportParityError) as onnx_err:
        check_parity("onnx", out / "model.onnx", other, inputs[:6], atol=1e-3)
    assert ts_err.value.code == "export_parity_failed"
    assert "torchscript" in ts_err.value.message and "differs" in ts_err.value.message
    assert "onnx" in onnx_err.value.message and "tolerance 0.001" in onnx_err.value.message


def test_parity_record_reports_the_difference(exported, resnet, inputs) -> None:
    out, _ = exported
    record = check_parity("onnx", out / "model.onnx", resnet, inputs[:3], atol=1.0)
    assert record.format == "onnx" and record.samples == 3 and record.passed
    assert 0.0 <= record.max_abs_diff < 1e-3


class _Eigvals(nn.Module):
    """Complex eigenvalues: no ONNX exporter can translate ``linalg_eigvals``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.eigvals(x.flatten(1)[:, :4].reshape(-1, 2, 2)).real


class _NumpyRoundTrip(nn.Module):
    """Leaves torch for numpy: a trace freezes the result as a constant, scripting refuses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.tanh(x.flatten(1)[:, :10].numpy()))


@pytest.mark.slow  # both exporters are tried; the torch.export-based one takes seconds to fail
def test_onnx_exporter_failure_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as err:
        export_onnx(_Eigvals(), torch.randn(2, 3, 8, 8), tmp_path / "bad.onnx")
    assert err.value.code == "export_failed"
    assert err.value.message.startswith("onnx export failed")
    assert "linalg_eigvals" in err.value.message
    assert "legacy exporter" in err.value.message and "dynamo exporter" in err.value.message
    assert "\x1b[" not in err.value.message
    assert list(tmp_path.iterdir()) == [], "no partial file or staging folder is left"


def test_torchscript_failure_is_an_export_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError) as err:
        export_torchscript(_NumpyRoundTrip(), torch.randn(2, 3, 8, 8), tmp_path / "bad.ts")
    assert err.value.message.startswith("torchscript export failed")
    assert "does not reproduce" in err.value.message and "scripting failed" in err.value.message
    assert list(tmp_path.iterdir()) == []


class _Branchy(nn.Module):
    """Data-dependent control flow: a trace would bake in one branch."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).mean(dim=(2, 3))
        if bool(x.mean() > 0):
            return y * 2.0
        return -y


def test_untraceable_control_flow_is_scripted(tmp_path: Path) -> None:
    m = _Branchy().eval()
    positive = torch.rand(2, 3, 8, 8) + 0.1
    export_torchscript(m, positive, tmp_path / "m.ts")
    loaded = torch.jit.load(str(tmp_path / "m.ts"))
    negative = -positive
    with torch.no_grad():
        torch.testing.assert_close(loaded(negative), m(negative))
        torch.testing.assert_close(loaded(positive), m(positive))
