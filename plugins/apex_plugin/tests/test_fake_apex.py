"""Tests of the FAKE apex 25.05 ``apex.amp`` (tests/fake_apex) and the two fake
"wrong apex" packages (tests/fake_apex_variants) used for the availability matrix.

They check that the fake behaves as apex 25.05 does (see REAL_APEX_NOTES.md), so
that contract tests written against it mean something. They do not test torchplug.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist

HERE = Path(__file__).resolve().parent
FAKE_APEX = HERE / "fake_apex"
VARIANTS = HERE / "fake_apex_variants"

# every initialize() emits apex's DeprecatedFeatureWarning (a FutureWarning)
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _drop_apex_modules() -> None:
    for name in [n for n in sys.modules if n == "apex" or n.startswith("apex.")]:
        del sys.modules[name]


@pytest.fixture
def amp(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """The fake ``apex.amp``, freshly imported, with fresh global state."""
    monkeypatch.syspath_prepend(str(FAKE_APEX))
    _drop_apex_modules()
    yield importlib.import_module("apex.amp")
    _drop_apex_modules()


def _model_opt(lr: float = 0.1) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    return model, torch.optim.SGD(model.parameters(), lr=lr)


def _ref_grads(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Unscaled reference grads of loss = model(x).sum()."""
    params = list(model.parameters())
    return [g.clone() for g in torch.autograd.grad(model(x).sum(), params)]


X = torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10


# --- initialize ------------------------------------------------------------------
def test_initialize_returns_inputs_in_the_shape_given(amp: ModuleType) -> None:
    m1, o1 = _model_opt()
    m2, o2 = _model_opt()
    assert amp.initialize(m1, o1, verbosity=0) == (m1, o1)
    m1, o1 = _model_opt()
    assert amp.initialize(m1, verbosity=0) is m1
    m1, o1 = _model_opt()
    out_m, out_o = amp.initialize([m1, m2], [o1, o2], verbosity=0)
    assert out_m == [m1, m2]
    assert out_o == [o1, o2]
    m1, o1 = _model_opt()
    m2, o2 = _model_opt()
    out_m, out_o = amp.initialize(m1, [o1], verbosity=0)
    assert out_m is m1
    assert out_o == [o1]
    out_m, out_o = amp.initialize([m2], o2, verbosity=0)
    assert out_m == [m2]
    assert out_o is o2
    with pytest.raises(TypeError, match="optimizers must be either"):
        amp.initialize(m1, (o1,), verbosity=0)


def test_initialize_disabled_returns_inputs_untouched(amp: ModuleType) -> None:
    m, o = _model_opt()
    out = amp.initialize(m, o, enabled=False)
    assert out == (m, o)
    assert not hasattr(o, "_amp_stash")
    assert amp.initialize("anything", enabled=False) == "anything"
    loss = m(X).sum()
    with amp.scale_loss(loss, o) as scaled:
        assert scaled is loss


def test_opt_level_tables_and_overrides(amp: ModuleType) -> None:
    expected = {
        "O0": (torch.float32, False, None, False, 1.0),
        "O1": (None, True, None, None, "dynamic"),
        "O2": (torch.float16, False, True, True, "dynamic"),
        "O3": (torch.float16, False, False, False, 1.0),
    }
    keys = ("cast_model_type", "patch_torch_functions", "keep_batchnorm_fp32", "master_weights", "loss_scale")
    for level, values in expected.items():
        m, o = _model_opt()
        amp.initialize(m, o, opt_level=level, verbosity=0)
        opts = amp._amp_state.opt_properties.options
        assert opts["opt_level"] == level
        assert opts["enabled"] is True
        assert tuple(opts[k] for k in keys) == values
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O2", loss_scale="128.0", keep_batchnorm_fp32="False", verbosity=0)
    opts = amp._amp_state.opt_properties.options
    assert opts["loss_scale"] == 128.0
    assert opts["keep_batchnorm_fp32"] is False
    assert not amp._amp_state.loss_scalers[0].dynamic
    # apex refuses contradictory overrides (warn_or_err raises without hard_override)
    m, o = _model_opt()
    with pytest.raises(RuntimeError, match="master_weights with O1"):
        amp.initialize(m, o, opt_level="O1", master_weights=True, verbosity=0)


def test_bad_opt_level_raises(amp: ModuleType) -> None:
    m, o = _model_opt()
    with pytest.raises(RuntimeError, match="Unexpected optimization level 00"):
        amp.initialize(m, o, opt_level="00")


def test_initialize_prints_and_warns_like_apex(amp: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    import apex

    m, o = _model_opt()
    with pytest.warns(apex.DeprecatedFeatureWarning, match="apex.amp is deprecated"):
        amp.initialize(m, o, opt_level="O1")
    out = capsys.readouterr().out
    assert "Selected optimization level O1" in out
    assert "After processing overrides, optimization options are:" in out
    # printed once per process by a python-only apex (no amp_C), like the fake
    assert out.count("Using Python fallback.") == 1
    amp.initialize(*_model_opt(), opt_level="O1")
    assert "Using Python fallback." not in capsys.readouterr().out


def test_data_parallel_is_refused(amp: ModuleType) -> None:
    m, o = _model_opt()
    with pytest.raises(RuntimeError, match=r"instance of torch\.nn\.parallel\.DataParallel"):
        amp.initialize(torch.nn.DataParallel(m), o, verbosity=0)


def test_distributed_data_parallel_is_refused(amp: ModuleType, tmp_path: Path) -> None:
    owns_group = not dist.is_initialized()
    if owns_group:
        store = dist.FileStore(str(tmp_path / "store"), 1)  # type: ignore[attr-defined]
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        m, o = _model_opt()
        ddp = torch.nn.parallel.DistributedDataParallel(m)
        with pytest.raises(RuntimeError, match=r"DistributedDataParallel\. Parallel wrappers"):
            amp.initialize(ddp, o, verbosity=0)
    finally:
        if owns_group:
            dist.destroy_process_group()


def test_double_initialize_is_faithful(amp: ModuleType) -> None:
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O1", verbosity=0)
    amp._amp_state.loss_scalers[0]._loss_scale = 8.0
    with pytest.raises(RuntimeError, match=r"only be passed through amp\.initialize once"):
        amp.initialize(m, o, opt_level="O1", verbosity=0)
    # same (fp32) O1 model with a new optimizer: silently re-initialised, scalers reset
    amp.initialize(m, torch.optim.SGD(m.parameters(), lr=0.1), verbosity=0)
    assert amp.state_dict()["loss_scaler0"] == {"loss_scale": 2.0**16, "unskipped": 0}
    # an O2 model is "already half" the second time round
    m2, o2 = _model_opt()
    amp.initialize(m2, o2, opt_level="O2", verbosity=0)
    with pytest.raises(RuntimeError, match=r"with type torch\.cuda\.HalfTensor, expected"):
        amp.initialize(m2, torch.optim.SGD(m2.parameters(), lr=0.1), opt_level="O2", verbosity=0)


# --- scale_loss ---------------------------------------------------------------------
def test_scale_loss_before_initialize_raises(amp: ModuleType) -> None:
    m, o = _model_opt()
    with pytest.raises(RuntimeError, match="has not been initialized"), amp.scale_loss(m(X).sum(), o):
        pass


def test_scale_loss_scales_then_unscales_o1(amp: ModuleType) -> None:
    m, o = _model_opt()
    ref = _ref_grads(m, X)
    m, o = amp.initialize(m, o, opt_level="O1", verbosity=0)
    loss = m(X).sum()
    with amp.scale_loss(loss, o) as scaled:
        assert torch.equal(scaled, loss.float() * 2.0**16)
        scaled.backward()
        assert torch.allclose(m.weight.grad, ref[0] * 2.0**16)
    for p, g in zip(m.parameters(), ref):
        assert torch.allclose(p.grad, g)
    # O1 master params are the model params
    assert [id(p) for p in amp.master_params(o)] == [id(p) for p in m.parameters()]
    assert amp.state_dict()["loss_scaler0"] == {"loss_scale": 2.0**16, "unskipped": 1}


def test_grad_accumulation_adds_unscaled_grads(amp: ModuleType) -> None:
    m, o = _model_opt()
    ref = _ref_grads(m, X)
    m, o = amp.initialize(m, o, opt_level="O1", verbosity=0)
    for _ in range(2):
        with amp.scale_loss(m(X).sum(), o) as scaled:
            scaled.backward()
    assert torch.allclose(m.weight.grad, 2 * ref[0])


def test_static_scale_one_yields_plain_float_loss(amp: ModuleType) -> None:
    for level in ("O0", "O3"):
        m, o = _model_opt()
        m, o = amp.initialize(m, o, opt_level=level, verbosity=0)
        loss = m(X).sum()
        with amp.scale_loss(loss, o) as scaled:
            assert scaled is loss  # loss.float() of an fp32 tensor is the tensor itself
            scaled.backward()
            m.weight.grad[0, 0] = float("inf")
        w = m.weight.detach().clone()
        o.step()  # no overflow check on this path: never skipped
        assert not torch.equal(w, m.weight)


def test_overflow_skips_next_step_and_halves_scale(amp: ModuleType, capsys: pytest.CaptureFixture[str]) -> None:
    m, o = _model_opt()
    m, o = amp.initialize(m, o, opt_level="O1")
    capsys.readouterr()
    with amp.scale_loss(m(X).sum(), o) as scaled:
        scaled.backward()
        m.weight.grad[0, 0] = float("inf")
    scaler = amp._amp_state.loss_scalers[0]
    assert scaler._has_overflow
    assert o._amp_stash.already_patched
    assert amp.state_dict()["loss_scaler0"] == {"loss_scale": 2.0**15, "unskipped": 0}
    before = [p.detach().clone() for p in m.parameters()]
    o.step()
    assert "Gradient overflow.  Skipping step, loss scaler 0 reducing loss scale to 32768.0" in capsys.readouterr().out
    assert all(torch.equal(b, p) for b, p in zip(before, m.parameters()))
    assert not o._amp_stash.already_patched
    assert ("skip_step", {"optimizer": o, "loss_id": 0}) in amp._fake_calls
    # the original step is back
    o.zero_grad()
    with amp.scale_loss(m(X).sum(), o) as scaled:
        scaled.backward()
    assert not scaler._has_overflow
    o.step()
    assert not torch.equal(before[0], m.weight)


def test_dynamic_scale_grows_after_window_and_respects_bounds(amp: ModuleType) -> None:
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O1", min_loss_scale=2.0**15, num_losses=2, verbosity=0)
    s0, s1 = amp._amp_state.loss_scalers
    for _ in range(2000):
        s0.update_scale()
    assert (s0.loss_scale(), s0._unskipped) == (2.0**17, 0)
    for _ in range(3):
        s1._has_overflow = True
        assert s1.update_scale() is True
    assert s1.loss_scale() == 2.0**15  # floored at min_loss_scale
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O1", max_loss_scale=2.0**10, verbosity=0)
    assert amp._amp_state.loss_scalers[0].loss_scale() == 2.0**10


def test_loss_id_selects_its_scaler(amp: ModuleType) -> None:
    m, o = _model_opt()
    m, o = amp.initialize(m, o, opt_level="O1", num_losses=2, verbosity=0)
    amp._amp_state.loss_scalers[1]._loss_scale = 4.0
    loss = m(X).sum()
    with amp.scale_loss(loss, o, loss_id=1) as scaled:
        assert torch.equal(scaled, loss * 4.0)
        scaled.backward()
    assert [v["unskipped"] for v in amp.state_dict().values()] == [0, 1]


def test_delay_unscale_leaves_grads_scaled(amp: ModuleType) -> None:
    m, o = _model_opt()
    ref = _ref_grads(m, X)
    m, o = amp.initialize(m, o, opt_level="O1", verbosity=0)
    with amp.scale_loss(m(X).sum(), o, delay_unscale=True) as scaled:
        scaled.backward()
    assert torch.allclose(m.weight.grad, ref[0] * 2.0**16)
    assert o._amp_stash.params_have_scaled_gradients
    assert amp.state_dict()["loss_scaler0"]["unskipped"] == 0


# --- O2 master weights -------------------------------------------------------------
def test_o2_master_params_are_separate_fp32_and_step_copies_back(amp: ModuleType) -> None:
    m, o = _model_opt(lr=0.5)
    ref = _ref_grads(m, X)
    m, o = amp.initialize(m, o, opt_level="O2", verbosity=0)
    model_params = list(m.parameters())
    # apex creates the masters lazily (first scale_loss / zero_grad / add_param_group)
    assert [id(p) for p in amp.master_params(o)] == [id(p) for p in model_params]
    with pytest.raises(TypeError):
        o.zero_grad(set_to_none=True)  # apex's patched zero_grad takes no arguments
    o.zero_grad()  # lazy init: masters replace the params in param_groups
    masters = list(amp.master_params(o))
    assert len(masters) == 2
    assert all(p.dtype == torch.float32 for p in masters)
    assert not any(mp is p for mp in masters for p in model_params)
    assert all(torch.equal(mp, p) for mp, p in zip(masters, model_params))

    with amp.scale_loss(m(X).sum(), o) as scaled:
        scaled.backward()
    for mp, p, g in zip(masters, model_params, ref):
        assert torch.allclose(mp.grad, g)  # master grads unscaled
        assert torch.allclose(p.grad, g * 2.0**16)  # model grads stay scaled

    expected = [p.detach() - 0.5 * g for p, g in zip(model_params, ref)]
    o.step()
    for mp, p, e in zip(masters, model_params, expected):
        assert torch.allclose(mp, e)
        assert torch.allclose(p, e)
        assert mp.grad is None  # apex clears master grads after step
    o.zero_grad()
    assert all(p.grad is not None and not p.grad.any() for p in model_params)
    with pytest.raises(RuntimeError, match="does not support closure"):
        o.step(lambda: None)


def test_o2_overflow_skip_clears_master_grads(amp: ModuleType) -> None:
    m, o = _model_opt()
    m, o = amp.initialize(m, o, opt_level="O2", verbosity=0)
    with amp.scale_loss(m(X).sum(), o) as scaled:
        scaled.backward()
        m.bias.grad[0] = float("nan")
    before = [p.detach().clone() for p in m.parameters()]
    o.step()
    assert all(torch.equal(b, p) for b, p in zip(before, m.parameters()))
    assert all(mp.grad is None for mp in amp.master_params(o))


def test_o2_keeps_affine_batchnorm_fp32(amp: ModuleType) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = amp.initialize(model, opt, opt_level="O2", verbosity=0)
    opt.zero_grad()  # triggers the lazy master-weight split
    stash = opt._amp_stash
    assert stash.all_fp16_params == [model[0].weight, model[0].bias]
    assert stash.all_fp32_from_fp32_params == [model[1].weight, model[1].bias]
    assert model(X).dtype == torch.float32


# --- state dict -------------------------------------------------------------------
def test_state_dict_round_trip(amp: ModuleType) -> None:
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O1", num_losses=2, verbosity=0)
    amp._amp_state.loss_scalers[1]._loss_scale = 512.0
    amp._amp_state.loss_scalers[1]._unskipped = 7
    saved = amp.state_dict()
    assert list(saved) == ["loss_scaler0", "loss_scaler1"]
    assert saved["loss_scaler1"] == {"loss_scale": 512.0, "unskipped": 7}
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O1", num_losses=2, verbosity=0)
    assert amp.state_dict() != saved
    amp.load_state_dict(saved)
    assert amp.state_dict() == saved


def test_load_state_dict_warns_on_count_and_rejects_bad_keys(
    amp: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    m, o = _model_opt()
    amp.initialize(m, o, opt_level="O1", verbosity=0)
    good = {"loss_scale": 2.0, "unskipped": 1}
    amp.load_state_dict({"loss_scaler0": good, "loss_scaler1": good})
    out = capsys.readouterr().out
    assert "Warning: state_dict contains 2 entries, while 1 loss_scalers are used" in out
    assert "Skipping loss_scaler[1], since num_losses was set to 1" in out
    with pytest.raises(RuntimeError, match='Unexpected key\\(s\\) in state_dict: "scale"'):
        amp.load_state_dict({"scale": good})


# --- fake-only helpers ----------------------------------------------------------
def test_fake_calls_and_reset(amp: ModuleType) -> None:
    m, o = _model_opt()
    m, o = amp.initialize(m, o, opt_level="O2", verbosity=0)
    with amp.scale_loss(m(X).sum(), o) as scaled:
        scaled.backward()
    names = [name for name, _ in amp._fake_calls]
    assert names == ["initialize", "scale_loss"]
    assert amp._fake_calls[0][1]["opt_level"] == "O2"
    amp._reset_fake_state()
    assert amp._fake_calls == []
    with pytest.raises(RuntimeError, match="has not been initialized"), amp.scale_loss(m(X).sum(), o):
        pass


# --- availability variants ----------------------------------------------------------
@pytest.fixture
def variant(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[str], None]]:
    def use(name: str) -> None:
        monkeypatch.syspath_prepend(str(VARIANTS / name))
        _drop_apex_modules()

    yield use
    _drop_apex_modules()


def test_pyramid_apex_import_fails_like_pypi_apex(variant: Callable[[str], None]) -> None:
    variant("pyramid")
    with pytest.raises(ImportError) as info:
        importlib.import_module("apex.amp")
    assert not isinstance(info.value, ModuleNotFoundError)
    assert str(info.value) == (
        "cannot import name 'UnencryptedCookieSessionFactoryConfig' from 'pyramid.session' (unknown location)"
    )


def test_apex_2507_has_no_amp(variant: Callable[[str], None]) -> None:
    variant("apex_2507")
    apex = importlib.import_module("apex")
    assert {"optimizers", "normalization"} <= set(apex.__all__)
    assert not hasattr(apex, "amp")
    with pytest.raises(ModuleNotFoundError, match=r"No module named 'apex\.amp'"):
        importlib.import_module("apex.amp")
    importlib.import_module("apex.optimizers")
