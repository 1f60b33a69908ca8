"""Importing PyTorch DRAEM checkpoints: the torch-free reader and the weight mapping.

Checkpoints are made here with real ``torch.save`` from ``torch_reference`` (a PyTorch transcription of
the original model_unet.py with its key names, docs/architecture.md), read back with ``torch_pickle``
(never torch.load) and converted; the JAX model must then compute what the torch model computes. torch is
only needed by the tests: they skip where it is absent, unless DRAEM_REQUIRE_TORCH=1 (CI), where a missing
or broken torch fails them.
"""

import collections
import functools
import io
import json
import os
import pathlib
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

if os.environ.get("DRAEM_REQUIRE_TORCH") == "1":
  import torch  # CI: the parity tests must run, so a failing import fails them.
else:
  torch = pytest.importorskip("torch", reason="torch (CPU) is needed to write real PyTorch checkpoints")

import torch_reference  # noqa: E402  (needs torch)

from draem_jax import checkpointing  # noqa: E402
from draem_jax import convert  # noqa: E402
from draem_jax import models  # noqa: E402
from draem_jax import torch_pickle  # noqa: E402

SMALL = (8, 8)  # recon / disc widths of the quick tests
REPO = pathlib.Path(__file__).resolve().parent.parent
RELEASED_NAME = "DRAEM_seg_large_ae_large_0.0001_800_bs8_bottle_{}.pckl"  # the release's naming


def _randomize(net: torch.nn.Module, in_channels: int, size: int, passes: int, seed: int) -> None:
  """Non-trivial BN affine parameters and running statistics (train-mode passes), then eval mode."""
  gen = torch.Generator().manual_seed(seed)
  for m in net.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.weight.data = torch.rand(m.weight.shape, generator=gen) + 0.5
      m.bias.data = torch.rand(m.bias.shape, generator=gen) * 0.6 - 0.3
  net.train()
  with torch.no_grad():
    for _ in range(passes):
      net(torch.rand(2, in_channels, size, size, generator=gen) * 2)
  net.eval()


def _make_nets(recon_width, disc_width, size=32, passes=2, seed=0):
  torch.manual_seed(seed)
  recon = torch_reference.ReconstructiveSubNetwork(base_width=recon_width)
  disc = torch_reference.DiscriminativeSubNetwork(base_channels=disc_width)
  _randomize(recon, 3, size, passes, seed)
  _randomize(disc, 6, size, passes, seed + 1)
  return recon, disc


def _torch_forward(fn, x_nhwc):
  with torch.no_grad():
    outs = fn(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))))
  return [o.numpy().transpose(0, 2, 3, 1) for o in outs]


@functools.lru_cache(maxsize=None)
def _eval_fn(recon_width, disc_width):
  # One jitted function per widths: tests at equal widths and shapes share one compilation.
  model = models.DRAEM(recon_width=recon_width, disc_width=disc_width)
  return jax.jit(lambda v, x: model.apply(v, x, train=False))


def _jax_forward(variables, x_nhwc, recon_width, disc_width):
  recon, logits = _eval_fn(recon_width, disc_width)(variables, jnp.asarray(x_nhwc))
  return np.asarray(recon), np.asarray(logits)


def _parity(ours, ref):
  """(max abs error, max abs error / max |ref|) over all elements."""
  err = float(np.max(np.abs(ours.astype(np.float64) - ref)))
  return err, err / float(np.max(np.abs(ref)))


def _assert_parity(ours, refs, what):
  for name, a, b in zip(("reconstruction", "logits"), ours, refs):
    assert a.shape == b.shape, (what, name)
    err, rel = _parity(a, b)
    print(f"{what} {name}: max abs {err:.3g}, max rel {rel:.3g} (|ref| max {np.abs(b).max():.3g})")
    assert rel < 1e-4, (what, name, err, rel)


@pytest.fixture(scope="module")
def small_files(tmp_path_factory):
  """Official-layout checkpoints of small nets: (recon net, disc net, recon file, disc file)."""
  d = tmp_path_factory.mktemp("released")
  recon, disc = _make_nets(*SMALL)
  recon_path, disc_path = d / RELEASED_NAME.format(""), d / RELEASED_NAME.format("_seg")
  torch.save(recon.state_dict(), recon_path)
  torch.save(disc.state_dict(), disc_path)
  return recon, disc, recon_path, disc_path


# ----------------------------------------------------------------------------------------------------
# Reader.
# ----------------------------------------------------------------------------------------------------

def _assert_same_as_torch_load(path, ours):
  ref = torch.load(path, weights_only=True)
  assert list(ours) == list(ref)
  for key, t in ref.items():
    a, t = ours[key], t.detach()
    assert a.shape == tuple(t.shape) and a.flags.c_contiguous, key
    if t.dtype == torch.bfloat16:
      assert a.dtype.name == "bfloat16", key
      np.testing.assert_array_equal(a.astype(np.float32), t.float().numpy(), err_msg=key)
    else:
      assert a.dtype == t.numpy().dtype, key
      np.testing.assert_array_equal(a, t.numpy(), err_msg=key)


def test_reader_equals_torch_load_on_state_dicts(small_files):
  _, _, recon_path, disc_path = small_files
  for path in (recon_path, disc_path):
    ours = torch_pickle.load_state_dict(path)
    _assert_same_as_torch_load(path, ours)
    assert ours[next(k for k in ours if k.endswith("num_batches_tracked"))] == 2  # two train passes


def test_reader_dtypes_views_and_wrappers(tmp_path):
  gen = torch.Generator().manual_seed(0)
  base = torch.randn(6, 5, generator=gen)
  sd = collections.OrderedDict(
      f32=torch.randn(2, 3, 4, generator=gen),
      transposed=base.t(),  # non-contiguous view: strides (1, 5)
      sliced=base[2:4, 1:4],  # storage offset 11, shares base's storage
      base=base,
      f64=torch.randn(3, generator=gen).double(), f16=torch.randn(3, generator=gen).half(),
      bf16=torch.randn(3, generator=gen).bfloat16(), i64=torch.arange(-3, 4),
      i32=torch.arange(5, dtype=torch.int32), u8=torch.arange(250, 256, dtype=torch.uint8),
      u16=torch.tensor([60000, 1, 2], dtype=torch.int32).to(torch.uint16),  # v3: untyped storage + dtype
      boolean=torch.tensor([True, False, True]), scalar=torch.tensor(7), empty=torch.zeros(0, 3),
      parameter=torch.nn.Parameter(torch.randn(2, 2, generator=gen)),
      expanded=torch.randn(3, 1, generator=gen).expand(3, 4),  # stride 0
  )
  path = tmp_path / "mixed.pt"
  torch.save(sd, path)
  _assert_same_as_torch_load(path, torch_pickle.load_state_dict(path))

  # {"state_dict": ...} wrappers (Lightning style, with plain extra entries).
  wrapped = tmp_path / "wrapped.ckpt"
  torch.save({"epoch": 3, "global_step": 12, "state_dict": sd, "callbacks": {"x": [1.5, "a", None]}},
             wrapped)
  loaded = torch_pickle.load_state_dict(wrapped)
  np.testing.assert_array_equal(loaded["sliced"], base[2:4, 1:4].numpy())
  assert torch_pickle.load(wrapped)["global_step"] == 12


class _UserObject:
  """A class that is not on the allow-list (stands for Lightning hyper-parameter objects)."""

  def __init__(self, value):
    self.value = value


class _Evil:
  """Unpickling this would run a shell command creating a marker file."""

  def __init__(self, marker, how):
    self.marker, self.how = marker, how

  def __reduce__(self):
    if self.how == "system":
      return os.system, (f"touch {self.marker}",)
    return eval, (f"open({str(self.marker)!r}, 'w').close()",)


def _zip_with_pickle(path, payload: bytes):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("archive/data.pkl", payload)
    z.writestr("archive/version", "3\n")


@pytest.mark.parametrize("how", ["system", "eval"])
def test_refuses_other_globals_without_running_them(tmp_path, how):
  marker = tmp_path / "pwned"
  path = tmp_path / "evil.pt"
  _zip_with_pickle(path, pickle.dumps(collections.OrderedDict(w=_Evil(marker, how)), protocol=2))
  # Protocol 2 names builtins "__builtin__" (Python 2 spelling); os.system is posix.system on Linux.
  name = {"system": f"{os.system.__module__}.system", "eval": "__builtin__.eval"}[how]
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match=f"refused to load the global '{name}'"):
    torch_pickle.load_state_dict(path)
  # Even in the lenient mode the global is never imported or called: it becomes an inert placeholder.
  obj = torch_pickle.load(path, allow_unknown_objects=True)
  assert isinstance(obj["w"], torch_pickle.OpaqueObject) and obj["w"].global_name == name
  with pytest.raises(torch_pickle.CheckpointFormatError, match="not tensors"):
    torch_pickle.load_state_dict(path, allow_unknown_objects=True)
  assert not marker.exists()


def test_lightning_checkpoint_with_objects(tmp_path):
  sd = collections.OrderedDict(w=torch.ones(2))
  path = tmp_path / "lightning.ckpt"
  torch.save({"state_dict": sd, "hyper_parameters": {"obj": _UserObject([1, 2])}}, path)
  with pytest.raises(torch_pickle.UnsafeCheckpointError, match="_UserObject.*allow_unknown_objects"):
    torch_pickle.load_state_dict(path)
  loaded = torch_pickle.load(path, allow_unknown_objects=True)
  assert isinstance(loaded["hyper_parameters"]["obj"], torch_pickle.OpaqueObject)
  np.testing.assert_array_equal(torch_pickle.load_state_dict(path, allow_unknown_objects=True)["w"],
                                [1.0, 1.0])


def test_refuses_out_of_bounds_tensor_geometry(tmp_path):
  # A hand-made pickle: a tensor of 100 elements over a storage of 4 (as_strided would read past it).
  storage = object()

  class Pickler(pickle.Pickler):

    def persistent_id(self, obj):
      return ("storage", torch.FloatStorage, "0", "cpu", 4) if obj is storage else None

    def reducer_override(self, obj):
      if isinstance(obj, _UserObject):
        return torch._utils._rebuild_tensor_v2, (storage, 0, (100,), (1,), False,
                                                 collections.OrderedDict())
      return NotImplemented

  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump({"w": _UserObject(None)})
  path = tmp_path / "oob.pt"
  _zip_with_pickle(path, buf.getvalue())
  with zipfile.ZipFile(path, "a") as z:
    z.writestr("archive/data/0", np.arange(4, dtype=np.float32).tobytes())
  with pytest.raises(torch_pickle.CheckpointFormatError, match="reaches element 99 of a storage of 4"):
    torch_pickle.load_state_dict(path)


def test_clear_errors_for_bad_files(small_files, tmp_path):
  _, _, recon_path, _ = small_files
  data = recon_path.read_bytes()
  truncated = tmp_path / "truncated.pckl"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(torch_pickle.CheckpointFormatError, match="truncated.pckl.*truncated or corrupt"):
    torch_pickle.load_state_dict(truncated)

  text = tmp_path / "notes.pckl"
  text.write_text("not a checkpoint")
  with pytest.raises(torch_pickle.CheckpointFormatError, match="notes.pckl: not a PyTorch checkpoint"):
    torch_pickle.load_state_dict(text)

  legacy = tmp_path / "legacy.pckl"
  torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(torch_pickle.CheckpointFormatError, match="legacy PyTorch format.*torch>=1.6"):
    torch_pickle.load_state_dict(legacy)

  archive = tmp_path / "DRAEM_checkpoints.zip"  # the release download, not unzipped
  with zipfile.ZipFile(archive, "w") as z:
    z.write(recon_path, "checkpoints/" + recon_path.name)
  with pytest.raises(torch_pickle.CheckpointFormatError, match="unzip it"):
    torch_pickle.load_state_dict(archive)

  with pytest.raises(FileNotFoundError, match="missing.pckl"):
    torch_pickle.load_state_dict(tmp_path / "missing.pckl")


# ----------------------------------------------------------------------------------------------------
# Mapping and numerical parity with the torch networks.
# ----------------------------------------------------------------------------------------------------

@pytest.mark.numerics
def test_parity_small_width(small_files):
  recon, disc, recon_path, disc_path = small_files
  variables = convert.state_dicts_to_variables(torch_pickle.load_state_dict(recon_path),
                                               torch_pickle.load_state_dict(disc_path))
  # Widths were inferred from the tensors; every leaf of the flax tree is filled, float32.
  abstract = convert.abstract_variables(*SMALL)
  assert jax.tree.structure(variables) == jax.tree.structure(abstract)
  assert all(a.shape == b.shape and a.dtype == np.float32
             for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(abstract)))
  x = np.random.default_rng(0).random((2, 64, 64, 3), dtype=np.float32)
  refs = _torch_forward(lambda t: torch_reference.draem_forward(recon, disc, t), x)
  _assert_parity(_jax_forward(variables, x, *SMALL), refs, "small 8/8")


@pytest.mark.numerics
def test_parity_full_width(tmp_path):
  recon, disc = _make_nets(128, 64, size=32, passes=1, seed=3)
  recon_path, disc_path = tmp_path / "r.pckl", tmp_path / "d.pckl"
  torch.save(recon.state_dict(), recon_path)
  torch.save(disc.state_dict(), disc_path)
  recon_sd = torch_pickle.load_state_dict(recon_path)
  disc_sd = torch_pickle.load_state_dict(disc_path)
  assert (len(recon_sd), len(disc_sd)) == (156, 191)  # state_dict tensors, docs/architecture.md
  variables = convert.state_dicts_to_variables(recon_sd, disc_sd)
  del recon_sd, disc_sd
  n_params = sum(v.size for v in jax.tree.leaves(variables["params"]))
  assert n_params == 97_422_725  # 69,048,579 + 28,374,146 (docs/architecture.md)
  x = np.random.default_rng(1).random((1, 32, 32, 3), dtype=np.float32)
  refs = _torch_forward(lambda t: torch_reference.draem_forward(recon, disc, t), x)
  _assert_parity(_jax_forward(variables, x, 128, 64), refs, "full 128/64")


def test_anomalib_layout(tmp_path):
  torch.manual_seed(5)
  model = torch_reference.AnomalibDraemModel(*SMALL)
  _randomize(model.reconstructive_subnetwork, 3, 32, 2, 5)
  _randomize(model.discriminative_subnetwork, 6, 32, 2, 6)
  sd = collections.OrderedDict((f"model.{k}", v) for k, v in model.state_dict().items())
  sd["post_processor._image_threshold"] = torch.tensor(0.5)  # anomalib bookkeeping, ignored
  path = tmp_path / "draem.ckpt"
  torch.save({"state_dict": sd, "global_step": 321, "epoch": 4}, path)
  variables = convert.anomalib_state_dict_to_variables(torch_pickle.load_state_dict(path))
  x = np.random.default_rng(2).random((2, 64, 64, 3), dtype=np.float32)
  refs = _torch_forward(model, x)  # anomalib order [image, recon]; ours [recon, image] after the swap
  _assert_parity(_jax_forward(variables, x, *SMALL), refs, "anomalib 8/8")

  # Through the CLI's loader: anomalib trains on RGB; the step is Lightning's global_step.
  loaded = convert.load_converted(anomalib_checkpoint=str(path))
  assert (loaded.channel_order, loaded.step, loaded.num_epochs) == ("rgb", 321, None)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables),
                                                  jax.tree.leaves(loaded.variables)))

  # The same weights as a plain DraemModel.state_dict() (no "model." prefix) convert identically.
  plain = {k[len("model."):]: v for k, v in torch_pickle.load_state_dict(path).items()
           if k.startswith("model.")}
  again = convert.anomalib_state_dict_to_variables(plain)
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(again)))


def _numpy_sds(small_files):
  _, _, recon_path, disc_path = small_files
  return torch_pickle.load_state_dict(recon_path), torch_pickle.load_state_dict(disc_path)


def test_mapping_errors(small_files):
  recon_sd, disc_sd = _numpy_sds(small_files)
  cases = []
  extra = dict(recon_sd, **{"decoder.db9.0.weight": recon_sd["decoder.db1.0.weight"]})
  cases.append(((extra, disc_sd), "unknown key 'decoder.db9.0.weight'"))
  missing = {k: v for k, v in disc_sd.items() if k != "decoder_segment.up_b.2.running_var"}
  cases.append(((recon_sd, missing), r"missing, e\.g\. \['decoder_segment\.up_b\.2\.running_var'\]"))
  wrong = dict(recon_sd, **{"decoder.fin_out.0.bias": np.zeros(4, np.float32)})
  cases.append(((wrong, disc_sd), r"'decoder\.fin_out\.0\.bias' has shape \(4,\), expected \(3,\)"))
  cases.append(((disc_sd, recon_sd), "swap the two files"))
  sspcab = dict(recon_sd, **{"encoder.block5.masked_conv1.weight": np.zeros((64, 64, 1, 1), np.float32)})
  cases.append(((sspcab, disc_sd), "SSPCAB"))
  for (r, d), message in cases:
    with pytest.raises(convert.ConversionError, match=message):
      convert.state_dicts_to_variables(r, d)
  with pytest.raises(convert.ConversionError, match="unknown key 'model.sspcab_extra.w'"):
    convert.anomalib_state_dict_to_variables(
        {"model.reconstructive_subnetwork.a": 0, "model.discriminative_subnetwork.b": 0,
         "model.sspcab_extra.w": 0})


def test_flax_path_to_torch_key_inverts_models_mapping(small_files):
  recon_sd, disc_sd = _numpy_sds(small_files)
  for key in list(recon_sd) + list(disc_sd):
    mapped = models.torch_key_to_flax(key)
    if mapped is not None:
      assert convert.flax_path_to_torch_key(mapped[1]) == key


# ----------------------------------------------------------------------------------------------------
# Run directories and the CLI.
# ----------------------------------------------------------------------------------------------------

def test_cli_end_to_end(small_files, tmp_path):
  recon, disc, recon_path, disc_path = small_files
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "draem_jax.convert", f"--reconstructive={recon_path}",
         f"--discriminative={disc_path}", f"--workdir={workdir}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]

  config = json.loads((workdir / "config.json").read_text())
  assert config["channel_order"] == "bgr" and config["category"] == "bottle"  # from the file name
  assert (config["model"]["recon_width"], config["model"]["disc_width"]) == SMALL
  assert config["num_epochs"] == 800
  assert checkpointing.latest_step(str(workdir)) == 800 * 27  # bottle: 209 images, batch 8
  assert not checkpointing.has_train_state(str(workdir), 800 * 27)

  expected = convert.state_dicts_to_variables(*_numpy_sds(small_files))
  with checkpointing.manager(str(workdir), read_only=True) as mngr:
    restored, _, _ = checkpointing.restore(mngr, 800 * 27, convert.abstract_variables(*SMALL))
  assert jax.tree.structure(restored) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(a), b)

  # A second conversion into the same directory is refused and changes nothing.
  before = sorted(p.name for p in workdir.iterdir())
  again = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode != 0 and "already holds a run" in again.stderr
  assert sorted(p.name for p in workdir.iterdir()) == before


def test_write_run_overwrite_renames_old_run(tmp_path):
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), convert.abstract_variables(*SMALL))
  config = convert.run_config(convert.default_config("grid"), variables, channel_order="rgb",
                              num_epochs=None)
  workdir = convert.write_run(str(tmp_path / "run"), variables, config, step=5)
  with pytest.raises(FileExistsError, match="already holds a run"):
    convert.write_run(workdir, variables, config, step=6)
  convert.write_run(workdir, variables, config, step=7, overwrite=True)
  names = os.listdir(workdir)
  assert any(n.startswith("checkpoints.replaced-") for n in names)
  assert any(n.startswith("config.json.replaced-") for n in names)
  assert checkpointing.latest_step(workdir) == 7
  assert json.loads(pathlib.Path(workdir, "config.json").read_text())["channel_order"] == "rgb"


def test_released_step_and_category():
  assert convert.released_step("hazelnut") == 800 * 49 and convert.released_step("custom") == 0
  assert convert.category_from_filename("DRAEM_seg_large_ae_large_0.0001_800_bs8_metal_nut__seg.pckl") \
      == "metal_nut"
  assert convert.category_from_filename("weights.pt") is None
